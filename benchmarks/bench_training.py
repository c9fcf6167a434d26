"""Training benchmarks: data loading and the supernet training step.

1. Data: images/s of the DALI pipeline against the torchvision loader over the digits
   training set, same workers, same augmentations (random-resized-crop, flip,
   normalise), batch 64, after one warm-up epoch.
2. Training step: supernet steps/s with bsnas's fused spring blocks against the same
   supernet (same sequence of sampled paths, same batches) on the slicing and masking
   baselines (benchmarks/baselines.py), timed round-robin (each path on each
   implementation in turn). Median step time over the paths.

Usage: python benchmarks/bench_training.py [--space tiny] [--batch 64] [--steps 30]
       [--device cpu|cuda] [--threads N] [--keep-freed-memory] [--out FILE.md]
Only ratios measured in the same run are meaningful on a shared machine. `make bench`
writes the table to benchmarks/results/training.md.
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
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # baselines.py, and bsnas from a source tree
from baselines import use_baseline  # noqa: E402

from bsnas.data import (Augment, dali_available, make_loader, prepare_digits,  # noqa: E402
                        scan_image_folder)
from bsnas.space import EnabledSpace, PathSampler, load_space  # noqa: E402
from bsnas.supernet import Supernet  # noqa: E402


def bench_data(batch: int, workers: int, epochs: int) -> list[tuple[str, float]]:
    root = prepare_digits()
    images = scan_image_folder(os.path.join(root, "train"), verify=False)
    aug = Augment(32, scale=(0.5, 1.0), flip=True)
    rows = []
    for backend in (["dali"] if dali_available() else []) + ["torch"]:
        loader = make_loader(images, batch, aug, True, backend=backend, workers=workers)
        for _ in loader:  # warm-up epoch (pipeline build, worker start)
            pass
        tic, n = time.perf_counter(), 0
        for epoch in range(epochs):
            loader.set_epoch(epoch + 1)
            for x, _ in loader:
                n += x.shape[0]
        rows.append((backend, n / (time.perf_counter() - tic)))
    return rows


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_steps(space_name: str, batch: int, steps: int, device: torch.device,
                channels_last: bool) -> dict[str, float]:
    torch.manual_seed(0)
    space = load_space(space_name)
    net = Supernet(space).to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    enabled = EnabledSpace(space)
    sampler = PathSampler(enabled, seed=1)
    paths = [sampler.uniform(s, enabled.widths) for s in range(steps)]
    x = torch.randn(batch, space.in_channels, space.resolution, space.resolution, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, space.classes, (batch,), device=device)
    kinds = ("fused", "slicing", "masking")
    times = {k: [] for k in kinds}
    net.train()
    # Round-robin: every path runs once per implementation in turn (after two warm-up
    # paths), so load changes on a shared machine hit all of them alike.
    for i, arch in enumerate([paths[0], paths[1]] + paths):
        for kind in kinds:
            use_baseline(net, kind)
            net.activate(arch)
            _sync(device)
            tic = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
            _sync(device)
            if i >= 2:
                times[kind].append(time.perf_counter() - tic)
    medians = {k: statistics.median(v) for k, v in times.items()}
    use_baseline(net, "fused")
    return medians


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--space", default="tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data-epochs", type=int, default=2)
    p.add_argument("--skip-data", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU: keep freed memory for reuse, as training runs do (bsnas.train.host_memory)")
    a = p.parse_args(argv)
    if a.keep_freed_memory:
        from bsnas.train.host_memory import keep_freed_memory
        keep_freed_memory()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    lines = [f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
             f"{time.strftime('%Y-%m-%d')}", ""]
    if not a.skip_data:
        rows = bench_data(a.batch, a.workers, a.data_epochs)
        lines += ["| loader | images/s | vs torch |", "|---|---:|---:|"]
        ref = dict(rows)["torch"]
        lines += [f"| {name} | {rate:,.0f} | {rate / ref:.2f}x |" for name, rate in rows]
        lines.append("")
    lines += [f"Supernet `{a.space}`, batch {a.batch}, {a.steps} sampled paths (median step):", "",
              "| layout | fused (ms) | slicing (ms) | masking (ms) | slicing / fused | masking / fused |",
              "|---|---:|---:|---:|---:|---:|"]
    for cl in (False, True):
        m = bench_steps(a.space, a.batch, a.steps, device, cl)
        lines.append(f"| {'channels_last' if cl else 'NCHW'} | {1e3 * m['fused']:.1f} | "
                     f"{1e3 * m['slicing']:.1f} | {1e3 * m['masking']:.1f} | "
                     f"{m['slicing'] / m['fused']:.2f}x | {m['masking'] / m['fused']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
