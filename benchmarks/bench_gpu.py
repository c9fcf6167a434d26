#!/usr/bin/env python3
"""GPU benchmark of bsnas's masked convolutions against the two usual ways of running a
variable-width layer in PyTorch:

- slicing: `F.conv2d(x, w[:c], ...)` on the active channels (PyTorch's native / cuDNN
  kernels; the weight slice is a view, its gradient a scatter into the full weight);
- masking: the full-width convolution on a full-width input, multiplied by a 0/1
  channel mask.

Measured on CUDA with torch.cuda.Event pairs after warm-up; every number is the median
of `--reps` repeats. Before each batch of repeats the stream is held by a calibrated
`torch.cuda._sleep` so that the timed work is queued back to back and the events time
the GPU, not Python's launch overhead.

(a) the device-to-device copy bandwidth of a 1 GiB tensor (bytes read + written / time),
    the ceiling for a memory-bound kernel;
(b) masked_dwconv2d forward and forward+backward at N=64 on the MobileNetV2-like shapes
    112x112/96, 56x56/144, 28x28/240, 14x14/480, 7x7/960, k 3/5/7, active widths
    25/50/100% of C_max, stride 1, float32 and bfloat16, NCHW and channels_last; our
    forward's achieved bandwidth (input read once + output written once) as % of (a);
(c) bn_act_dwconv2d (relu6; the spring block's fused BN + activation + depthwise +
    statistics op) forward and forward+backward against the unfused PyTorch sequence
    F.batch_norm (inference form: the same per-channel affine) -> F.relu6 -> F.conv2d on
    weight[:c] -> y.sum / y.square().sum, at the shapes of (b) with k 3/5 and widths
    50/100% (gradients flow from all three outputs);
(d) masked_pwconv2d forward and forward+backward at the matching expand (C_max/6 -> c)
    and project (c -> C_max/6) shapes.

The time budget is shared between (b), (c) and (d) (45/20/35%, unused time passing on
to the next section), so that every section reports something.

Ratio columns are baseline time / our time (> 1: bsnas is faster). Writes
OUT/gpu_ops.md (the name its table has under benchmarks/results/) and OUT/gpu_ops.json
(raw medians, ms) and prints the markdown.
float32 runs with TF32 off (torch.backends.{cuda.matmul,cudnn}.allow_tf32 = False) so
all three compute in full float32.

    python3 benchmarks/bench_gpu.py --out /tmp/bsnas_out [--quick] [--budget SECONDS]
        [--only dw bnact pw] [--dtypes float32 bfloat16] [--layouts nchw channels_last]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bsnas  # noqa: E402

N_BATCH = 64
DW_SHAPES = [(112, 96), (56, 144), (28, 240), (14, 480), (7, 960)]  # (H = W, C_max)
KERNELS = [3, 5, 7]
FRACTIONS = [0.25, 0.5, 1.0]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
EXPAND = 6  # MobileNetV2 expansion ratio: the pointwise convs map C_max/6 <-> c
BNACT_KERNELS = [3, 5]
BNACT_FRACTIONS = [0.5, 1.0]
SECTION_SHARES = {"dw": 0.45, "bnact": 0.20, "pw": 0.35}
BN_EPS = 1e-5


class OutOfBudget(Exception):
    pass


class Timer:
    """Median GPU time (ms) of a callable, timed with CUDA events; raises OutOfBudget
    past the deadline (results gathered so far are kept by the callers' lists)."""

    def __init__(self, reps: int, warmup: int, deadline: float):
        self.reps, self.warmup, self.deadline = reps, warmup, deadline
        # Calibrate torch.cuda._sleep: cycles per millisecond.
        torch.cuda._sleep(1000)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 20_000_000
        s.record()
        torch.cuda._sleep(cycles)
        e.record()
        torch.cuda.synchronize()
        self.cycles_per_ms = cycles / max(s.elapsed_time(e), 1e-3)

    def __call__(self, fn) -> float:
        if time.monotonic() > self.deadline:
            raise OutOfBudget()
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        cpu_ms = (time.perf_counter() - t0) / 3 * 1e3  # host time to enqueue one call
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        hold_ms = min(200.0, 1.5 * cpu_ms * self.reps + 0.05)
        torch.cuda._sleep(int(hold_ms * self.cycles_per_ms))
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth(timer: Timer) -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    nbytes = 1 << 30
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    ms = timer(lambda: b.copy_(a))
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3)


