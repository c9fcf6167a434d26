"""Static twins: fixed-width networks of plain torch.nn layers that compute what a
spring block or a supernet path computes.

`StaticMBConv` is the twin of a `SpringBlock` at one hidden width (`SpringBlock.to_static`).
`static_block`, `static_fixed` and `static_twin` build the twins of a supernet's
searchable layers, its fixed parts and a whole path (`StaticNet`), with copies of the
supernet's weights and BN statistics; `bsnas.export` traces `static_twin` into a
`torch.fx.GraphModule`. The `supernet` arguments are `bsnas.supernet.Supernet`s.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from bsnas.space.arch import SKIP, Arch

__all__ = ["ACTIVATIONS", "StaticMBConv", "StaticNet", "static_block", "static_fixed", "static_twin"]

#: The torch.nn activation of each activation name a spring block accepts.
ACTIVATIONS = {"relu6": nn.ReLU6, "relu": nn.ReLU, "hswish": nn.Hardswish}


class StaticMBConv(nn.Module):
    """A fixed-width inverted-residual block of plain torch.nn layers (the static twin of
    a SpringBlock). Submodule names match the SpringBlock's."""

    def __init__(self, in_channels: int, out_channels: int, width: int, kernel_size: int,
                 stride: int, activation: str = "relu6"):
        super().__init__()
        self.residual = stride == 1 and in_channels == out_channels
        self.expand = nn.Conv2d(in_channels, width, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(width)
        self.expand_act = ACTIVATIONS[activation]()
        self.depthwise = nn.Conv2d(width, width, kernel_size, stride, kernel_size // 2,
                                   groups=width, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(width)
        self.depthwise_act = ACTIVATIONS[activation]()
        self.project = nn.Conv2d(width, out_channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand_act(self.expand_bn(self.expand(x)))
        h = self.depthwise_act(self.depthwise_bn(self.depthwise(h)))
        h = self.project_bn(self.project(h))
        return h + x if self.residual else h


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


def static_block(supernet, layer: int, op: str, width: int | None = None) -> nn.Module:
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


def static_fixed(supernet) -> tuple[nn.Module, nn.Module | None, nn.Module, nn.Linear]:
    """Copies of the fixed parts: (stem, first block or None, head conv, classifier)."""
    first = copy.deepcopy(supernet.first_block) if supernet.first_block is not None else None
    return (copy.deepcopy(supernet.stem), first, copy.deepcopy(supernet.head),
            copy.deepcopy(supernet.classifier))


def static_twin(supernet, arch: Arch) -> StaticNet:
    """The untraced static twin of `arch` (a `StaticNet`, same training mode as the
    supernet). Most callers want `export`, which also traces it."""
    supernet.space.validate(arch)
    stem, first, head, classifier = static_fixed(supernet)
    blocks = OrderedDict((str(i), static_block(supernet, i, c.op, c.width))
                         for i, c in enumerate(arch.layers) if c.op != SKIP)
    net = StaticNet(stem, first, nn.Sequential(blocks), head, supernet.space.head.dropout, classifier)
    return net.train(supernet.training)
