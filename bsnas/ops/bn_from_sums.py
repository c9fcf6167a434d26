"""BatchNorm in training from float64 batch sums (`csrc/ops/bn_from_sums.cpp`):

    scale, shift = bn_affine_from_sums(sum, sumsq, count, weight, bias, eps)
        mean = sum / count, var = max(sumsq / count - mean^2, 0)
        scale = weight[:c] / sqrt(var + eps), shift = bias[:c] - mean * scale
    bn_update_running_stats_(running_mean, running_var, num_batches_tracked, sum, sumsq,
                             count, momentum)
        num_batches_tracked += 1; the first c running statistics move towards the batch
        mean and unbiased variance by `momentum` (None: the cumulative average)

with c = len(sum), for kernels that return the per-channel sums of their output
(`bn_act_dwconv2d`, `channel_stats`). Each is one kernel where the composite of ATen
ops is about ten, forward and backward; the update reads num_batches_tracked on the
device (no host synchronisation). `bn_affine_from_sums` is differentiable in sum, sumsq,
weight and bias; the weight and bias gradients have the full [C_max] shape, zero past c
(autograd in `csrc/ops/autograd/bn_from_sums.cpp`).
"""
from __future__ import annotations

import torch

from bsnas.extension import _C  # noqa: F401  (registers the ops)

__all__ = ["bn_affine_from_sums", "bn_update_running_stats_"]

_ops = torch.ops.bsnas


def bn_affine_from_sums(total: torch.Tensor, total_sq: torch.Tensor, count: int,
                        weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5):
    """(scale, shift) [c] in weight's dtype; see the module docstring."""
    return _ops.bn_affine_from_sums(total, total_sq, count, weight, bias, eps)


def bn_update_running_stats_(running_mean: torch.Tensor, running_var: torch.Tensor,
                             num_batches_tracked: torch.Tensor, total: torch.Tensor,
                             total_sq: torch.Tensor, count: int,
                             momentum: float | None = 0.1) -> None:
    """In-place running-statistics update; see the module docstring."""
    _ops.bn_update_running_stats_(running_mean, running_var, num_batches_tracked,
                                  total.detach(), total_sq.detach(), count, momentum)


@torch.library.register_fake("bsnas::bn_affine_from_sums")
def _fake(total, total_sq, count, weight, bias, eps):
    c = total.shape[0]
    torch._check(total.dim() == 1 and total_sq.shape == total.shape,
                 lambda: "bn_affine_from_sums: sum and sumsq must be 1-D of one length")
    torch._check(weight.dim() == 1 and weight.shape[0] >= c,
                 lambda: "bn_affine_from_sums: weight has fewer channels than sum")
    return weight.new_empty((c,)), weight.new_empty((c,))


@torch.library.register_fake("bsnas::_bn_affine_from_sums_backward")
def _backward_fake(grad_scale, grad_shift, total, total_sq, count, weight, eps):
    return (total.new_empty(total.shape), total.new_empty(total.shape),
            weight.new_empty(weight.shape), weight.new_empty(weight.shape))


@torch.library.register_fake("bsnas::bn_update_running_stats_")
def _update_fake(running_mean, running_var, num_batches_tracked, total, total_sq, count,
                 momentum):
    return None
