"""The spring block in training up to its project convolution, `torch.ops.bsnas.mbconv_train`:

    z = conv1x1(x, expand_weight[:width])
    y = dwconv(act(BN1(z)), dw_weight[:width], stride)       # "same" padding
    h = act(BN2(y))
    p = conv1x1(h, project_weight[:, :width])
    returns p, z.sum((0, 2, 3)), (z * z).sum((0, 2, 3)), y.sum((0, 2, 3)), (y * y).sum(...)

BN1 and BN2 normalise with the batch statistics (training mode) and their affine
parameters' first `width` entries; the four float64 sums are returned for the running-
statistics update (`bn_update_running_stats_`) and are not differentiable. The project
BN and the residual are the caller's. One op and one autograd node for the five ops it
runs (`masked_pwconv2d`, `bn_train_act_dwconv2d`, `bn_affine_from_sums`, `bn_act`,
`masked_pwconv2d`; csrc/ops/mbconv_train_impl.cpp): same kernels, less host work per step.
Differentiable in x, the three weights and the four BN parameters; the weight and BN
parameter gradients have the full tensors' shapes, zero outside the active part.
"""
from __future__ import annotations

import torch

from bsnas.extension import _C  # noqa: F401  (registers the ops)
from bsnas.ops.bn_act_dwconv import _act_code, _fake_y
from bsnas.ops.masked_conv import _autocast, _format

__all__ = ["mbconv_train"]


def mbconv_train(x, expand_weight, bn1_weight, bn1_bias, dw_weight, bn2_weight, bn2_bias,
                 project_weight, width=None, stride: int = 1, activation: str = "relu6",
                 eps1: float = 1e-5, eps2: float = 1e-5):
    """See the module docstring. Shapes: `x [N, in, H, W]`, `expand_weight [C_max, >= in,
    1, 1]`, `bn1_*`, `bn2_*` `[>= width]`, `dw_weight [C_max, 1, k, k]` (odd k),
    `project_weight [out, >= width, 1, 1]`; `width` defaults to C_max; `activation` is
    "identity", "relu" or "relu6". Returns `(p [N, out, Ho, Wo], zsum, zsumsq, ysum,
    ysumsq)`, the sums `[width]` float64."""
    act = _act_code(activation)
    if width is None:
        width = expand_weight.shape[0]
    # Under CUDA autocast the convolutions run in the autocast dtype; BN stays float32.
    x, expand_weight, dw_weight, project_weight = _autocast(x, expand_weight, dw_weight,
                                                            project_weight)
    return torch.ops.bsnas.mbconv_train(x, expand_weight, bn1_weight, bn1_bias, eps1,
                                        dw_weight, bn2_weight, bn2_bias, eps2, project_weight,
                                        width, stride, act)


@torch.library.register_fake("bsnas::mbconv_train")
def _fake(x, expand_weight, bn1_weight, bn1_bias, eps1, dw_weight, bn2_weight, bn2_bias,
          eps2, project_weight, width, stride, activation):
    for name, t in (("x", x), ("expand_weight", expand_weight), ("dw_weight", dw_weight),
                    ("project_weight", project_weight)):
        torch._check(t.dim() == 4, lambda name=name: f"mbconv_train: {name} must be 4-D")
    torch._check(x.shape[1] <= expand_weight.shape[1],
                 lambda: "mbconv_train: x has more channels than expand_weight's inputs")
    torch._check(width >= 1, lambda: "mbconv_train: width must be >= 1")
    torch._check(width <= expand_weight.shape[0] and width <= dw_weight.shape[0]
                 and width <= project_weight.shape[1],
                 lambda: "mbconv_train: width > a weight's channels")
    for t in (bn1_weight, bn1_bias, bn2_weight, bn2_bias):
        torch._check(width <= t.shape[0], lambda: "mbconv_train: width > the BN's channels")
    k = dw_weight.shape[2]
    z = torch.empty((x.shape[0], width, x.shape[2], x.shape[3]), dtype=x.dtype,
                    device=x.device, memory_format=_format(x))
    y = _fake_y(z, dw_weight, width, stride, k // 2, 1)
    p = torch.empty((x.shape[0], project_weight.shape[0], y.shape[2], y.shape[3]),
                    dtype=x.dtype, device=x.device, memory_format=_format(x))
    return (p, *[x.new_empty((width,), dtype=torch.float64) for _ in range(4)])
