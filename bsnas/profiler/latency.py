"""Latency profiling: a per-choice latency table and how well its sums predict.

`measure_table(space, device)` times, on the current device, the static (exported)
form of every searchable choice, i.e. every (layer, kernel op, width), on its own input
`[batch_size, in_channels, h, w]` of that layer, plus the fixed stem (with the first
block) and head: warm-up runs, then the median of `repeats` timed runs (CUDA events on
a GPU, `time.perf_counter` on a CPU), in `rounds` interleaved passes whose median is
kept. Skip costs 0. The table is JSON::

    {"format": "bsnas-latency-table/1", "space": "tiny", "device": "cpu",
     "device_name": "...", "threads": 2, "torch": "2.x", "resolution": 32,
     "batch_size": 1, "dtype": "float32", "warmup": 5, "repeats": 10, "rounds": 3,
     "unit": "ms",
     "fixed_ms": {"stem": 0.05, "head": 0.03},
     "layers": [{"k3": {"16": 0.04, "32": 0.05, ...}, "k5": {...}, "skip": 0.0}, ...]}

`bsnas.profiler.cost.latency(table, arch)` sums it for an arch (milliseconds).

`evaluate_table(space, table, archs=N)` measures N random architectures end to end (the
exported model) and reports Pearson's r and Kendall's tau-b between predicted and
measured latency. Command line::

    python -m bsnas latency-report --space tiny --archs 50 --out report.json [--table T.json]
    python -m bsnas latency-table --space tiny --device cpu --out table.json
"""
from __future__ import annotations

import math
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from bsnas.export import export
from bsnas.nn.static import static_block, static_fixed
from bsnas.profiler import cost
from bsnas.space import SKIP, SearchSpace, as_rng, load_space
from bsnas.supernet import Supernet

__all__ = ["evaluate_table", "kendall_tau", "measure_table", "pearson", "resolve_device", "time_module"]

TABLE_FORMAT = "bsnas-latency-table/1"


