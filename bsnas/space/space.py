"""The search space: macro-structure, candidate ops and width grid, loaded from YAML.

A space file (`configs/spaces/<name>.yaml`) looks like::

    name: proxyless
    resolution: 224            # input height = width, pixels
    in_channels: 3             # optional (default 3)
    classes: 1000
    activation: relu6          # optional (default relu6; or relu, hswish), every block
    stem: {channels: 32, kernel: 3, stride: 2}        # conv kxk -> BN -> ReLU6
    first_block: {channels: 16, kernel: 3}            # optional fixed MBConv, expand 1
    ops: [k3, k5, k7, skip]                           # candidates of every layer
    width: {min_ratio: 1.0, max_ratio: 6.0, step: 0.5, round_to: 8}
    stages:                                           # searchable layers
      - {channels: 24, layers: 4, stride: 2}          # stride of the first layer
      - {channels: 40, layers: 4, stride: 2, ops: [k3, k5, skip]}   # per-stage ops
    head: {channels: 1280, dropout: 0.2}              # conv1x1 -> BN -> ReLU6, pool, linear

Rules applied to every searchable layer:
- `skip` (identity) is a candidate only where the layer has stride 1 and in == out
  channels; elsewhere it is dropped from the layer's candidates silently (so a global
  `ops` list can name it), and a layer left without candidates is an error.
- The hidden width of a kernel op ranges over `round(r * in_channels)` for the ratios
  r = min_ratio, min_ratio + step, ..., max_ratio, each rounded to the nearest multiple
  of `round_to` (halves up, at least `round_to`), duplicates removed, ascending.

Errors are ValueErrors that name the file, the key (e.g. `stages[2].stride`) and the
reason. Defaults live in `DEFAULTS` below and nowhere else.
"""
from __future__ import annotations

import copy
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bsnas.space.arch import SKIP, Arch, LayerChoice, kernel_size

__all__ = [
    "ACTIVATIONS", "DEFAULTS", "PRESETS_DIR", "FirstBlockSpec", "HeadSpec", "LayerSpec", "SearchSpace",
    "StageSpec", "StemSpec", "WidthGrid", "as_rng", "load_space", "preset_names",
]

#: Where the preset spaces live: `<repo>/configs/spaces/<name>.yaml`.
PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "spaces"

#: Defaults of the optional keys (the only place they are written down).
DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "activation": "relu6",
    "stem": {"kernel": 3, "stride": 2},
    "first_block": None,
    "first_block.kernel": 3,
    "head.dropout": 0.0,
    "width.round_to": 8,
}

_TOP_KEYS = {"name", "resolution", "in_channels", "classes", "activation", "stem", "first_block",
             "ops", "width", "stages", "head"}

#: Activations a space may name (the supernet maps them to torch.nn modules).
ACTIVATIONS = ("relu6", "relu", "hswish")


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class StemSpec:
    """Conv kxk (stride, no bias) -> BN -> ReLU6 from the image to `channels`."""
    channels: int
    kernel: int
    stride: int


@dataclass(frozen=True)
class FirstBlockSpec:
    """Fixed inverted residual with expand ratio 1: depthwise kxk -> BN -> ReLU6 ->
    conv1x1 -> BN (+ residual when in == out), stride 1, to `channels`."""
    channels: int
    kernel: int


@dataclass(frozen=True)
class StageSpec:
    """`layers` searchable layers producing `channels`; the first has `stride`, the
    others stride 1. `ops` overrides the space's candidate ops for this stage."""
    channels: int
    layers: int
    stride: int
    ops: tuple[str, ...] | None = None


@dataclass(frozen=True)
class WidthGrid:
    """Hidden widths as ratios of a layer's input channels (see the module doc)."""
    min_ratio: float
    max_ratio: float
    step: float
    round_to: int

    def ratios(self) -> tuple[float, ...]:
        n = int(math.floor((self.max_ratio - self.min_ratio) / self.step + 1e-9))
        return tuple(round(self.min_ratio + i * self.step, 9) for i in range(n + 1))

    def widths(self, in_channels: int) -> tuple[int, ...]:
        """Width options in channels for a layer with `in_channels` inputs, ascending."""
        m = self.round_to
        out = {max(m, int(r * in_channels / m + 0.5) * m) for r in self.ratios()}
        return tuple(sorted(out))


