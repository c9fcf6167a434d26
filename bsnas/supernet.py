"""The weight-sharing supernet of a search space.

Structure (`space` fixes every size):

    stem: conv kxk (stride) -> BN -> act                       fixed
    first_block: expand-1 MBConv (depthwise, project)         fixed, optional
    layers[i]: one SpringBlock per kernel op, plus identity   searchable
    head: conv1x1 -> BN -> act, global average pool, dropout, linear   fixed

`supernet.activate(arch)` selects, in every searchable layer, the op (its spring block,
or identity for `skip`) and the spring block's hidden width; `forward` then runs
exactly that single path. The static, plain-PyTorch twin of the active path is built by
`bsnas.export`.

Checkpoint format (written by the trainer, read by `bsnas export`): a `torch.save`d
dict with at least::

    {"space": space.to_dict(),          # or a preset name / YAML path
     "model": supernet.state_dict(),
     "enabled": enabled.state_dict(),   # optional: the shrinking state (EnabledSpace)
     ...}                               # anything else the trainer wants (optimizer, RNG, ...)

Files are read as full pickles by default (the trainer's extras, e.g. numpy RNG state,
need it), so only read checkpoints you trust; `weights_only=True` reads files of plain
types and tensors only.

`Supernet.checkpoint()` makes such a dict and `Supernet.from_checkpoint()` reads one.
"""
from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch import nn

from bsnas.nn import SpringBlock
from bsnas.space import (SKIP, Arch, EnabledSpace, FirstBlockSpec, LayerChoice, LayerSpec, SearchSpace,
                         kernel_size, load_space)

__all__ = ["FixedBlock", "SearchableLayer", "Supernet", "make_activation"]

_ACTIVATIONS = {"relu6": nn.ReLU6, "relu": nn.ReLU, "hswish": nn.Hardswish}


def make_activation(name: str) -> nn.Module:
    """The torch.nn activation module named in the space (`relu6`, `relu`, `hswish`)."""
    try:
        return _ACTIVATIONS[name](inplace=True)
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}") from None


