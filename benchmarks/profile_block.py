"""Where a spring-block step's time goes: kernel launches, GPU kernel time and wall time
per training step and per inference call, for the fused block and the eager baselines
(benchmarks/baselines.py), at one layer shape. On a GPU, wall time well above the kernel
time means the step is bound by host work (Python, dispatch, launches), not by kernels.
Usage:
    python benchmarks/profile_block.py [--device cuda] [--batch 64] [--cin 80 --cout 80
        --hw 14 --width 240 --max-width 480 --kernel 5 --stride 1] [--channels-last]
        [--top 12]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
from baselines import use_baseline  # noqa: E402

from bsnas.nn import SpringBlock  # noqa: E402

OPS = ("aten::", "bsnas::", "autograd::engine::evaluate_function")
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
            "cudaMemsetAsync", "cudaMemcpyAsync")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cin", type=int, default=80)
    p.add_argument("--cout", type=int, default=80)
    p.add_argument("--hw", type=int, default=14)
    p.add_argument("--width", type=int, default=240)
    p.add_argument("--max-width", type=int, default=480)
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=12, help="ops listed by host time (fused)")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    block = SpringBlock(a.cin, a.cout, a.max_width, a.kernel, a.stride).to(dev)
    block.width = a.width
    x = torch.randn(a.batch, a.cin, a.hw, a.hw, device=dev).to(memory_format=fmt)
    ho = -(-a.hw // a.stride)
    g = torch.randn(a.batch, a.cout, ho, ho, device=dev).to(memory_format=fmt)

    params = list(block.parameters())

    def train():  # gradients unset first, as the trainer's zero_grad(set_to_none=True)
        block.train(True)
        for p in params:
            p.grad = None
        block(x).backward(g)

    def infer():
        block.train(False)
        with torch.no_grad():
            block(x)

    print(f"torch {torch.__version__}, {dev}, batch {a.batch}, {a.cin}->{a.cout} "
          f"{a.hw}x{a.hw} s{a.stride} k{a.kernel}, width {a.width}/{a.max_width}, "
          f"{'channels_last' if a.channels_last else 'NCHW'}\n")
    print("| mode | impl | ops / call | launches / call | kernel time / call (us) | "
          "wall / call (us) |")
    print("|---|---|---:|---:|---:|---:|")
    tables, apis = {}, {}
    for mode, fn in (("train", train), ("infer", infer)):
        for kind in ("fused", "slicing", "masking"):
            use_baseline(block, kind)
            for _ in range(3):
                fn()
            sync()
            tic = time.perf_counter()
            for _ in range(a.steps):
                fn()
            sync()
            wall = (time.perf_counter() - tic) / a.steps
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(5):
                    fn()
                sync()
            ev = prof.events()
            launches = sum(1 for e in ev if e.name in LAUNCHES) / 5
            # Host-side operator calls (ATen and bsnas ops, nested ones included, and
            # autograd nodes): the device-independent share of the host work.
            ops = sum(1 for e in ev if e.name.startswith(OPS)) / 5
            kern = sum(e.device_time_total for e in ev
                       if e.device_type == torch.autograd.DeviceType.CUDA) / 5
            print(f"| {mode} | {kind} | {ops:.0f} | {launches:.0f} | {kern:.0f} | "
                  f"{wall * 1e6:.0f} |")
            # Runtime / driver API calls per call (launches, syncs, memsets, copies).
            api = collections.Counter(e.name for e in ev if e.name.startswith("cu"))
            apis[(mode, kind)] = ", ".join(f"{k} {v / 5:g}" for k, v in api.most_common(8))
            if kind == "fused" and a.top:
                tables[mode] = prof.key_averages().table(sort_by="self_cpu_time_total",
                                                         row_limit=a.top)
    use_baseline(block, "fused")
    if any(apis.values()):
        print("\nCUDA API calls per call:")
        for (mode, kind), line in apis.items():
            print(f"- {mode} {kind}: {line}")
    for mode, t in tables.items():
        print(f"\nfused {mode}, 5 calls, by self host time:\n{t}")


if __name__ == "__main__":
    main()
