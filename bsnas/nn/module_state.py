"""Fast reads of a module's parameters and buffers on hot forward paths.

`module.weight` goes through nn.Module.__getattr__, about ten times the cost of a dict
lookup, and host time bounds a GPU step at 28x28 and below (docs/performance.md). The
forward paths of SpringBlock and DynamicBatchNorm2d read `module._modules` and `state(...)`
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
