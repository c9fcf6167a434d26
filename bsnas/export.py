"""Export of a subnet: the static twin of a supernet path, as plain PyTorch.

`export(supernet, arch)` builds the static twin of `arch` (each active spring block
becomes its `to_static()` block of nn.Conv2d/nn.BatchNorm2d at the chosen width, skip
layers vanish, the fixed stem/first block/head are copied) and traces it with
`torch.fx.symbolic_trace`. The result is a `torch.fx.GraphModule` whose submodules are
torch.nn built-ins only, so `torch.save(model)` can be loaded with
`torch.load(path, weights_only=False)` in a process where bsnas is not importable. It
also goes through `torch.export.export` and `torch.onnx.export`.

Weights and BN statistics are copies (inherited from the supernet, ready to retrain);
in eval mode the model computes the supernet's active path (`supernet.activate(arch)`)
within float rounding.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from bsnas.space import SKIP, Arch
from bsnas.supernet import Supernet

__all__ = ["StaticNet", "export", "static_block", "static_fixed", "static_twin"]


class StaticNet(nn.Module):
    """The static twin of one supernet path (before tracing).

    `blocks` is a Sequential whose entries are named by the searchable layer index
    (skip layers are absent). `[N, in_channels, H, W]` -> logits `[N, classes]`."""

    def __init__(self, stem: nn.Module, first_block: nn.Module | None, blocks: nn.Sequential,
                 head: nn.Module, dropout: float, classifier: nn.Linear):
        super().__init__()
        self.stem = stem
        self.first_block = first_block
        self.blocks = blocks
        self.head = head
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.first_block is not None:
            x = self.first_block(x)
        x = self.pool(self.head(self.blocks(x)))
        return self.classifier(self.dropout(torch.flatten(x, 1)))


def static_block(supernet: Supernet, layer: int, op: str, width: int | None = None) -> nn.Module:
    """Static twin of searchable layer `layer` with `op` at hidden `width` (channels):
    the spring block's `to_static(width)`, or nn.Identity for skip. Weights are copies;
    the supernet's active path is unchanged."""
    if op == SKIP:
        return nn.Identity()
    spec = supernet.space.layers[layer]
    if op not in spec.kernel_ops:
        raise ValueError(f"{spec.where()}: op {op!r} not a candidate; candidates: {list(spec.ops)}")
    if width not in spec.widths:
        raise ValueError(f"{spec.where()}: width {width!r} not in the width grid {list(spec.widths)}")
    return supernet.layers[layer].blocks[op].to_static(width)


def static_fixed(supernet: Supernet) -> tuple[nn.Module, nn.Module | None, nn.Module, nn.Linear]:
    """Copies of the fixed parts: (stem, first block or None, head conv, classifier)."""
    first = copy.deepcopy(supernet.first_block) if supernet.first_block is not None else None
    return (copy.deepcopy(supernet.stem), first, copy.deepcopy(supernet.head),
            copy.deepcopy(supernet.classifier))


def static_twin(supernet: Supernet, arch: Arch) -> StaticNet:
    """The untraced static twin of `arch` (a `StaticNet`, same training mode as the
    supernet). Most callers want `export`, which also traces it."""
    supernet.space.validate(arch)
    stem, first, head, classifier = static_fixed(supernet)
    blocks = OrderedDict((str(i), static_block(supernet, i, c.op, c.width))
                         for i, c in enumerate(arch.layers) if c.op != SKIP)
    net = StaticNet(stem, first, nn.Sequential(blocks), head, supernet.space.head.dropout, classifier)
    return net.train(supernet.training)


def export(supernet: Supernet, arch: Arch | None = None) -> torch.fx.GraphModule:
    """Export `arch` (default: the supernet's active arch) as a plain-PyTorch
    `torch.fx.GraphModule` with the inherited weights and BN statistics, in eval mode
    (call `.train()` to retrain it). Input `[N, in_channels, H, W]`, output
    `[N, classes]`. The arch's JSON is kept in the string attribute `model.bsnas_arch`
    (saved by `torch.save`)."""
    arch = supernet.active if arch is None else arch
    twin = static_twin(supernet, arch)
    model = torch.fx.symbolic_trace(twin)
    model.bsnas_arch = arch.to_json()
    return model.eval()