def conv_bn_act(cin: int, cout: int, kernel: int, stride: int, activation: str,
                groups: int = 1) -> nn.Sequential:
    """Conv kxk (no bias, "same" padding) -> BN -> activation, as a Sequential of
    torch.nn built-ins (indices 0, 1, 2, like torchvision's Conv2dNormActivation)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        make_activation(activation),
    )


class FixedBlock(nn.Module):
    """MBConv with expand ratio 1 (MobileNetV2's first block): depthwise kxk -> BN ->
    act -> conv1x1 -> BN, plus the input when in == out. Stride 1.
    `[N, in_channels, H, W]` -> `[N, spec.channels, H, W]`."""

    def __init__(self, in_channels: int, spec: FirstBlockSpec, activation: str):
        super().__init__()
        self.residual = in_channels == spec.channels
        self.depthwise = conv_bn_act(in_channels, in_channels, spec.kernel, 1, activation, groups=in_channels)
        self.project = nn.Conv2d(in_channels, spec.channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(spec.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.project_bn(self.project(self.depthwise(x)))
        return h + x if self.residual else h


class SearchableLayer(nn.Module):
    """One searchable layer: `blocks[op]` is the SpringBlock of each kernel op (owning
    weights for the layer's largest width); `skip`, where allowed, is the identity.
    `[N, spec.in_channels, H, W]` -> `[N, spec.out_channels, H / stride, W / stride]`."""

    def __init__(self, spec: LayerSpec, activation: str):
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleDict({
            op: SpringBlock(spec.in_channels, spec.out_channels, spec.max_width, kernel_size(op),
                            spec.stride, activation)
            for op in spec.kernel_ops})
        self.choice = LayerChoice(spec.kernel_ops[0], spec.max_width) if spec.kernel_ops else LayerChoice(SKIP)

    def activate(self, choice: LayerChoice) -> None:
        """Select `choice` (assumed valid for this layer; `Supernet.activate` checks)."""
        if choice.op != SKIP:
            self.blocks[choice.op].width = choice.width
        self.choice = choice

    def active_block(self) -> SpringBlock | None:
        """The active spring block, None for skip."""
        return None if self.choice.op == SKIP else self.blocks[self.choice.op]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.choice.op == SKIP:
            return x
        return self.blocks[self.choice.op](x)

    def extra_repr(self) -> str:
        return f"layer={self.spec.index}, active={self.choice}"


class Supernet(nn.Module):
    """The supernet of `space` (a `SearchSpace`, or anything `load_space` accepts).

    Input `[N, space.in_channels, H, W]` (H = W = space.resolution nominally; any size
    the strides allow works), output logits `[N, space.classes]`. Initially active:
    `space.largest()` (largest kernel op at the largest width in every layer)."""

    def __init__(self, space: SearchSpace | str | dict):
        super().__init__()
        space = load_space(space)
        self.space = space
        act = space.activation
        self.stem = conv_bn_act(space.in_channels, space.stem.channels, space.stem.kernel,
                                space.stem.stride, act)
        self.first_block = (FixedBlock(space.stem.channels, space.first_block, act)
                            if space.first_block is not None else None)
        self.layers = nn.ModuleList(SearchableLayer(spec, act) for spec in space.layers)
        self.head = conv_bn_act(space.last_channels, space.head.channels, 1, 1, act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(space.head.dropout)
        self.classifier = nn.Linear(space.head.channels, space.classes)
        self._init_fixed_weights()
        self._active = space.largest()
        self.activate(self._active)

    def _init_fixed_weights(self) -> None:
        # torchvision's MobileNetV2 init for the fixed parts; spring blocks init themselves.
        fixed = [self.stem, self.head, self.classifier] + ([self.first_block] if self.first_block else [])
        for part in fixed:
            for m in part.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

    # -- path selection
    def activate(self, arch: Arch) -> None:
        """Make `arch` the active path (ValueError naming the layer if it is not in the
        space)."""
        self.space.validate(arch)
        for layer, choice in zip(self.layers, arch.layers):
            layer.activate(choice)
        self._active = arch

    @property
    def active(self) -> Arch:
        """The active architecture."""
        return self._active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.first_block is not None:
            x = self.first_block(x)
        for layer in self.layers:
            x = layer(x)
        x = self.pool(self.head(x))
        return self.classifier(self.dropout(torch.flatten(x, 1)))

    # -- checkpoints
    def checkpoint(self, enabled: EnabledSpace | None = None, **extra: Any) -> dict[str, Any]:
        """A checkpoint dict (see the module doc): the space, the weights and, if given,
        the enabled set, plus `extra` entries (plain types)."""
        ckpt: dict[str, Any] = {"space": self.space.to_dict(), "model": self.state_dict()}
        if enabled is not None:
            if enabled.space != self.space:
                raise ValueError(f"enabled set is for space {enabled.space.name!r}, not {self.space.name!r}")
            ckpt["enabled"] = enabled.state_dict()
        for key, value in extra.items():
            if key in ckpt:
                raise ValueError(f"checkpoint: extra key {key!r} clashes with a reserved key")
            ckpt[key] = value
        return ckpt

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any] | str | os.PathLike, map_location: str | torch.device = "cpu",
                        weights_only: bool = False) -> tuple["Supernet", EnabledSpace]:
        """Rebuild `(supernet, enabled)` from a checkpoint dict or file (read with
        `torch.load(..., weights_only=weights_only)`; see the module doc). `enabled` is
        the whole space when the checkpoint has none."""
        if not isinstance(ckpt, dict):
            path = os.fspath(ckpt)
            if not os.path.isfile(path):
                raise ValueError(f"checkpoint {path!r} does not exist")
            try:
                ckpt = torch.load(path, map_location=map_location, weights_only=weights_only)
            except pickle.UnpicklingError as e:
                raise ValueError(f"{path}: cannot load the checkpoint (weights_only={weights_only}): "
                                 f"{str(e).splitlines()[0]}") from None
            if not isinstance(ckpt, dict):
                raise ValueError(f"{path}: a checkpoint must be a dict, got {type(ckpt).__name__}")
        missing = {"space", "model"} - set(ckpt)
        if missing:
            raise ValueError(f"checkpoint: missing key(s) {sorted(missing)}; "
                             f"it needs at least 'space' and 'model'")
        net = cls(load_space(ckpt["space"]))
        net.load_state_dict(ckpt["model"])
        net.to(map_location)
        enabled = EnabledSpace(net.space)
        if ckpt.get("enabled") is not None:
            enabled.load_state_dict(ckpt["enabled"])
        return net, enabled
