"""The enabled part of a search space: the shrinking state that the trainer, the
shrinker and the searcher share.

BS-NAS shrinks the space by turning off underperforming candidates; what is left is
one `EnabledSpace`: per searchable layer, the enabled ops and the enabled hidden widths
(shared by that layer's kernel ops). It starts as the whole space, only ever loses
candidates, never leaves a layer without an op or a width, and saves to a plain
JSON-serialisable dict that goes into checkpoints::

    {"space": "proxyless",
     "layers": [{"ops": ["k3", "k5", "k7"], "widths": [16, 24, 32]}, ...]}
"""
from __future__ import annotations

import math
import random
from typing import Any

from bsnas.space.arch import SKIP, Arch
from bsnas.space.space import SearchSpace

__all__ = ["EnabledSpace"]


class EnabledSpace:
    """Enabled ops and widths per searchable layer of `space` (initially all)."""

    def __init__(self, space: SearchSpace):
        self.space = space
        self._ops = [list(layer.ops) for layer in space.layers]
        self._widths = [list(layer.widths) for layer in space.layers]

    # -- queries
    @property
    def num_layers(self) -> int:
        return self.space.num_layers

    def ops(self, layer: int) -> tuple[str, ...]:
        """Enabled ops of `layer`, in the space's order."""
        return tuple(self._ops[self._layer(layer)])

    def kernel_ops(self, layer: int) -> tuple[str, ...]:
        return tuple(op for op in self.ops(layer) if op != SKIP)

    def widths(self, layer: int) -> tuple[int, ...]:
        """Enabled hidden widths of `layer` in channels, ascending."""
        return tuple(self._widths[self._layer(layer)])

    def is_enabled(self, layer: int, op: str, width: int | None = None) -> bool:
        """Whether `op` (and, if given, `width`) is enabled in `layer`."""
        i = self._layer(layer)
        return op in self._ops[i] and (width is None or width in self._widths[i])

    def size(self) -> int:
        """Number of architectures in the enabled space (exact)."""
        return math.prod(len(self.kernel_ops(i)) * len(self._widths[i]) + (SKIP in self._ops[i])
                         for i in range(self.num_layers))

    def sample(self, rng: random.Random | int | None = None) -> Arch:
        """Draw an arch of the enabled space: per layer, an op uniformly among the enabled
        ops, then for a kernel op a width uniformly among the enabled widths. `rng` is a
        `random.Random`, an int seed or None (fresh entropy)."""
        return self.space.draw(rng, self.ops, self.widths)

    def contains(self, arch: Arch) -> bool:
        """Whether `arch` lies in the enabled space."""
        try:
            self.validate(arch)
        except ValueError:
            return False
        return True

    def validate(self, arch: Arch) -> Arch:
        """Check `arch` against the space and the enabled choices; ValueError naming the
        layer and the disabled op or width otherwise."""
        self.space.validate(arch)
        for i, c in enumerate(arch.layers):
            if c.op not in self._ops[i]:
                raise ValueError(f"{self.space.layers[i].where()}: op {c.op!r} is disabled; "
                                 f"enabled: {self._ops[i]}")
            if c.width is not None and c.width not in self._widths[i]:
                raise ValueError(f"{self.space.layers[i].where()}: width {c.width} is disabled; "
                                 f"enabled: {self._widths[i]}")
        return arch

    # -- shrinking
    def disable_op(self, layer: int, op: str) -> None:
        """Turn off `op` in `layer`. ValueError if it is not enabled there or is the
        layer's last enabled op."""
        i = self._layer(layer)
        where = self.space.layers[i].where()
        if op not in self._ops[i]:
            raise ValueError(f"{where}: op {op!r} is not enabled; enabled: {self._ops[i]}")
        if len(self._ops[i]) == 1:
            raise ValueError(f"{where}: cannot disable {op!r}, the layer's last enabled op")
        self._ops[i].remove(op)

    def disable_width(self, layer: int, width: int) -> None:
        """Turn off hidden `width` (channels) in `layer`. ValueError if it is not enabled
        there or is the layer's last enabled width."""
        i = self._layer(layer)
        where = self.space.layers[i].where()
        if width not in self._widths[i]:
            raise ValueError(f"{where}: width {width!r} is not enabled; enabled: {self._widths[i]}")
        if len(self._widths[i]) == 1:
            raise ValueError(f"{where}: cannot disable width {width}, the layer's last enabled width")
        self._widths[i].remove(width)

    # -- state
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: `{"space": name, "layers": [{"ops", "widths"}]}`."""
        return {"space": self.space.name,
                "layers": [{"ops": list(o), "widths": list(w)} for o, w in zip(self._ops, self._widths)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`; ValueError naming the layer if `state` does not
        fit this space (unknown space, layer count, ops or widths outside the space,
        an empty layer)."""
        if not isinstance(state, dict) or set(state) != {"space", "layers"}:
            raise ValueError(f"enabled state: expected a dict with keys 'space' and 'layers', "
                             f"got {state!r:.200}")
        if state["space"] != self.space.name:
            raise ValueError(f"enabled state is for space {state['space']!r}, not {self.space.name!r}")
        layers = state["layers"]
        if not isinstance(layers, list) or len(layers) != self.num_layers:
            n = len(layers) if isinstance(layers, list) else type(layers).__name__
            raise ValueError(f"enabled state: expected {self.num_layers} layers, got {n}")
        ops, widths = [], []
        for spec, entry in zip(self.space.layers, layers):
            where = f"enabled state: {spec.where()}"
            if not isinstance(entry, dict) or set(entry) != {"ops", "widths"}:
                raise ValueError(f"{where}: expected a dict with keys 'ops' and 'widths', got {entry!r}")
            o, w = entry["ops"], entry["widths"]
            if not isinstance(o, list) or not o:
                raise ValueError(f"{where}: 'ops' must be a non-empty list, got {o!r}")
            if not isinstance(w, list) or not w:
                raise ValueError(f"{where}: 'widths' must be a non-empty list, got {w!r}")
            bad = [x for x in o if x not in spec.ops]
            if bad:
                raise ValueError(f"{where}: ops {bad} are not candidates of the layer ({list(spec.ops)})")
            bad = [x for x in w if x not in spec.widths]
            if bad:
                raise ValueError(f"{where}: widths {bad} are not in the layer's grid ({list(spec.widths)})")
            # keep the space's order whatever the order in the file
            ops.append([x for x in spec.ops if x in o])
            widths.append([x for x in spec.widths if x in w])
        self._ops, self._widths = ops, widths

    def copy(self) -> "EnabledSpace":
        other = EnabledSpace(self.space)
        other._ops = [list(o) for o in self._ops]
        other._widths = [list(w) for w in self._widths]
        return other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EnabledSpace):
            return NotImplemented
        return self.space == other.space and self._ops == other._ops and self._widths == other._widths

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return (f"EnabledSpace({self.space.name!r}, {sum(map(len, self._ops))} ops and "
                f"{sum(map(len, self._widths))} widths enabled over {self.num_layers} layers, "
                f"{self.size():.3e} archs)")

    def _layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer
