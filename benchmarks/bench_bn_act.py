"""bsnas.ops.bn_act (per-channel affine + activation, one-pass backward) against the eager
composite the spring block used before it: `F.relu6(torch.addcmul(shift, y, scale))`,
forward and forward + backward (gradients for y, scale and shift), at the depthwise
outputs of the MobileNet-like shapes of bench_gpu.py (widths 50% and 100% of C_max),
NCHW and channels_last; float32, and bfloat16 on CUDA. Medians of repeats after warm-up
(bench_block.py's timer: CUDA events on GPU, perf_counter on CPU; round-robin).
Usage:
    python benchmarks/bench_bn_act.py [--device cpu|cuda] [--batch N] [--reps R] [--out F.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # bench_block.py, and bsnas from a source tree
from bench_block import _timer, write_report  # noqa: E402

from bsnas.ops import bn_act  # noqa: E402

SHAPES = [(112, 96), (56, 144), (28, 240), (14, 480), (7, 960)]  # (H = W, C_max)
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def composite(y, scale, shift):
    return F.relu6(torch.addcmul(shift.view(1, -1, 1, 1), y, scale.view(1, -1, 1, 1)))


def ours(y, scale, shift):
    return bn_act(y, scale, shift, "relu6")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 64 on GPU, 8 on CPU")
    p.add_argument("--reps", type=int, default=None, help="default 30 on GPU, 7 on CPU")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    batch = a.batch or (64 if dev.type == "cuda" else 8)
    reps = a.reps or (30 if dev.type == "cuda" else 7)
    interleaved = _timer(dev)

    def run(fns):  # {name: median microseconds}
        times = interleaved({k: (lambda: None, fn) for k, fn in fns.items()}, reps)
        return {k: v * 1e6 for k, v in times.items()}
    dtypes = [torch.float32] + ([torch.bfloat16] if dev.type == "cuda" else [])
    lines = [f"torch {torch.__version__}, {dev}"
             + (f" ({torch.cuda.get_device_name()})" if dev.type == "cuda" else
                f", {torch.get_num_threads()} threads")
             + f", batch {batch}, relu6, {time.strftime('%Y-%m-%d %H:%M')}; times in us, "
             "ratios composite / bn_act (> 1: bn_act faster)", "",
             "| dtype | layout | HxW | C | fwd us | composite/ours fwd | f+b us | "
             "composite/ours f+b |", "|---|---|---|---|---:|---:|---:|---:|"]
    ratios = []
    for dtype in dtypes:
        for lname, fmt in LAYOUTS.items():
            for hw, c_max in SHAPES:
                for c in (c_max // 2, c_max):
                    torch.manual_seed(0)
                    y = (torch.randn(batch, c, hw, hw, device=dev) * 3).to(dtype)
                    y = y.contiguous(memory_format=fmt).requires_grad_()
                    scale = (torch.rand(c, device=dev) + 0.5).to(dtype).requires_grad_()
                    shift = torch.randn(c, device=dev).to(dtype).requires_grad_()
                    g = torch.randn_like(y)
                    args = (y, scale, shift)

                    def fwd(f):
                        def call():
                            with torch.no_grad():
                                return f(*args)
                        return call

                    def fb(f):
                        return lambda: torch.autograd.grad(f(*args), args, g)

                    tf = run({"ours": fwd(ours), "composite": fwd(composite)})
                    tb = run({"ours": fb(ours), "composite": fb(composite)})
                    rf, rb = tf["composite"] / tf["ours"], tb["composite"] / tb["ours"]
                    ratios.append((rf, rb))
                    lines.append(f"| {str(dtype).split('.')[-1]} | {lname} | {hw}x{hw} | {c} "
                                 f"| {tf['ours']:.1f} | {rf:.2f} | {tb['ours']:.1f} | {rb:.2f} |")
                    print(lines[-1], flush=True)
    gm = [statistics.geometric_mean(r[i] for r in ratios) for i in (0, 1)]
    lines += ["", f"Geometric means: composite/ours forward {gm[0]:.2f}, forward + backward "
              f"{gm[1]:.2f}; forward >= 1 in {sum(r[0] >= 1 for r in ratios)}/{len(ratios)}, "
              f"f+b >= 1 in {sum(r[1] >= 1 for r in ratios)}/{len(ratios)}."]
    text = "\n".join(lines)
    print(text)
    if a.out:
        write_report(a.out, text)


if __name__ == "__main__":
    main()
