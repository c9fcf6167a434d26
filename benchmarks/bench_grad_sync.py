"""Gradient averaging across DDP ranks: the trainer's single all-reduce against
torch.nn.parallel.DistributedDataParallel, on the supernet training step.

Both variants run the trainer's step (uniform single path, the same path on every rank,
SGD with Nesterov momentum) on per-rank synthetic batches and keep the trainer's other
per-step collective semantics (the BN statistics the step updated and the logged loss,
averaged across ranks):

- `allreduce`: one all-reduce of the path's gradients, those BN statistics and the loss
  after backward (the trainer's `Trainer._sync_step`);
- `ddp`: DDP with find_unused_parameters=True (a single path leaves most of the
  supernet unused; static_graph and find_unused_parameters=False need the same used
  set every step), forward_sync_buffers=False, then one all-reduce of the BN statistics
  and the loss.

Each repeat trains both variants on fresh supernets (same initial weights), alternating
step by step with the same path and batch for both, every step timed from a barrier:
`--warmup` steps, then `--steps` timed ones. Per variant, the table gives the median
over the repeats of the median step time; the paired ratios (ddp / allreduce of the
same step) are less moved by load from other processes.

Usage: python benchmarks/bench_grad_sync.py [--space tiny] [--batch 32] [--steps 30]
       [--warmup 5] [--repeats 3] [--world 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE)]  # bsnas from a source tree

from bsnas.space import EnabledSpace, PathSampler, load_space  # noqa: E402
from bsnas.supernet import Supernet  # noqa: E402
from bsnas.train import collectives  # noqa: E402
from bsnas.train.rank_sync import step_bn_stats  # noqa: E402
from bsnas.train.runtime import param_groups  # noqa: E402

VARIANTS = ("allreduce", "ddp")


def _setup(variant: str, args, rank: int):
    """A fresh supernet (same initial weights for every variant), its optimizer and the
    step function of `variant`: step(i) trains step i's path on batch i."""
    torch.manual_seed(0)
    space = load_space(args.space)
    net = Supernet(space)
    opt = torch.optim.SGD(param_groups(net, 4e-5), lr=0.05, momentum=0.9, nesterov=True)
    enabled = EnabledSpace(space)
    sampler = PathSampler(enabled, 0)
    model = net
    if variant == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(
            net, find_unused_parameters=True, forward_sync_buffers=False)
    g = torch.Generator().manual_seed(100 + rank)
    size = space.resolution
    batches = [(torch.randn(args.batch, space.in_channels, size, size, generator=g),
                torch.randint(0, space.classes, (args.batch,), generator=g)) for _ in range(4)]
    net.train()

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        arch = sampler.uniform(i, enabled.widths)
        net.activate(arch)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        stats = [loss.detach().reshape(1)]
        if variant == "allreduce":
            stats += [p.grad for p in net.parameters() if p.grad is not None]
        collectives.all_reduce_mean_(stats + step_bn_stats(net, [arch]))
        opt.step()

    return step


def _repeat(args, rank: int, first: int) -> dict[str, list[float]]:
    """One repeat: both variants on fresh supernets, alternating step by step (the same
    path and batch for both), `VARIANTS[first]` first on even steps. Every timed step
    starts after a barrier. Returns the seconds of each timed step, by variant."""
    steps = {v: _setup(v, args, rank) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for i in range(args.warmup + args.steps):
        order = VARIANTS if (i + first) % 2 == 0 else VARIANTS[::-1]
        for v in order:
            dist.barrier()
            tic = time.perf_counter()
            steps[v](i)
            if i >= args.warmup:
                times[v].append(time.perf_counter() - tic)
    return times


def _worker(rank: int, args, store: str, out: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.world)
    try:
        runs = [_repeat(args, rank, r % 2) for r in range(args.repeats)]
        if rank == 0:
            torch.save(runs, out)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.spawn(_worker, args=(args, os.path.join(tmp, "store"), out), nprocs=args.world, join=True)
        runs = torch.load(out)
    print(f"space {args.space}, batch {args.batch} per rank, {args.world} gloo ranks x "
          f"{args.threads} thread(s), {args.steps} timed steps after {args.warmup}, "
          f"{args.repeats} repeats, variants alternating step by step")
    print("| variant | step ms: median of the repeats' medians | per repeat |")
    print("|---|---|---|")
    med = {}
    for v in VARIANTS:
        per = [1e3 * statistics.median(run[v]) for run in runs]
        med[v] = statistics.median(per)
        print(f"| {v} | {med[v]:.1f} | {', '.join(f'{m:.1f}' for m in per)} |")
    ratios = [statistics.median(d / a for d, a in zip(run["ddp"], run["allreduce"])) for run in runs]
    print(f"ddp / allreduce: {med['ddp'] / med['allreduce']:.3f}; median of the paired step ratios "
          f"per repeat: {', '.join(f'{r:.3f}' for r in ratios)}")


if __name__ == "__main__":
    main()