def _grad_fn(forward, inputs):
    """Forward + backward of `forward(*inputs)` w.r.t. `inputs` with a fixed grad_out."""
    with torch.no_grad():
        gy = torch.randn_like(forward(*inputs))

    def run():
        y = forward(*inputs)
        return torch.autograd.grad(y, inputs, gy)

    return run


def _grad_fn_multi(forward, inputs):
    """Forward + backward of a multi-output `forward(*inputs)` with fixed upstream
    gradients on every output."""
    with torch.no_grad():
        grads = [torch.randn_like(o) for o in forward(*inputs)]

    def run():
        return torch.autograd.grad(forward(*inputs), inputs, grads)

    return run


def _max_rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def bench_dw(timer, copy_bw, quick, log, rows):
    kernels = [3] if quick else KERNELS
    for dname, dtype in DTYPES.items():
        for lname, fmt in LAYOUTS.items():
            for hw, c_max in DW_SHAPES:
                x_full = torch.randn(N_BATCH, c_max, hw, hw, device="cuda", dtype=dtype)
                x_full = x_full.contiguous(memory_format=fmt)
                for k in kernels:
                    w = torch.randn(c_max, 1, k, k, device="cuda", dtype=dtype)
                    p = k // 2
                    for frac in FRACTIONS:
                        c = max(1, round(c_max * frac))
                        rec = dict(op="dw", dtype=dname, layout=lname, hw=hw, c_max=c_max, k=k,
                                   width=c)
                        try:
                            x = x_full[:, :c].contiguous(memory_format=fmt)
                            mask = torch.zeros(1, c_max, 1, 1, device="cuda", dtype=dtype)
                            mask[:, :c] = 1
                            ours = lambda x_, w_: bsnas.masked_dwconv2d(x_, w_, c, 1, p, 1)  # noqa: E731,B023
                            sliced = lambda x_, w_: F.conv2d(x_, w_[:c], None, 1, p, 1, c)  # noqa: E731,B023
                            masked = lambda x_, w_: F.conv2d(x_, w_, None, 1, p, 1, c_max) * mask  # noqa: E731,B023
                            with torch.no_grad():
                                y = ours(x, w)
                                rec["max_rel_err_vs_slice"] = _max_rel_err(y, sliced(x, w))
                                rec["bytes_fwd"] = (x.numel() + y.numel()) * x.element_size()
                                del y
                                rec["ours_fwd"] = timer(lambda: ours(x, w))  # noqa: B023
                                rec["slice_fwd"] = timer(lambda: sliced(x, w))  # noqa: B023
                                rec["mask_fwd"] = timer(lambda: masked(x_full, w))  # noqa: B023
                            xg, wg = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
                            xfg = x_full.detach().requires_grad_(True)
                            rec["ours_fwdbwd"] = timer(_grad_fn(ours, (xg, wg)))
                            rec["slice_fwdbwd"] = timer(_grad_fn(sliced, (xg, wg)))
                            rec["mask_fwdbwd"] = timer(_grad_fn(masked, (xfg, wg)))
                            del x, xg, wg, xfg, mask
                        except OutOfBudget:
                            raise
                        except Exception as e:  # noqa: BLE001 (record and go on)
                            rec["error"] = f"{type(e).__name__}: {e}"[:300]
                        if "ours_fwd" in rec:
                            bw = rec["bytes_fwd"] / (rec["ours_fwd"] * 1e-3)
                            rec["fwd_bw_pct_of_copy"] = 100 * bw / copy_bw
                        rows.append(rec)
                        log(rec)
                del x_full
                torch.cuda.empty_cache()


