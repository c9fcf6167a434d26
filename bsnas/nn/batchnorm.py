"""Batch normalisation shared across widths, and BN recalibration of a subnet."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from bsnas.nn.module_state import state
from bsnas.ops.bn_from_sums import bn_affine_from_sums, bn_update_running_stats_


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over the first `C` channels of its full-width state, C = x.shape[1].

    Affine parameters are shared across widths; in training only the running statistics
    of the active prefix are updated (as Once-for-All's DynamicBatchNorm2d: prefix views
    of the full buffers are passed to `F.batch_norm`, which updates them in place).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D input, got {x.dim()}-D")
        if c > self.num_features:
            raise ValueError(f"input has {c} channels, more than num_features={self.num_features}")
        # State read through `state` (bsnas/nn/module_state.py: a tenth of the cost).
        mean, var = state(self, "running_mean"), state(self, "running_var")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            batches = state(self, "num_batches_tracked")
            batches.add_(1)
            factor = 1.0 / float(batches) if self.momentum is None else self.momentum
        use_batch = self.training or mean is None

        def prefix(t):  # full width: the tensor itself (no slice node in the autograd graph)
            return t if t is None or c == self.num_features else t[:c]

        return F.batch_norm(x, prefix(mean), prefix(var), prefix(state(self, "weight")),
                            prefix(state(self, "bias")), use_batch, factor, self.eps)

    def batch_affine(self, total: torch.Tensor, total_sq: torch.Tensor, count: int):
        """Training-mode BN of the first `c = len(total)` channels from batch statistics
        computed elsewhere (by a fused kernel): float64 per-channel `total` and
        `total_sq` [c] over `count` values per channel. Updates the running statistics
        of the prefix as `forward` would and returns (scale, shift) [c] with
        BN(x) = x * scale + shift, differentiable in the sums and the affine parameters.
        One kernel each for the update and the affine map (`bsnas.ops.bn_from_sums`)."""
        if self.weight is None or self.bias is None:
            raise ValueError("batch_affine needs an affine BatchNorm (affine=True)")
        self.update_running_stats(total, total_sq, count)
        return bn_affine_from_sums(total, total_sq, count, self.weight, self.bias, self.eps)

    def update_running_stats(self, total: torch.Tensor, total_sq: torch.Tensor,
                             count: int) -> None:
        """The running-statistics update of training mode for the first `len(total)`
        channels from float64 batch sums over `count` values per channel (as `forward`
        would do it); nothing without running statistics."""
        mean = state(self, "running_mean")  # not self.running_mean: module_state.py
        if self.track_running_stats and mean is not None:
            bn_update_running_stats_(mean, state(self, "running_var"),
                                     state(self, "num_batches_tracked"), total, total_sq,
                                     count, self.momentum)

    def folded(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode affine map of the first `c` channels as (scale, shift), [c] each:
        BN(x) = x * scale + shift."""
        scale = torch.rsqrt(self.running_var[:c] + self.eps)
        if self.weight is not None:
            scale = scale * self.weight[:c]
        shift = -self.running_mean[:c] * scale
        if self.bias is not None:
            shift = shift + self.bias[:c]
        return scale, shift


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable) -> int:
    """Reset and re-estimate the BN running statistics of `model`'s active configuration.

    `batches` yields input tensors (or `(input, target)` pairs; the target is ignored).
    Statistics become the exact average over the batches (momentum None), as SPOS does.
    The model's training flag and every BN momentum are restored afterwards. Returns the
    number of batches used; raises ValueError when there were none.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    count = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
            count += 1
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    if count == 0:
        raise ValueError("recalibrate_bn: no batches given")
    return count