@dataclass(frozen=True)
class HeadSpec:
    """Conv1x1 -> `channels`, BN, ReLU6, global average pool, dropout, linear."""
    channels: int
    dropout: float


@dataclass(frozen=True)
class LayerSpec:
    """One searchable layer, as derived from the stages.

    `index` counts searchable layers from 0; `stage`/`position` locate it; `ops` are
    its candidates (skip included only when allowed); `widths` its hidden-width options
    in channels, ascending."""
    index: int
    stage: int
    position: int
    in_channels: int
    out_channels: int
    stride: int
    ops: tuple[str, ...]
    widths: tuple[int, ...]

    @property
    def kernel_ops(self) -> tuple[str, ...]:
        return tuple(op for op in self.ops if op != SKIP)

    @property
    def allows_skip(self) -> bool:
        return SKIP in self.ops

    @property
    def max_width(self) -> int:
        return self.widths[-1]

    @property
    def num_choices(self) -> int:
        """Number of distinct (op, width) choices of this layer."""
        return len(self.kernel_ops) * len(self.widths) + (1 if self.allows_skip else 0)

    def choices(self) -> list[LayerChoice]:
        """All choices of this layer: kernel ops x widths, then skip if allowed."""
        out = [LayerChoice(op, w) for op in self.kernel_ops for w in self.widths]
        if self.allows_skip:
            out.append(LayerChoice(SKIP))
        return out

    def where(self) -> str:
        return f"layer {self.index} (stage {self.stage}, position {self.position})"


def _skip_reason(stride: int, cin: int, cout: int) -> str | None:
    """Why skip is not allowed here, or None if it is."""
    if stride != 1:
        return f"stride {stride}"
    if cin != cout:
        return f"{cin} input channels != {cout} output channels"
    return None


# --------------------------------------------------------------------------- space