def _bnact_case(timer, rec, dtype, fmt, hw, c, w):
    """Times one bn_act_dwconv2d configuration into `rec`."""
    from bsnas.ops import bn_act_dwconv2d

    p = w.shape[-1] // 2
    z = torch.randn(N_BATCH, c, hw, hw, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    scale = torch.rand(c, device="cuda", dtype=dtype) + 0.5
    shift = torch.randn(c, device="cuda", dtype=dtype)
    # Eval BN with mean 0 and var + eps = 1 is z * scale + shift (CUDA batch_norm rejects
    # eps = 0).
    mean0 = torch.zeros(c, device="cuda", dtype=dtype)
    var1 = torch.full((c,), 1.0 - BN_EPS, device="cuda", dtype=dtype)

    def ours(z_, s_, b_, w_):
        return bn_act_dwconv2d(z_, s_, b_, w_, c, 1, p, 1, "relu6")

    def unfused(z_, s_, b_, w_):
        u = F.batch_norm(z_, mean0, var1, s_, b_, False, 0.0, BN_EPS)  # = z * s + b
        y = F.conv2d(F.relu6(u), w_[:c], None, 1, p, 1, c)
        return y, y.sum((0, 2, 3)), y.square().sum((0, 2, 3))

    inputs = (z, scale, shift, w)
    with torch.no_grad():
        got, want = ours(*inputs), unfused(*inputs)
        rec["max_rel_err_vs_unfused"] = max(_max_rel_err(a, b) for a, b in zip(got, want))
        rec["bytes_fwd"] = (z.numel() + got[0].numel()) * z.element_size()
        del got, want
        rec["ours_fwd"] = timer(lambda: ours(*inputs))
        rec["unfused_fwd"] = timer(lambda: unfused(*inputs))
    grad_inputs = tuple(t.detach().requires_grad_(True) for t in inputs)
    rec["ours_fwdbwd"] = timer(_grad_fn_multi(ours, grad_inputs))
    rec["unfused_fwdbwd"] = timer(_grad_fn_multi(unfused, grad_inputs))


def bench_bnact(timer, copy_bw, quick, log, rows):
    """bn_act_dwconv2d (relu6) against the unfused sequence; see the module docstring."""
    kernels = [3] if quick else BNACT_KERNELS
    for dname, dtype in DTYPES.items():
        for lname, fmt in LAYOUTS.items():
            for hw, c_max in DW_SHAPES:
                for k in kernels:
                    w = torch.randn(c_max, 1, k, k, device="cuda", dtype=dtype) / k
                    for frac in BNACT_FRACTIONS:
                        c = max(1, round(c_max * frac))
                        rec = dict(op="bnact", dtype=dname, layout=lname, hw=hw, c_max=c_max,
                                   k=k, width=c)
                        try:
                            _bnact_case(timer, rec, dtype, fmt, hw, c, w)
                        except OutOfBudget:
                            raise
                        except Exception as e:  # noqa: BLE001
                            rec["error"] = f"{type(e).__name__}: {e}"[:300]
                        if "ours_fwd" in rec:
                            bw = rec["bytes_fwd"] / (rec["ours_fwd"] * 1e-3)
                            rec["fwd_bw_pct_of_copy"] = 100 * bw / copy_bw
                        rows.append(rec)
                        log(rec)
                torch.cuda.empty_cache()


def bench_pw(timer, quick, log, rows):
    for dname, dtype in DTYPES.items():
        for lname, fmt in LAYOUTS.items():
            for hw, c_max in DW_SHAPES[: 2 if quick else None]:
                narrow = c_max // EXPAND
                for kind in ("expand", "project"):
                    cin_max, cout_max = (narrow, c_max) if kind == "expand" else (c_max, narrow)
                    w = torch.randn(cout_max, cin_max, 1, 1, device="cuda", dtype=dtype)
                    w.mul_(cin_max ** -0.5)
                    x_full = torch.randn(N_BATCH, cin_max, hw, hw, device="cuda", dtype=dtype)
                    x_full = x_full.contiguous(memory_format=fmt)
                    for frac in FRACTIONS:
                        c = max(1, round(c_max * frac))
                        in_w, out_w = (cin_max, c) if kind == "expand" else (c, cout_max)
                        rec = dict(op="pw", kind=kind, dtype=dname, layout=lname, hw=hw,
                                   cin_max=cin_max, cout_max=cout_max, in_w=in_w, out_w=out_w)
                        try:
                            x = x_full[:, :in_w].contiguous(memory_format=fmt)
                            ours = lambda x_, w_: bsnas.masked_pwconv2d(x_, w_, in_w, out_w)  # noqa: E731,B023
                            sliced = lambda x_, w_: F.conv2d(x_, w_[:out_w, :in_w])  # noqa: E731,B023
                            if kind == "expand":  # mask the output channels
                                mask = torch.zeros(1, cout_max, 1, 1, device="cuda", dtype=dtype)
                                mask[:, :out_w] = 1
                                masked = lambda x_, w_: F.conv2d(x_, w_) * mask  # noqa: E731,B023
                            else:  # mask the input channels
                                mask = torch.zeros(1, cin_max, 1, 1, device="cuda", dtype=dtype)
                                mask[:, :in_w] = 1
                                masked = lambda x_, w_: F.conv2d(x_ * mask, w_)  # noqa: E731,B023
                            with torch.no_grad():
                                y = ours(x, w)
                                rec["max_rel_err_vs_slice"] = _max_rel_err(y, sliced(x, w))
                                del y
                                rec["ours_fwd"] = timer(lambda: ours(x, w))  # noqa: B023
                                rec["slice_fwd"] = timer(lambda: sliced(x, w))  # noqa: B023
                                rec["mask_fwd"] = timer(lambda: masked(x_full, w))  # noqa: B023
                            xg, wg = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
                            xfg = x_full.detach().requires_grad_(True)
                            rec["ours_fwdbwd"] = timer(_grad_fn(ours, (xg, wg)))
                            rec["slice_fwdbwd"] = timer(_grad_fn(sliced, (xg, wg)))
                            rec["mask_fwdbwd"] = timer(_grad_fn(masked, (xfg, wg)))
                            del x, xg, wg, xfg, mask
                        except OutOfBudget:
                            raise
                        except Exception as e:  # noqa: BLE001
                            rec["error"] = f"{type(e).__name__}: {e}"[:300]
                        rows.append(rec)
                        log(rec)
                    del x_full, w
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- report


def _ratio(rec, base, ours):
    if base in rec and ours in rec and rec[ours] > 0:
        return f"{rec[base] / rec[ours]:.2f}"
    return "-"


def _us(rec, key):
    return f"{rec[key] * 1e3:.1f}" if key in rec else "-"


def _geomean(vals):
    vals = [v for v in vals if v > 0]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else float("nan")


def _summary(rows, group_keys):
    """Geometric-mean ratios per group."""
    groups = {}
    for r in rows:
        if "ours_fwdbwd" not in r:
            continue
        groups.setdefault(tuple(r[k] for k in group_keys), []).append(r)
    out = ["| " + " | ".join(group_keys) + " | n | slice/ours fwd | mask/ours fwd | "
           "slice/ours f+b | mask/ours f+b |",
           "|" + "---|" * (len(group_keys) + 5)]
    for key, rs in sorted(groups.items()):
        g = [_geomean([r[b] / r[o] for r in rs]) for b, o in (
            ("slice_fwd", "ours_fwd"), ("mask_fwd", "ours_fwd"),
            ("slice_fwdbwd", "ours_fwdbwd"), ("mask_fwdbwd", "ours_fwdbwd"))]
        out.append("| " + " | ".join(map(str, key)) + f" | {len(rs)} | "
                   + " | ".join(f"{v:.2f}" for v in g) + " |")
    return out


def _flag(r, key="max_rel_err_vs_slice"):
    if "error" in r:
        return " **ERROR** " + r["error"].replace("|", "/")
    tol = 1e-4 if r["dtype"] == "float32" else 3e-2
    if r.get(key, 0.0) > tol:
        return f" **MISMATCH {r[key]:.2e}**"
    return ""


def _bnact_summary(rows):
    groups = {}
    for r in rows:
        if "ours_fwdbwd" in r and "unfused_fwdbwd" in r:
            groups.setdefault((r["dtype"], r["layout"]), []).append(r)
    out = ["| dtype | layout | n | unfused/ours fwd | unfused/ours f+b |", "|---|---|---|---|---|"]
    for key, rs in sorted(groups.items()):
        g = [_geomean([r[b] / r[o] for r in rs]) for b, o in (
            ("unfused_fwd", "ours_fwd"), ("unfused_fwdbwd", "ours_fwdbwd"))]
        out.append(f"| {key[0]} | {key[1]} | {len(rs)} | {g[0]:.2f} | {g[1]:.2f} |")
    return out


def to_markdown(meta, dw_rows, pw_rows, bnact_rows=()):
    md = ["# bsnas GPU benchmark", ""]
    md.append(f"- device: {meta['device']}; torch {meta['torch']}, CUDA {meta['cuda']}, "
              f"cuDNN {meta['cudnn']}; TF32 off; cudnn.benchmark={meta['cudnn_benchmark']}")
    md.append(f"- median of {meta['reps']} repeats after {meta['warmup']} warm-up calls; "
              "times in microseconds; ratios are baseline / bsnas (> 1: bsnas faster)")
    md.append(f"- device-to-device copy of 1 GiB: **{meta['copy_GBps']:.0f} GB/s** "
              "(read + write), the bandwidth ceiling used for the BW% column")
    md.append(f"- batch N = {N_BATCH}, stride 1, 'same' padding; wall time {meta['wall_s']:.0f} s"
              + ("; **stopped early by the time budget** in: "
                 + ", ".join(meta.get("truncated_sections", [])) if meta.get("truncated") else ""))
    md.append("")
    if dw_rows:
        md += ["## masked_dwconv2d: summary (geometric means)", ""]
        md += _summary(dw_rows, ["dtype", "layout"]) + [""]
        md += _summary(dw_rows, ["dtype", "layout", "k"]) + [""]
        md += ["## masked_dwconv2d", "",
               "| dtype | layout | HxW | C_max | k | width | fwd us | slice/ours | mask/ours "
               "| fwd BW % | f+b us | slice/ours | mask/ours |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in dw_rows:
            bw = f"{r['fwd_bw_pct_of_copy']:.0f}" if "fwd_bw_pct_of_copy" in r else "-"
            md.append(
                f"| {r['dtype']} | {r['layout']} | {r['hw']}x{r['hw']} | {r['c_max']} | {r['k']} "
                f"| {r['width']} | {_us(r, 'ours_fwd')} | {_ratio(r, 'slice_fwd', 'ours_fwd')} "
                f"| {_ratio(r, 'mask_fwd', 'ours_fwd')} | {bw} | {_us(r, 'ours_fwdbwd')} "
                f"| {_ratio(r, 'slice_fwdbwd', 'ours_fwdbwd')} "
                f"| {_ratio(r, 'mask_fwdbwd', 'ours_fwdbwd')} |{_flag(r)}")
        md.append("")
    if bnact_rows:
        md += ["## bn_act_dwconv2d: summary (geometric means)", ""]
        md += _bnact_summary(bnact_rows) + [""]
        md += ["## bn_act_dwconv2d (relu6; unfused: F.batch_norm -> F.relu6 -> F.conv2d on "
               "weight[:c] -> y.sum, y.square().sum)", "",
               "| dtype | layout | HxW | C_max | k | width | fwd us | unfused/ours | fwd BW % "
               "| f+b us | unfused/ours |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in bnact_rows:
            bw = f"{r['fwd_bw_pct_of_copy']:.0f}" if "fwd_bw_pct_of_copy" in r else "-"
            md.append(
                f"| {r['dtype']} | {r['layout']} | {r['hw']}x{r['hw']} | {r['c_max']} | {r['k']} "
                f"| {r['width']} | {_us(r, 'ours_fwd')} | {_ratio(r, 'unfused_fwd', 'ours_fwd')} "
                f"| {bw} | {_us(r, 'ours_fwdbwd')} | {_ratio(r, 'unfused_fwdbwd', 'ours_fwdbwd')} "
                f"|{_flag(r, 'max_rel_err_vs_unfused')}")
        md.append("")
    if pw_rows:
        md += ["## masked_pwconv2d: summary (geometric means)", ""]
        md += _summary(pw_rows, ["dtype", "layout", "kind"]) + [""]
        md += ["## masked_pwconv2d (expand: C_max/6 -> width; project: width -> C_max/6; "
               "masking multiplies the output (expand) or input (project) by a channel mask)",
               "",
               "| dtype | layout | kind | HxW | W [out_max, in_max] | active [out, in] | fwd us "
               "| slice/ours | mask/ours | f+b us | slice/ours | mask/ours |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in pw_rows:
            md.append(
                f"| {r['dtype']} | {r['layout']} | {r['kind']} | {r['hw']}x{r['hw']} "
                f"| [{r['cout_max']}, {r['cin_max']}] | [{r['out_w']}, {r['in_w']}] "
                f"| {_us(r, 'ours_fwd')} | {_ratio(r, 'slice_fwd', 'ours_fwd')} "
                f"| {_ratio(r, 'mask_fwd', 'ours_fwd')} | {_us(r, 'ours_fwdbwd')} "
                f"| {_ratio(r, 'slice_fwdbwd', 'ours_fwdbwd')} "
                f"| {_ratio(r, 'mask_fwdbwd', 'ours_fwdbwd')} |{_flag(r)}")
        md.append("")
    return "\n".join(md)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/bsnas_out"),
                    help="output directory (gpu_ops.md, gpu_ops.json)")
    ap.add_argument("--quick", action="store_true",
                    help="k=3 only, two pointwise shapes, 10 repeats")
    ap.add_argument("--reps", type=int, default=None, help="timed repeats (default 50, quick 10)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 5, quick 2)")
    ap.add_argument("--budget", type=float, default=210.0,
                    help="seconds; stops starting new measurements after this and reports "
                    "what it has (default 210)")
    ap.add_argument("--only", nargs="+", choices=list(SECTION_SHARES), default=None,
                    help="run only these sections (default: all)")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                    help="only these dtypes (default: all)")
    ap.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=None,
                    help="only these layouts (default: all)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="let cuDNN autotune the baselines (slower to run)")
    args = ap.parse_args()
    for table, keep in ((DTYPES, args.dtypes), (LAYOUTS, args.layouts)):
        for name in [n for n in table if keep is not None and n not in keep]:
            del table[name]
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device")
    if not bsnas.cuda_compiled():
        sys.exit("bench_gpu.py: bsnas._C was built without its CUDA kernels")
    os.makedirs(args.out, exist_ok=True)
    reps = args.reps or (10 if args.quick else 50)
    warmup = args.warmup or (2 if args.quick else 5)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)

    t_start = time.monotonic()
    timer = Timer(reps, warmup, deadline=t_start + args.budget)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), reps=reps,
                warmup=warmup, quick=args.quick, cudnn_benchmark=args.cudnn_benchmark,
                batch=N_BATCH)
    meta["copy_GBps"] = copy_bandwidth(timer) / 1e9
    print(f"copy bandwidth: {meta['copy_GBps']:.0f} GB/s", flush=True)

    dw_rows, pw_rows, bnact_rows = [], [], []
    end = t_start + args.budget

    def log(rec):
        keys = ("ours_fwd", "slice_fwd", "mask_fwd", "unfused_fwd", "ours_fwdbwd",
                "slice_fwdbwd", "mask_fwdbwd", "unfused_fwdbwd")
        shape = {k: rec[k] for k in rec if k in ("op", "kind", "dtype", "layout", "hw", "k",
                                                  "width", "in_w", "out_w")}
        times = " ".join(f"{k}={rec[k] * 1e3:.1f}us" for k in keys if k in rec)
        print(shape, times, rec.get("error", ""), flush=True)

    def write():
        meta["wall_s"] = time.monotonic() - t_start
        md = to_markdown(meta, dw_rows, pw_rows, bnact_rows)
        with open(os.path.join(args.out, "gpu_ops.md"), "w") as f:
            f.write(md + "\n")
        with open(os.path.join(args.out, "gpu_ops.json"), "w") as f:
            json.dump(dict(meta=meta, dwconv=dw_rows, bnact=bnact_rows, pwconv=pw_rows), f,
                      indent=1)
        return md

    copy_bw = meta["copy_GBps"] * 1e9
    sections = [("dw", lambda: bench_dw(timer, copy_bw, args.quick, log, dw_rows)),
                ("bnact", lambda: bench_bnact(timer, copy_bw, args.quick, log, bnact_rows)),
                ("pw", lambda: bench_pw(timer, args.quick, log, pw_rows))]
    sections = [(n, f) for n, f in sections if args.only is None or n in args.only]
    try:
        for i, (name, run) in enumerate(sections):
            # This section's share of the time left (unused time passes on).
            now = time.monotonic()
            shares = [SECTION_SHARES[n] for n, _ in sections[i:]]
            timer.deadline = min(end, now + max(0.0, end - now) * shares[0] / sum(shares))
            try:
                run()
            except OutOfBudget:
                meta["truncated"] = True
                meta.setdefault("truncated_sections", []).append(name)
                print(f"bench_gpu.py: time share of section {name} used up, reporting partial "
                      "results", flush=True)
            write()
    finally:
        md = write()
    print()
    print(md)
    errors = [r for r in dw_rows + bnact_rows + pw_rows if "error" in r]
    if errors:
        print(f"bench_gpu.py: {len(errors)} configurations failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
