"""The spring block's fused depthwise pass, `torch.ops.bsnas.bn_act_dwconv2d`:

    a = act(z * scale + shift)                     # BN (as a per-channel affine) + act
    y = conv2d(a, weight[:width], groups=width)    # masked depthwise convolution
    returns y, y.sum((0, 2, 3)), (y * y).sum((0, 2, 3))   # statistics in float64

`z` is `[N, width, H, W]` (the raw expand output), `scale`/`shift` are `[width]`,
`weight` the full `[C_max, 1, k, k]`. Differentiable in z, scale, shift and weight,
including through the two statistics outputs. The intermediate `a` is never stored:
the backward recomputes it from `z` (autograd in `csrc/ops/autograd/bn_act_dwconv2d.cpp`).

`torch.ops.bsnas.bn_train_act_dwconv2d` puts the BN of z in training mode in front:

    zsum, zsumsq = channel_stats(z)
    scale, shift = bn_affine_from_sums(zsum, zsumsq, N * H * W, bn_weight, bn_bias, eps)
    returns bn_act_dwconv2d(z, scale, shift, weight, ...) + (zsum, zsumsq)

as one autograd node whose backward adds the batch statistics' share of z's gradient
in place (`csrc/ops/bn_train_act_dwconv2d_impl.cpp`). Differentiable in z, bn_weight,
bn_bias and weight; zsum and zsumsq (for the running statistics) are not.
"""
from __future__ import annotations

import torch

from bsnas.extension import _C  # noqa: F401  (registers the ops)
from bsnas.ops.masked_conv import _autocast, _conv_out, _format

__all__ = ["ACTIVATION_CODES", "bn_act_dwconv2d", "bn_train_act_dwconv2d"]

# Must match bsnas::ActCode in csrc/ops/masked_conv_common.h.
ACTIVATION_CODES = {"identity": 0, "relu": 1, "relu6": 2}

_ops = torch.ops.bsnas


def _act_code(activation: str) -> int:
    """The kernels' code of an activation name; ValueError for any other name."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {sorted(ACTIVATION_CODES)}, got {activation!r}")
    return ACTIVATION_CODES[activation]


def bn_act_dwconv2d(z, scale, shift, weight, width=None, stride: int = 1, padding=None,
                    dilation: int = 1, activation: str = "relu6"):
    """See the module docstring. `padding` defaults to "same"; `activation` is one of
    "identity", "relu", "relu6". Returns `(y, sum, sumsq)`."""
    act = _act_code(activation)
    if width is None:
        width = z.shape[1]
    if padding is None:
        padding = dilation * (weight.shape[-1] - 1) // 2
    z, scale, shift, weight = _autocast(z, scale, shift, weight)
    return _ops.bn_act_dwconv2d(z, scale, shift, weight, width, stride, padding, dilation, act)


def bn_train_act_dwconv2d(z, bn_weight, bn_bias, weight, width=None, stride: int = 1,
                          padding=None, dilation: int = 1, activation: str = "relu6",
                          eps: float = 1e-5):
    """See the module docstring: BN of `z` with its batch statistics (`bn_weight`,
    `bn_bias` [C_max >= width]), then `bn_act_dwconv2d`. Returns
    `(y, ysum, ysumsq, zsum, zsumsq)`, the sums in float64."""
    act = _act_code(activation)
    if width is None:
        width = z.shape[1]
    if padding is None:
        padding = dilation * (weight.shape[-1] - 1) // 2
    z, weight = _autocast(z, weight)
    return _ops.bn_train_act_dwconv2d(z, bn_weight, bn_bias, eps, weight, width, stride, padding,
                                      dilation, act)


def _fake_y(z, weight, width, stride, padding, dilation):
    k = weight.shape[2]
    n, _, h, w = z.shape
    shape = (n, width, _conv_out(h, k, stride, padding, dilation),
             _conv_out(w, k, stride, padding, dilation))
    return torch.empty(shape, dtype=z.dtype, device=z.device, memory_format=_format(z))


@torch.library.register_fake("bsnas::bn_act_dwconv2d")
def _fake(z, scale, shift, weight, width, stride, padding, dilation, activation):
    torch._check(z.dim() == 4, lambda: "bn_act_dwconv2d: z must be 4-D")
    torch._check(z.shape[1] == width, lambda: "bn_act_dwconv2d: z channels != width")
    torch._check(width <= weight.shape[0], lambda: "bn_act_dwconv2d: width > C_max")
    torch._check(scale.shape[0] == width and shift.shape[0] == width,
                 lambda: "bn_act_dwconv2d: scale/shift must have the active width")
    y = _fake_y(z, weight, width, stride, padding, dilation)
    stats = z.new_empty((width,), dtype=torch.float64)
    return y, stats, stats.new_empty((width,))


@torch.library.register_fake("bsnas::bn_train_act_dwconv2d")
def _train_fake(z, bn_weight, bn_bias, eps, weight, width, stride, padding, dilation,
                activation):
    torch._check(z.dim() == 4, lambda: "bn_train_act_dwconv2d: z must be 4-D")
    torch._check(z.shape[1] == width, lambda: "bn_train_act_dwconv2d: z channels != width")
    torch._check(width <= weight.shape[0], lambda: "bn_train_act_dwconv2d: width > C_max")
    torch._check(width <= bn_weight.shape[0] and width <= bn_bias.shape[0],
                 lambda: "bn_train_act_dwconv2d: width > the BN's channels")
    y = _fake_y(z, weight, width, stride, padding, dilation)
    stats = [z.new_empty((width,), dtype=torch.float64) for _ in range(4)]
    return (y, *stats)


@torch.library.register_fake("bsnas::_bn_act_dwconv2d_backward")
def _backward_fake(grad_y, grad_sum, grad_sumsq, z, scale, shift, weight, y, width, stride,
                   padding, dilation, activation):
    gz = torch.empty(z.shape, dtype=z.dtype, device=z.device, memory_format=_format(z))
    return gz, scale.new_empty(scale.shape), shift.new_empty(shift.shape), \
        weight.new_empty(weight.shape)