@dataclass(frozen=True, eq=True)
class SearchSpace:
    """A validated search space. Build with `load_space` or `SearchSpace.from_dict`.

    Immutable and hashable. `layers` lists the searchable layers (`LayerSpec`); the
    input is `[N, in_channels, resolution, resolution]`, the output `[N, classes]`."""
    name: str
    resolution: int
    in_channels: int
    classes: int
    activation: str
    stem: StemSpec
    first_block: FirstBlockSpec | None
    ops: tuple[str, ...]
    width: WidthGrid
    stages: tuple[StageSpec, ...]
    head: HeadSpec
    layers: tuple[LayerSpec, ...] = field(init=False, compare=False, repr=False)
    _hash: int = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        layers = []
        cin = self.first_block.channels if self.first_block else self.stem.channels
        for s, st in enumerate(self.stages):
            ops = st.ops if st.ops is not None else self.ops
            for p in range(st.layers):
                stride = st.stride if p == 0 else 1
                reason = _skip_reason(stride, cin, st.channels)
                layer_ops = tuple(op for op in ops if op != SKIP or reason is None)
                if not layer_ops:
                    raise ValueError(
                        f"space {self.name!r}: stages[{s}] layer {p}: no candidate op left "
                        f"(its only op is 'skip', which needs stride 1 and in == out; here {reason})")
                layers.append(LayerSpec(len(layers), s, p, cin, st.channels, stride,
                                        layer_ops, self.width.widths(cin)))
                cin = st.channels
        object.__setattr__(self, "layers", tuple(layers))
        object.__setattr__(self, "_hash", hash((self.name, self.resolution, self.in_channels,
                                                self.classes, self.activation, self.stem, self.first_block,
                                                self.ops, self.width, self.stages, self.head)))

    def __hash__(self) -> int:
        return self._hash

    # -- structure
    @property
    def num_layers(self) -> int:
        """Number of searchable layers."""
        return len(self.layers)

    @property
    def last_channels(self) -> int:
        """Channels entering the head."""
        return self.stages[-1].channels

    def size(self) -> int:
        """Number of distinct architectures (exact)."""
        return math.prod(layer.num_choices for layer in self.layers)

    # -- architectures
    def validate(self, arch: Arch) -> Arch:
        """Check that `arch` belongs to this space; returns it. Raises ValueError naming
        the layer and the reason otherwise."""
        if not isinstance(arch, Arch):
            raise ValueError(f"expected an Arch, got {type(arch).__name__}")
        if arch.space != self.name:
            raise ValueError(f"arch is for space {arch.space!r}, not {self.name!r}")
        if len(arch) != self.num_layers:
            raise ValueError(f"arch has {len(arch)} layers, space {self.name!r} has {self.num_layers}")
        for layer, c in zip(self.layers, arch.layers):
            if c.op not in layer.ops:
                if c.op == SKIP:
                    reason = _skip_reason(layer.stride, layer.in_channels, layer.out_channels)
                    raise ValueError(f"{layer.where()}: op 'skip' not allowed ({reason})")
                raise ValueError(f"{layer.where()}: op {c.op!r} not a candidate; candidates: {list(layer.ops)}")
            if c.width is not None and c.width not in layer.widths:
                raise ValueError(f"{layer.where()}: width {c.width} not in the width grid {list(layer.widths)}")
        return arch

    def sample(self, rng: random.Random | int | None = None, enabled=None) -> Arch:
        """Draw an arch: per layer, an op uniformly among the layer's ops, then for a
        kernel op a width uniformly among its widths. `rng` is a `random.Random`, an int
        seed or None (fresh entropy). `enabled`, an `EnabledSpace` of this space,
        restricts the draw to its enabled choices (the same as `enabled.sample(rng)`)."""
        if enabled is not None:
            if enabled.space != self:
                raise ValueError(f"enabled set is for space {enabled.space.name!r}, not this space "
                                 f"{self.name!r}")
            return enabled.sample(rng)
        return self.draw(rng, lambda i: self.layers[i].ops, lambda i: self.layers[i].widths)

    def draw(self, rng: random.Random | int | None, ops: Callable[[int], tuple[str, ...]],
             widths: Callable[[int], tuple[int, ...]]) -> Arch:
        """An arch with, per layer i, an op drawn uniformly from `ops(i)` and, for a
        kernel op, a width (channels) drawn uniformly from `widths(i)`; the one drawing
        order behind `sample` and `EnabledSpace.sample`."""
        rng = as_rng(rng)
        out = []
        for layer in self.layers:
            layer_ops, layer_widths = ops(layer.index), widths(layer.index)
            op = layer_ops[rng.randrange(len(layer_ops))]
            out.append(LayerChoice(op) if op == SKIP else
                       LayerChoice(op, layer_widths[rng.randrange(len(layer_widths))]))
        return Arch(self.name, out)

    def uniform(self, op: str, width: str | float = "max") -> Arch:
        """The arch with `op` in every layer and, per layer, the width `"max"`, `"min"`
        or the one closest to `width` x input channels (e.g. 6.0 for MobileNetV2)."""
        kernel_size(op)
        out = []
        for layer in self.layers:
            if op not in layer.ops:
                raise ValueError(f"{layer.where()}: op {op!r} not a candidate; candidates: {list(layer.ops)}")
            if op == SKIP:
                out.append(LayerChoice(SKIP))
            elif width == "max":
                out.append(LayerChoice(op, layer.widths[-1]))
            elif width == "min":
                out.append(LayerChoice(op, layer.widths[0]))
            elif isinstance(width, (int, float)) and not isinstance(width, bool):
                target = width * layer.in_channels
                out.append(LayerChoice(op, min(layer.widths, key=lambda w: (abs(w - target), w))))
            else:
                raise ValueError(f"width must be 'max', 'min' or a ratio, got {width!r}")
        return Arch(self.name, out)

    def largest(self) -> Arch:
        """Every layer at its largest kernel op and largest width."""
        return Arch(self.name, [LayerChoice(max(l.kernel_ops, key=kernel_size), l.max_width)
                                if l.kernel_ops else LayerChoice(SKIP) for l in self.layers])

    # -- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The YAML/JSON form; `SearchSpace.from_dict(space.to_dict()) == space`."""
        stages = []
        for st in self.stages:
            d = {"channels": st.channels, "layers": st.layers, "stride": st.stride}
            if st.ops is not None:
                d["ops"] = list(st.ops)
            stages.append(d)
        return {
            "name": self.name,
            "resolution": self.resolution,
            "in_channels": self.in_channels,
            "classes": self.classes,
            "activation": self.activation,
            "stem": {"channels": self.stem.channels, "kernel": self.stem.kernel, "stride": self.stem.stride},
            "first_block": (None if self.first_block is None else
                            {"channels": self.first_block.channels, "kernel": self.first_block.kernel}),
            "ops": list(self.ops),
            "width": {"min_ratio": self.width.min_ratio, "max_ratio": self.width.max_ratio,
                      "step": self.width.step, "round_to": self.width.round_to},
            "stages": stages,
            "head": {"channels": self.head.channels, "dropout": self.head.dropout},
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "space") -> "SearchSpace":
        """Validate a parsed YAML dict; errors start with `source` and name the key."""
        return _parse(d, source)

    def describe(self) -> str:
        """A multi-line human-readable summary."""
        lines = [f"space {self.name!r}: {self.resolution}x{self.resolution}x{self.in_channels} -> "
                 f"{self.classes} classes, {self.num_layers} searchable layers, {self.size():.3e} archs"]
        for l in self.layers:
            lines.append(f"  {l.index:2d} s{l.stage}.{l.position} {l.in_channels:4d}->{l.out_channels:4d} "
                         f"stride {l.stride} ops {','.join(l.ops)} widths {l.widths[0]}..{l.widths[-1]} "
                         f"({len(l.widths)})")
        return "\n".join(lines)


