"""Fast reads of a module's parameters and buffers on hot forward paths.

`module.weight` goes through nn.Module.__getattr__ (about 0.7 us on the dev box, against
0.06 us for a dict lookup); the spring block's training step made 28 such lookups, a
few percent of its host time, which bounds a GPU step at 28x28 and below. The forward
paths of SpringBlock and DynamicBatchNorm2d read `module._modules` and `state(...)`
instead.
"""
from __future__ import annotations

import torch
from torch import nn


def state(module: nn.Module, name: str) -> torch.Tensor | None:
    """`getattr(module, name)` for a parameter or buffer: read from the module's dicts
    where it is registered there, through getattr where it is not (DataParallel
    replicas, parametrized or pruned weights hold it elsewhere)."""
    try:
        return module._parameters[name]
    except KeyError:
        pass
    try:
        return module._buffers[name]
    except KeyError:
        return getattr(module, name)
