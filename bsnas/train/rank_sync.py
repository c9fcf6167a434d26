"""What a training step must make identical across DDP ranks besides the gradients: the
BN running statistics it updated. Each rank normalises its own shard of the batch, so
each updates the running statistics of the path it ran with different values;
`step_bn_stats` names exactly the entries the step's paths updated, for the trainer to
average them across ranks together with its other per-step values (one collective).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from bsnas.space import SKIP, Arch

__all__ = ["HIDDEN_BNS", "step_bn_stats"]

#: The BNs of a spring block over its hidden channels (as `SpringBlock.reorder_channels`
#: permutes them): a step at width c updates their first c entries only.
HIDDEN_BNS = ("expand_bn", "depthwise_bn")


def _tracks_stats(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None


def step_bn_stats(supernet, paths: Iterable[Arch]) -> list[torch.Tensor]:
    """The running means and variances a training step through `paths` updated in
    `supernet` (a `bsnas.supernet.Supernet`), as views of its buffers: every BN of the
    fixed parts (stem, first block, head) and of each path's spring blocks, where a BN
    over a block's hidden channels (`HIDDEN_BNS`) updated the prefix of the path's
    width only. A buffer reached by several paths appears once, with the longest
    prefix. `num_batches_tracked` is not listed: it counts the same
    steps on every rank. Float tensors, each 1-D."""
    longest: dict[int, tuple[torch.Tensor, int]] = {}

    def add(bn: nn.modules.batchnorm._BatchNorm, n: int) -> None:
        for buf in (bn.running_mean, bn.running_var):
            _, seen = longest.get(id(buf), (buf, 0))
            longest[id(buf)] = (buf, max(seen, n))

    fixed = [supernet.stem, supernet.head] + ([supernet.first_block] if supernet.first_block else [])
    for part in fixed:
        for bn in filter(_tracks_stats, part.modules()):
            add(bn, bn.num_features)
    for arch in paths:
        for layer, choice in zip(supernet.layers, arch.layers):
            if choice.op == SKIP:
                continue
            block = layer.blocks[choice.op]
            for name, bn in block.named_modules():
                if _tracks_stats(bn):
                    add(bn, choice.width if name in HIDDEN_BNS else bn.num_features)
    return [buf if n == buf.numel() else buf[:n] for buf, n in longest.values()]
