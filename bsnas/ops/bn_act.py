"""BN (as a per-channel affine) + activation, `torch.ops.bsnas.bn_act`:

    h = act(y * scale[c] + shift[c])        # y [N, C, H, W], scale / shift [C]

with a one-pass backward: grad_y = gu * scale, grad_scale = sum(gu * y), grad_shift =
sum(gu) for gu = grad_h * act'(u) (sums in float64; autograd in csrc/ops/autograd/bn_act.cpp).
The spring block applies its depthwise BN + activation with it in training, where the
eager composite (addcmul, clamp) took two passes forward and six backward. CPU
(float32/float64) and CUDA (also float16/bfloat16; the backward's sums are
deterministic, two launches).
"""
from __future__ import annotations

import torch

from bsnas.extension import _C  # noqa: F401  (registers the ops)
from bsnas.ops.bn_act_dwconv import _act_code
from bsnas.ops.masked_conv import _autocast, _format

__all__ = ["bn_act"]


def bn_act(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
           activation: str = "relu6") -> torch.Tensor:
    """`act(y * scale + shift)` per channel; `activation` is "identity", "relu" or
    "relu6". Differentiable in y, scale and shift."""
    act = _act_code(activation)
    y, scale, shift = _autocast(y, scale, shift)  # under CUDA autocast, as the other ops
    return torch.ops.bsnas.bn_act(y, scale, shift, act)


def _check(y, scale, shift):
    torch._check(y.dim() == 4, lambda: "bn_act: y must be 4-D [N, C, H, W]")
    torch._check(scale.shape == (y.shape[1],) and shift.shape == (y.shape[1],),
                 lambda: "bn_act: scale and shift must be [C]")


@torch.library.register_fake("bsnas::bn_act")
def _fake(y, scale, shift, act):
    _check(y, scale, shift)
    return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=_format(y))


@torch.library.register_fake("bsnas::_bn_act_backward")
def _fake_backward(grad_h, y, scale, shift, act):
    _check(y, scale, shift)
    gy = torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=_format(y))
    return gy, scale.new_empty(scale.shape), shift.new_empty(shift.shape)
