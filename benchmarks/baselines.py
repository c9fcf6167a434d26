"""The baselines an expert would compare the spring block against, sharing the block's
parameters and BN state:

- slicing (Once-for-All): `F.conv2d` on weight slices `weight[:c]`, `F.batch_norm` on
  prefix views of the BN state; PyTorch/cuDNN/oneDNN kernels, weight slices copied
  where the backend needs them contiguous;
- masking: compute every layer at full width and multiply the hidden activations by a
  0/1 channel mask (what a plain, width-agnostic implementation does).

`use_baseline(module, kind)` switches every SpringBlock inside `module` (a block or a
whole Supernet) to that forward; `kind="fused"` restores bsnas's own.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from bsnas.nn import SpringBlock
from bsnas.nn.spring_block import _act_fn


def _bn(bn, h, c):
    return F.batch_norm(h, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c], bn.bias[:c],
                        bn.training, bn.momentum if bn.momentum is not None else 0.0, bn.eps)


def slicing_forward(self: SpringBlock, x: torch.Tensor) -> torch.Tensor:
    c, k, act = self.width, self.kernel_size, _act_fn(self.activation)
    h = act(_bn(self.expand_bn, F.conv2d(x, self.expand.weight[:c]), c))
    h = act(_bn(self.depthwise_bn,
                F.conv2d(h, self.depthwise.weight[:c], None, self.stride, k // 2, 1, c), c))
    h = _bn(self.project_bn, F.conv2d(h, self.project.weight[:, :c]), self.out_channels)
    return h + x if self.residual else h


def masking_forward(self: SpringBlock, x: torch.Tensor) -> torch.Tensor:
    c, k, act = self.width, self.kernel_size, _act_fn(self.activation)
    m = self.max_width
    mask = torch.zeros(1, m, 1, 1, dtype=x.dtype, device=x.device)
    mask[:, :c] = 1
    h = act(_bn(self.expand_bn, F.conv2d(x, self.expand.weight), m)) * mask
    h = act(_bn(self.depthwise_bn,
                F.conv2d(h, self.depthwise.weight, None, self.stride, k // 2, 1, m), m)) * mask
    h = _bn(self.project_bn, F.conv2d(h, self.project.weight), self.out_channels)
    return h + x if self.residual else h


FORWARDS = {"slicing": slicing_forward, "masking": masking_forward}


def use_baseline(module: torch.nn.Module, kind: str) -> torch.nn.Module:
    """Switch the SpringBlocks of `module` to `kind` ("fused", "slicing", "masking")."""
    for m in module.modules():
        if isinstance(m, SpringBlock):
            if kind == "fused":
                m.__dict__.pop("forward", None)
            else:
                m.forward = types.MethodType(FORWARDS[kind], m)
    return module
