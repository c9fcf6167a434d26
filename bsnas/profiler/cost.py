"""Analytic cost model of an architecture: MACs, parameters, and a latency lookup.

`flops(space, arch)` counts multiply-accumulates of the convolutions and the linear
layer of the exported model (what `torch.utils.flop_counter.FlopCounterMode` counts,
divided by 2; BN, activations, pooling and residual additions are not counted).
`params(space, arch)` counts the exported model's parameters (conv weights, BN
weight+bias, linear weight+bias; BN running statistics are buffers, not parameters).
Both are exact for every architecture and run at tens of thousands of archs per second:
per-layer costs are tabulated once per (space, resolution) and an arch costs one lookup
per layer.

`latency(table, arch)` sums a latency table measured by `bsnas.profiler.latency`
(milliseconds).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any

from bsnas.space import SKIP, Arch, SearchSpace, kernel_size

__all__ = ["conv_out", "flops", "latency", "load_latency_table", "params"]


def conv_out(size: int, kernel: int, stride: int) -> int:
    """Output size of a conv with "same" padding kernel // 2: ceil(size / stride) for
    odd kernels."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def _mbconv(cin: int, cout: int, width: int, k: int, stride: int, h: int, w: int) -> tuple[int, int]:
    """(MACs, params) of expand 1x1 -> BN -> dw kxk (stride) -> BN -> project 1x1 -> BN
    on an `[cin, h, w]` input."""
    ho, wo = conv_out(h, k, stride), conv_out(w, k, stride)
    macs = h * w * cin * width + ho * wo * width * k * k + ho * wo * width * cout
    prm = cin * width + 2 * width + width * k * k + 2 * width + width * cout + 2 * cout
    return macs, prm


@dataclass(frozen=True)
class _Tables:
    fixed_macs: int
    fixed_params: int
    layers: tuple[dict, ...]  # per layer: {(op, width): (macs, params)}; skip: (op, None)


@functools.lru_cache(maxsize=64)
def _tables(space: SearchSpace, resolution: int) -> _Tables:
    h = w = resolution
    st = space.stem
    ho, wo = conv_out(h, st.kernel, st.stride), conv_out(w, st.kernel, st.stride)
    macs = ho * wo * space.in_channels * st.channels * st.kernel ** 2
    prm = space.in_channels * st.channels * st.kernel ** 2 + 2 * st.channels
    h, w, c = ho, wo, st.channels
    if space.first_block is not None:  # dw kxk + BN, project 1x1 + BN, stride 1
        fb = space.first_block
        macs += h * w * c * fb.kernel ** 2 + h * w * c * fb.channels
        prm += c * fb.kernel ** 2 + 2 * c + c * fb.channels + 2 * fb.channels
        c = fb.channels
    layers = []
    for spec in space.layers:
        table = {}
        for op in spec.kernel_ops:
            k = kernel_size(op)
            for width in spec.widths:
                table[(op, width)] = _mbconv(spec.in_channels, spec.out_channels, width, k, spec.stride, h, w)
        if spec.allows_skip:
            table[(SKIP, None)] = (0, 0)
        layers.append(table)
        # every op of a layer has the same stride and "same" padding, so the same output size
        h, w = conv_out(h, 3, spec.stride), conv_out(w, 3, spec.stride)
    hc = space.head.channels
    macs += h * w * space.last_channels * hc + hc * space.classes
    prm += space.last_channels * hc + 2 * hc + hc * space.classes + space.classes
    return _Tables(macs, prm, tuple(layers))


def _lookup(space: SearchSpace, arch: Arch, resolution: int | None, which: int) -> int:
    if resolution is None:
        resolution = space.resolution
    elif isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int (pixels), got {resolution!r}")
    t = _tables(space, resolution)
    if not isinstance(arch, Arch) or arch.space != space.name or len(arch.layers) != len(t.layers):
        space.validate(arch)  # raises with the reason
    total = t.fixed_macs if which == 0 else t.fixed_params
    try:
        for table, c in zip(t.layers, arch.layers):
            total += table[(c.op, c.width)][which]
    except KeyError:
        space.validate(arch)  # raises naming the layer and the reason
        raise
    return total


def flops(space: SearchSpace, arch: Arch, resolution: int | None = None) -> int:
    """Multiply-accumulates of one forward pass of `arch` on one
    `[in_channels, resolution, resolution]` image (default: the space's resolution).
    ValueError if `arch` is not in `space`."""
    return _lookup(space, arch, resolution, 0)


def params(space: SearchSpace, arch: Arch) -> int:
    """Number of parameters of the exported model of `arch`. ValueError if `arch` is
    not in `space`."""
    return _lookup(space, arch, None, 1)


# --------------------------------------------------------------------------- latency


def load_latency_table(table: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A latency table (see `bsnas.profiler.latency.measure_table` for its format) from a dict or
    a JSON file, checked for the keys `latency` needs."""
    if not isinstance(table, dict):
        path = os.fspath(table)
        with open(path) as f:
            try:
                table = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON: {e}") from None
    for key in ("space", "fixed_ms", "layers"):
        if key not in table:
            raise ValueError(f"latency table: missing key {key!r}")
    return table


def latency(table: dict[str, Any] | str | os.PathLike, arch: Arch) -> float:
    """Predicted latency of `arch` in milliseconds: the table's fixed parts plus, per
    layer, the measured time of the chosen (op, width). ValueError naming the layer if
    the table has no entry for a choice."""
    table = load_latency_table(table)
    if arch.space != table["space"]:
        raise ValueError(f"arch is for space {arch.space!r}, the latency table for {table['space']!r}")
    layers = table["layers"]
    if len(arch.layers) != len(layers):
        raise ValueError(f"arch has {len(arch.layers)} layers, the latency table {len(layers)}")
    total = float(sum(table["fixed_ms"].values()))
    for i, (entry, c) in enumerate(zip(layers, arch.layers)):
        try:
            total += entry[SKIP] if c.op == SKIP else entry[c.op][str(c.width)]
        except (KeyError, TypeError):
            raise ValueError(f"latency table: layer {i} has no entry for {c}") from None
    return total
