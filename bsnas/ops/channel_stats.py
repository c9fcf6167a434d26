"""Per-channel batch statistics in float64, `torch.ops.bsnas.channel_stats`:

    sum, sumsq = z.sum((0, 2, 3)), (z * z).sum((0, 2, 3))     # both float64

for a BatchNorm's batch mean and variance (var = sumsq / n - mean^2 does not cancel in
float64). One vectorised pass on CPU, where `torch.var_mean` over (0, 2, 3) is several
times slower, two launches on CUDA; the spring block uses it for the expand BN in
training.
Differentiable in z: grad_z = grad_sum[c] + 2 * z * grad_sumsq[c]
(csrc/ops/autograd/channel_stats.cpp).
"""
from __future__ import annotations

import torch

from bsnas.extension import _C  # noqa: F401  (registers the ops)

__all__ = ["channel_stats"]


def channel_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sum [C], sumsq [C])` of `z [N, C, H, W]` over (N, H, W), float64."""
    return torch.ops.bsnas.channel_stats(z)


@torch.library.register_fake("bsnas::channel_stats")
def _fake(z):
    torch._check(z.dim() == 4, lambda: "channel_stats: z must be 4-D")
    s = z.new_empty((z.shape[1],), dtype=torch.float64)
    return s, s.new_empty((z.shape[1],))


@torch.library.register_fake("bsnas::_channel_stats_grad_add_")
def _grad_add_fake(grad_z, z, grad_sum, grad_sumsq):
    return None