def as_rng(rng: random.Random | int | None) -> random.Random:
    """A `random.Random` from a Random (returned as is), an int seed or None."""
    if isinstance(rng, random.Random):
        return rng
    if rng is None or (isinstance(rng, int) and not isinstance(rng, bool)):
        return random.Random(rng)
    raise ValueError(f"rng must be a random.Random, an int seed or None, got {type(rng).__name__}")


# --------------------------------------------------------------------------- parsing


def _where(source: str, key: str) -> str:
    return f"{source}: {key}"


def _mapping(d: Any, source: str, key: str, allowed: set[str], required: set[str]) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"{_where(source, key)}: expected a mapping, got {type(d).__name__}")
    unknown = set(d) - allowed
    if unknown:
        raise ValueError(f"{_where(source, key)}: unknown key(s) {sorted(map(str, unknown))}; "
                         f"allowed: {sorted(allowed)}")
    missing = required - set(d)
    if missing:
        raise ValueError(f"{_where(source, key)}: missing required key(s) {sorted(missing)}")
    return d


def _int(v: Any, source: str, key: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{_where(source, key)}: expected an integer, got {v!r}")
    if v < minimum:
        raise ValueError(f"{_where(source, key)}: must be >= {minimum}, got {v}")
    return v


def _number(v: Any, source: str, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{_where(source, key)}: expected a number, got {v!r}")
    return float(v)


def _kernel(v: Any, source: str, key: str) -> int:
    k = _int(v, source, key)
    if k % 2 == 0:
        raise ValueError(f"{_where(source, key)}: kernel size must be odd, got {k}")
    return k


def _ops(v: Any, source: str, key: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not v:
        raise ValueError(f"{_where(source, key)}: expected a non-empty list of ops such as "
                         f"[k3, k5, skip], got {v!r}")
    for i, op in enumerate(v):
        try:
            kernel_size(op)
        except ValueError as e:
            raise ValueError(f"{_where(source, f'{key}[{i}]')}: {e}") from None
    if len(set(v)) != len(v):
        raise ValueError(f"{_where(source, key)}: duplicate ops in {v}")
    return tuple(v)


def _parse(d: Any, source: str) -> SearchSpace:
    d = _mapping(d, source, "top level", _TOP_KEYS, {"name", "resolution", "classes", "stem", "ops",
                                                     "width", "stages", "head"})
    name = d["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"{_where(source, 'name')}: expected a non-empty string, got {name!r}")
    resolution = _int(d["resolution"], source, "resolution")
    in_channels = _int(d.get("in_channels", DEFAULTS["in_channels"]), source, "in_channels")
    classes = _int(d["classes"], source, "classes")
    activation = d.get("activation", DEFAULTS["activation"])
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_where(source, 'activation')}: expected one of {list(ACTIVATIONS)}, "
                         f"got {activation!r}")

    s = _mapping(d["stem"], source, "stem", {"channels", "kernel", "stride"}, {"channels"})
    stem = StemSpec(_int(s["channels"], source, "stem.channels"),
                    _kernel(s.get("kernel", DEFAULTS["stem"]["kernel"]), source, "stem.kernel"),
                    _int(s.get("stride", DEFAULTS["stem"]["stride"]), source, "stem.stride"))

    fb = d.get("first_block", DEFAULTS["first_block"])
    first_block = None
    if fb is not None:
        fb = _mapping(fb, source, "first_block", {"channels", "kernel"}, {"channels"})
        first_block = FirstBlockSpec(_int(fb["channels"], source, "first_block.channels"),
                                     _kernel(fb.get("kernel", DEFAULTS["first_block.kernel"]), source,
                                             "first_block.kernel"))

    ops = _ops(d["ops"], source, "ops")

    w = _mapping(d["width"], source, "width", {"min_ratio", "max_ratio", "step", "round_to"},
                 {"min_ratio", "max_ratio", "step"})
    lo = _number(w["min_ratio"], source, "width.min_ratio")
    hi = _number(w["max_ratio"], source, "width.max_ratio")
    step = _number(w["step"], source, "width.step")
    if lo <= 0:
        raise ValueError(f"{_where(source, 'width.min_ratio')}: must be > 0, got {lo}")
    if hi < lo:
        raise ValueError(f"{_where(source, 'width.max_ratio')}: must be >= min_ratio ({lo}), got {hi}")
    if step <= 0:
        raise ValueError(f"{_where(source, 'width.step')}: must be > 0, got {step}")
    round_to = _int(w.get("round_to", DEFAULTS["width.round_to"]), source, "width.round_to")
    width = WidthGrid(lo, hi, step, round_to)

    stages_raw = d["stages"]
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ValueError(f"{_where(source, 'stages')}: expected a non-empty list of stages, got {stages_raw!r}")
    stages = []
    for i, st in enumerate(stages_raw):
        key = f"stages[{i}]"
        st = _mapping(st, source, key, {"channels", "layers", "stride", "ops"},
                      {"channels", "layers", "stride"})
        stages.append(StageSpec(_int(st["channels"], source, f"{key}.channels"),
                                _int(st["layers"], source, f"{key}.layers"),
                                _int(st["stride"], source, f"{key}.stride"),
                                _ops(st["ops"], source, f"{key}.ops") if "ops" in st else None))

    h = _mapping(d["head"], source, "head", {"channels", "dropout"}, {"channels"})
    dropout = _number(h.get("dropout", DEFAULTS["head.dropout"]), source, "head.dropout")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{_where(source, 'head.dropout')}: must be in [0, 1), got {dropout}")
    head = HeadSpec(_int(h["channels"], source, "head.channels"), dropout)

    try:
        return SearchSpace(name, resolution, in_channels, classes, activation, stem, first_block, ops, width,
                           tuple(stages), head)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


# --------------------------------------------------------------------------- loading


def preset_names() -> list[str]:
    """Names of the preset spaces in `configs/spaces/`."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_space(spec: "str | os.PathLike | dict | SearchSpace") -> SearchSpace:
    """A `SearchSpace` from a preset name (`"proxyless"`, `"mobilenetv2"`, `"tiny"`),
    a path to a YAML file, a parsed dict (as stored in checkpoints by
    `SearchSpace.to_dict`) or a `SearchSpace` (returned as is)."""
    if isinstance(spec, SearchSpace):
        return spec
    if isinstance(spec, dict):
        return SearchSpace.from_dict(copy.deepcopy(spec), source="space dict")
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"expected a space name, a YAML path or a dict, got {type(spec).__name__}")
    path = Path(spec)
    # a bare name is a preset; anything with a YAML suffix or a directory part is a file
    is_path = path.suffix in (".yaml", ".yml") or os.sep in str(spec) or "/" in str(spec)
    if not is_path:
        path = PRESETS_DIR / f"{spec}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown space {str(spec)!r}: not a preset ({', '.join(preset_names())}) "
                             f"nor a YAML file")
    elif not path.is_file():
        raise ValueError(f"space file {str(spec)!r} does not exist")
    import yaml  # here, not at the top: `import bsnas` does not need it
    try:
        with open(path) as f:
            d = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    return SearchSpace.from_dict(d, source=str(path))
