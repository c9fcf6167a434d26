"""Spring block benchmark: training step (forward + backward, the input
requiring a gradient as inside a network, gradients unset before each step as the
trainer's zero_grad(set_to_none=True) leaves them) and inference (forward in eval mode under
no_grad), at the shapes of the `proxyless` preset's stages
(224x224 input), widths 25/50/100% of the block's max width, against

- slicing: the same block through `F.conv2d` on weight slices (Once-for-All), eager;
- masking: full-width computation times a 0/1 channel mask, eager;
- compiled: the slicing block under `torch.compile(dynamic=True)` (optional, slow to
  compile on a small CPU: `--compile`).

Each layer: the second layer of each stage (stride 1, residual) and the first
(stride 2 where the stage downsamples). Kernel size 5 unless `--kernel`.
Times are medians of repeats after warm-up (CUDA events on GPU). Usage:
    python benchmarks/bench_block.py [--device cpu|cuda] [--batch 16] [--compile]
        [--channels-last] [--quick] [--keep-freed-memory] [--out FILE.md]
A full float32 run writes its table to benchmarks/results/{cpu,gpu}_block_<layout>.md
(GPU NCHW: gpu_block.md) unless --out names another file; --out '' writes none, and
--quick or bfloat16 runs write only where --out says.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # baselines.py, and bsnas from a source tree
from baselines import use_baseline  # noqa: E402
from ratio_table import cpu_setup, cpu_setup_bits  # noqa: E402

from bsnas.nn import SpringBlock  # noqa: E402
from bsnas.space import load_space  # noqa: E402


def stage_layers(quick: bool):
    """(name, in, out, stride, H) of the proxyless stages' first and second layers."""
    space = load_space("proxyless")
    out, seen = [], set()
    size = space.resolution // space.stem.stride
    for layer in space.layers:
        h = size
        size = size // layer.stride
        key = (layer.stage, layer.stride == 1 and layer.in_channels == layer.out_channels)
        if key in seen:
            continue
        seen.add(key)
        out.append((f"s{layer.stage}{'r' if key[1] else 'd'} {h}x{h}", layer.in_channels,
                    layer.out_channels, layer.stride, h, layer.widths[-1]))
    return out[::3] if quick else out


def _timer(device):
    """Returns interleaved(fns, reps) -> {name: median seconds}, for fns {name: (setup,
    fn)}: one warm-up call of each, then `reps` rounds calling every function once per
    round (round-robin, so load changes on a shared machine hit all of them alike).
    Only fn is timed (CUDA events on GPU); setup (switching the block to an
    implementation, train / eval) runs before the clock starts."""
    def once(setup, fn):
        setup()
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 1e3
        tic = time.perf_counter()
        fn()
        return time.perf_counter() - tic

    def interleaved(fns, reps):
        for setup, fn in fns.values():
            for _ in range(3 if device.type == "cuda" else 1):
                setup()
                fn()
        times = {k: [] for k in fns}
        for _ in range(reps):
            for k, (setup, fn) in fns.items():
                times[k].append(once(setup, fn))
        return {k: statistics.median(v) for k, v in times.items()}
    return interleaved


