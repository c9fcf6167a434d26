"""Architecture encoding: one op (and hidden width) per searchable layer.

An `Arch` is an immutable, hashable, ordered value. Its JSON form is

    {"space": "proxyless",
     "layers": [{"op": "k5", "width": 120}, {"op": "skip"}, ...]}

with one entry per searchable layer of the space, in forward order. A kernel op
`k<K>` (an inverted-residual spring block with a KxK depthwise conv) carries its hidden
width in channels; `skip` (identity) carries none. Whether an `Arch` fits a space (layer
count, ops and widths allowed per layer) is checked by `SearchSpace.validate`; this
module only checks the encoding itself.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

__all__ = ["SKIP", "Arch", "LayerChoice", "kernel_size"]

SKIP = "skip"
_KERNEL_OP = re.compile(r"^k([1-9][0-9]*)$")


def kernel_size(op: str) -> int | None:
    """Depthwise kernel size of `op`: `"k5"` -> 5, `"skip"` -> None.

    Raises ValueError for any other name; kernel ops need an odd size >= 3 so that
    "same" padding (k // 2) keeps the spatial size at stride 1."""
    if op == SKIP:
        return None
    m = _KERNEL_OP.match(op) if isinstance(op, str) else None
    if m is None:
        raise ValueError(f"unknown op {op!r}: expected 'skip' or 'k<odd kernel size>' such as 'k3'")
    k = int(m.group(1))
    if k < 3 or k % 2 == 0:
        raise ValueError(f"op {op!r}: the kernel size must be odd and >= 3")
    return k


@dataclass(frozen=True, order=True)
class LayerChoice:
    """The choice for one searchable layer: `op` and, for kernel ops, the hidden
    `width` (channels of the expanded feature map). `skip` has `width` None."""

    op: str
    width: int | None = None

    def __post_init__(self):
        k = kernel_size(self.op)
        if k is None:
            if self.width is not None:
                raise ValueError(f"op 'skip' takes no width, got width={self.width!r}")
        elif isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"op {self.op!r} needs a positive integer width, got {self.width!r}")

    @property
    def kernel_size(self) -> int | None:
        """Depthwise kernel size, None for skip."""
        return kernel_size(self.op)

    @property
    def is_skip(self) -> bool:
        return self.op == SKIP

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op} if self.width is None else {"op": self.op, "width": self.width}

    @classmethod
    def from_dict(cls, d: Any, where: str = "layer") -> "LayerChoice":
        """From `{"op": ..., "width": ...}`; errors name `where`."""
        if isinstance(d, LayerChoice):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object like {{'op': 'k3', 'width': 48}}, got {d!r}")
        unknown = set(d) - {"op", "width"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: 'op', 'width'")
        if "op" not in d:
            raise ValueError(f"{where}: missing key 'op'")
        try:
            return cls(d["op"], d.get("width"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def __str__(self) -> str:
        return self.op if self.width is None else f"{self.op}/{self.width}"


@dataclass(frozen=True, order=True, init=False)
class Arch:
    """An architecture of the space named `space`: `layers[i]` is the `LayerChoice` of
    searchable layer i. Immutable; equal archs hash equal; ordering is lexicographic
    (space name, then layers), which only serves to sort deterministically."""

    space: str
    layers: tuple[LayerChoice, ...]

    def __init__(self, space: str, layers: Iterable[LayerChoice | dict | tuple]):
        if not isinstance(space, str) or not space:
            raise ValueError(f"arch: 'space' must be a non-empty string, got {space!r}")
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise ValueError(f"arch: 'layers' must be a list, got {layers!r}")
        choices = []
        for i, c in enumerate(layers):
            if isinstance(c, tuple) and not isinstance(c, LayerChoice):
                try:
                    c = LayerChoice(*c)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"arch layer {i}: {e}") from None
            choices.append(LayerChoice.from_dict(c, where=f"arch layer {i}"))
        if not choices:
            raise ValueError("arch: 'layers' is empty")
        object.__setattr__(self, "space", space)
        object.__setattr__(self, "layers", tuple(choices))

    # -- sequence-like access
    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerChoice]:
        return iter(self.layers)

    def __getitem__(self, i: int) -> LayerChoice:
        return self.layers[i]

    def replace(self, index: int, choice: LayerChoice | dict) -> "Arch":
        """A copy with layer `index` set to `choice`."""
        layers = list(self.layers)
        layers[index] = LayerChoice.from_dict(choice, where=f"arch layer {index}")
        return Arch(self.space, layers)

    # -- JSON
    def to_dict(self) -> dict[str, Any]:
        return {"space": self.space, "layers": [c.to_dict() for c in self.layers]}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Any) -> "Arch":
        if not isinstance(d, dict):
            raise ValueError(f"arch: expected an object with 'space' and 'layers', got {type(d).__name__}")
        missing = {"space", "layers"} - set(d)
        if missing:
            raise ValueError(f"arch: missing key(s) {sorted(missing)}")
        unknown = set(d) - {"space", "layers"}
        if unknown:
            raise ValueError(f"arch: unknown key(s) {sorted(unknown)}; allowed: 'space', 'layers'")
        if not isinstance(d["layers"], list):
            raise ValueError(f"arch: 'layers' must be a list, got {type(d['layers']).__name__}")
        return cls(d["space"], d["layers"])

    @classmethod
    def from_json(cls, text: str | bytes | dict) -> "Arch":
        """From a JSON string (or an already parsed dict)."""
        if isinstance(text, dict):
            return cls.from_dict(text)
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"arch: invalid JSON: {e}") from None
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            f.write(self.to_json(indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Arch":
        with open(path) as f:
            text = f.read()
        try:
            return cls.from_json(text)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from None

    def __str__(self) -> str:
        return f"{self.space}:" + ",".join(str(c) for c in self.layers)