def resolve_device(device: str | torch.device) -> torch.device:
    """`"cpu"` or `"cuda"`/`"cuda:N"`, checked to be usable here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    return dev


@torch.inference_mode()
def time_module(module: nn.Module, x: torch.Tensor, warmup: int = 10, repeats: int = 30) -> float:
    """Median wall time of `module(x)` in milliseconds, after `warmup` untimed runs.
    On CUDA each run is timed with a pair of CUDA events."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    for _ in range(warmup):
        module(x)
    times = []
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            module(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            module(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:  # Linux: the CPU model; platform.processor() is often empty there
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_table(space: SearchSpace | str, device: str | torch.device = "cpu", batch_size: int = 1,
                  resolution: int | None = None, warmup: int = 5, repeats: int = 10, rounds: int = 3,
                  supernet: Supernet | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the latency table of `space` on `device` (format in the module doc).

    Inputs are float32 `[batch_size, C, h, w]` with the layer's channels and spatial
    size at `resolution` (default the space's). Each entry is the median over `rounds`
    passes over the whole table of the median of `repeats` timed runs (after `warmup`
    runs): interleaving the passes spreads an entry's samples over time, so a burst of
    load from another process spoils one sample, not the entry. Weights come from
    `supernet` (default a freshly initialised one; latency does not depend on their
    values). `progress` is called with a line per round."""
    space = load_space(space)
    dev = resolve_device(device)
    resolution = space.resolution if resolution is None else resolution
    if batch_size < 1 or resolution < 1 or rounds < 1:
        raise ValueError(f"need batch_size, resolution and rounds >= 1, got {batch_size}, {resolution} "
                         f"and {rounds}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    net = (supernet if supernet is not None else Supernet(space)).to(dev).eval()
    stem, first, head, classifier = static_fixed(net)
    stem_part = nn.Sequential(stem, first) if first is not None else stem
    head_part = nn.Sequential(head, net.pool, nn.Flatten(1), net.dropout, classifier).eval()

    # the input of every layer, and the list of what to time: (key, module factory, input)
    x = torch.randn(batch_size, space.in_channels, resolution, resolution, device=dev)
    jobs = [(("fixed", "stem"), lambda: stem_part, x)]
    with torch.inference_mode():
        x = stem_part(x)
        for spec in space.layers:
            for op in spec.kernel_ops:
                for width in spec.widths:
                    jobs.append(((spec.index, op, width),
                                 lambda i=spec.index, op=op, w=width: static_block(net, i, op, w).eval(), x))
            x = static_block(net, spec.index, spec.kernel_ops[0], spec.widths[0]).eval()(x)
    jobs.append((("fixed", "head"), lambda: head_part, x))

    samples: dict[tuple, list[float]] = {key: [] for key, _, _ in jobs}
    for r in range(rounds):
        for key, make, inp in jobs:
            samples[key].append(time_module(make(), inp, warmup, repeats))
        if progress is not None:
            progress(f"round {r + 1}/{rounds}: {len(jobs)} entries measured")
    ms = {key: float(statistics.median(v)) for key, v in samples.items()}

    layers = []
    for spec in space.layers:
        entry: dict[str, Any] = {op: {str(w): ms[(spec.index, op, w)] for w in spec.widths}
                                 for op in spec.kernel_ops}
        if spec.allows_skip:
            entry[SKIP] = 0.0
        layers.append(entry)
    return {
        "format": TABLE_FORMAT, "space": space.name, "device": dev.type, "device_name": _device_name(dev),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "resolution": resolution,
        "batch_size": batch_size, "dtype": "float32", "warmup": warmup, "repeats": repeats,
        "rounds": rounds, "unit": "ms",
        "fixed_ms": {"stem": ms[("fixed", "stem")], "head": ms[("fixed", "head")]}, "layers": layers,
    }


# --------------------------------------------------------------------------- statistics


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation coefficient; nan when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need two sequences of the same length >= 2, got {len(x)} and {len(y)}")
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either sequence accounted for, as scipy's default);
    nan when either side is constant. O(n^2), fine for a few thousand points."""
    n = len(x)
    if n != len(y) or n < 2:
        raise ValueError(f"need two sequences of the same length >= 2, got {n} and {len(y)}")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx = (x[i] > x[j]) - (x[i] < x[j])
            dy = (y[i] > y[j]) - (y[i] < y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else math.nan


# --------------------------------------------------------------------------- evaluation


def evaluate_table(space: SearchSpace | str, table: dict[str, Any], archs: int = 50, seed: int = 0,
                   device: str | torch.device = "cpu", warmup: int = 5, repeats: int = 10, rounds: int = 3,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """How well `cost.latency(table, arch)` predicts the measured end-to-end latency of
    the exported model, over `archs` architectures sampled uniformly with `seed`.

    Measures at the table's batch size and resolution, each arch as the median over
    `rounds` interleaved passes of the median of `repeats` runs (as `measure_table`).
    Returns a JSON-serialisable report: `pearson`, `kendall_tau` (predicted vs
    measured), `kendall_tau_macs` (MACs vs measured, for comparison),
    `mean_abs_rel_error` and per-arch `rows` (arch, MACs, predicted_ms, measured_ms)."""
    space = load_space(space)
    table = cost.load_latency_table(table)
    if table["space"] != space.name:
        raise ValueError(f"latency table is for space {table['space']!r}, not {space.name!r}")
    if archs < 2 or rounds < 1:
        raise ValueError(f"need archs >= 2 and rounds >= 1, got {archs} and {rounds}")
    dev = resolve_device(device)
    if table.get("device") not in (None, dev.type):
        raise ValueError(f"latency table was measured on {table['device']!r}, evaluating on {dev.type!r}")
    resolution, batch = table.get("resolution", space.resolution), table.get("batch_size", 1)
    net = Supernet(space).to(dev).eval()
    rng = as_rng(seed)
    sampled = [space.sample(rng) for _ in range(archs)]
    x = torch.randn(batch, space.in_channels, resolution, resolution, device=dev)
    samples: list[list[float]] = [[] for _ in sampled]
    for r in range(rounds):
        for i, arch in enumerate(sampled):  # exported anew each round: bounded memory
            samples[i].append(time_module(export(net, arch), x, warmup, repeats))
        if progress is not None:
            progress(f"round {r + 1}/{rounds}: {archs} archs measured")
    rows = [{"arch": arch.to_dict(), "macs": cost.flops(space, arch, resolution),
             "predicted_ms": cost.latency(table, arch), "measured_ms": float(statistics.median(t))}
            for arch, t in zip(sampled, samples)]
    pred = [r["predicted_ms"] for r in rows]
    meas = [r["measured_ms"] for r in rows]
    macs = [r["macs"] for r in rows]
    return {
        "space": space.name, "device": dev.type, "device_name": _device_name(dev),
        "threads": torch.get_num_threads(), "resolution": resolution, "batch_size": batch,
        "archs": archs, "seed": seed, "warmup": warmup, "repeats": repeats, "rounds": rounds,
        "pearson": pearson(pred, meas), "kendall_tau": kendall_tau(pred, meas),
        "kendall_tau_macs": kendall_tau(macs, meas),
        "mean_abs_rel_error": sum(abs(p - m) / m for p, m in zip(pred, meas)) / len(rows),
        "rows": rows,
    }