def write_report(path: str, text: str) -> None:
    """Writes `text` (and a final newline) to `path`, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def default_out(device: torch.device, channels_last: bool, quick: bool, dtype: str) -> str:
    """The stable results file of a full float32 run on `device` ('' for other runs)."""
    if quick or dtype != "float32":
        return ""
    layout = "channels_last" if channels_last else "nchw"
    name = ("gpu_block.md" if layout == "nchw" else f"gpu_block_{layout}.md") \
        if device.type == "cuda" else f"cpu_block_{layout}.md"
    return os.path.join(os.path.dirname(_HERE), "benchmarks", "results", name)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 64 on GPU, 16 on CPU")
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="table file (default: benchmarks/results/ for full float32 runs; '' = none)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU: keep freed memory for reuse, as training runs do (bsnas.train.host_memory)")
    a = p.parse_args(argv)
    if a.keep_freed_memory:
        from bsnas.train.host_memory import keep_freed_memory
        keep_freed_memory()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    batch = a.batch or (64 if device.type == "cuda" else 16)
    reps = a.reps or (30 if device.type == "cuda" else 5)
    run = _timer(device)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    amp = a.dtype == "bfloat16"
    kinds = ["fused", "slicing", "masking"] + (["compiled"] if a.compile else [])
    lines = [f"torch {torch.__version__}, {device}, batch {batch}, k{a.kernel}, {a.dtype}, "
             f"{'channels_last' if a.channels_last else 'NCHW'}, threads {torch.get_num_threads()}, "
             f"{time.strftime('%Y-%m-%d')}; medians of {reps}" +
             "".join(f", {b}" for b in (cpu_setup_bits(cpu_setup())
                                        if device.type == "cpu" else [])), ""]
    header = "| layer | width | " + " | ".join(f"{k} (ms)" for k in kinds) + " | " + \
        " | ".join(f"{k} / fused" for k in kinds[1:]) + " |"
    sep = "|---|---:|" + "---:|" * (2 * len(kinds) - 1)
    tables = {"train": [header, sep], "infer": [header, sep]}
    for name, cin, cout, stride, h, wmax in stage_layers(a.quick):
        torch.manual_seed(0)
        block = SpringBlock(cin, cout, wmax, a.kernel, stride).to(device)
        # The input wants a gradient, as every block's input does inside a network.
        x = torch.randn(batch, cin, h, h, device=device).to(memory_format=fmt).requires_grad_()
        g = torch.randn(batch, cout, h // stride, h // stride, device=device).to(memory_format=fmt)
        compiled = torch.compile(use_baseline(SpringBlock(cin, cout, wmax, a.kernel, stride).to(device),
                                              "slicing"), dynamic=True) if a.compile else None
        if compiled is not None:
            compiled._orig_mod.load_state_dict(block.state_dict())
        for frac in (0.25, 0.5, 1.0):
            width = max(8, int(round(wmax * frac / 8)) * 8)
            fns = {"train": {}, "infer": {}}
            for kind in kinds:
                mod = compiled if kind == "compiled" else block

                def select(kind=kind, mod=mod, train=True):
                    if kind == "compiled":
                        compiled._orig_mod.width = width
                    else:
                        use_baseline(block, kind)
                        block.width = width
                    mod.train(train)
                    # Gradients start unset, as after the trainer's
                    # zero_grad(set_to_none=True): the step's backward stores them
                    # instead of adding into the previous step's.
                    x.grad = None
                    for p in mod.parameters():
                        p.grad = None
                    return mod

                def train_step(mod=mod):
                    with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                        y = mod(x)
                    y.backward(g)

                def infer(mod=mod):
                    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
                        mod(x)

                fns["train"][kind] = (lambda select=select: select(train=True), train_step)
                fns["infer"][kind] = (lambda select=select: select(train=False), infer)
            # Round-robin over the implementations, so load changes on a shared machine
            # hit them alike; medians per implementation.
            times = {mode: run(fns[mode], reps) for mode in fns}
            use_baseline(block, "fused")
            for mode in ("train", "infer"):
                t = times[mode]
                tables[mode].append(
                    f"| {name} {cin}->{cout} s{stride} | {width} ({int(frac * 100)}%) | " +
                    " | ".join(f"{1e3 * t[k]:.2f}" for k in kinds) + " | " +
                    " | ".join(f"{t[k] / t['fused']:.2f}x" for k in kinds[1:]) + " |")
            print(tables["train"][-1], flush=True)
    text = "\n".join(lines + ["Training step (forward + backward):", ""] + tables["train"] +
                     ["", "Inference (eval, no_grad):", ""] + tables["infer"])
    print(text)
    out = default_out(device, a.channels_last, a.quick, a.dtype) if a.out is None else a.out
    if out:
        write_report(out, text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
