"""Non-finite values in training: one fused check per step of the loss, the gradients and
the BatchNorm running statistics (`FiniteGuard`), the error that stops a run on them
(`NonFiniteError`), and the snapshot that lets a skipped step leave the BN statistics as
they were.

The healthy path costs one `torch._foreach_norm` over the tensors (one fused kernel
group on CUDA; on one CPU thread 6 ms for 7.5M values, where the infinity norm took 47),
a stack and one host sync: a NaN or an infinity makes the norm non-finite. Only then are
the tensors walked one by one, to name the first bad one; if none is (the norm of huge
but finite values overflowed), the step counts as finite.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["BN_STATISTICS", "FiniteGuard", "NonFiniteError"]

#: Buffers checked and, for a skipped step, restored (`num_batches_tracked` only restored).
BN_STATISTICS = ("running_mean", "running_var")
_BN_STATE = BN_STATISTICS + ("num_batches_tracked",)


class NonFiniteError(ValueError):
    """Training met a non-finite loss, gradient, BN statistic or parameter."""


def _norms_finite(tensors: list[torch.Tensor]) -> bool:
    """True when every tensor's 2-norm is finite (one host sync), as it is when all
    their elements are; False may also mean that a norm overflowed."""
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())


def _first_bad(named: list[tuple[str, torch.Tensor]]) -> str | None:
    """The first name whose tensor holds a NaN or an infinity, with what it holds; None
    when every element is finite."""
    for name, t in named:
        if not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
            return f"{name} ({kind})"
    return None


class FiniteGuard:
    """Checks a model's gradients and BN running statistics for NaN/inf.

    `check(loss)` after the backward pass (before the optimizer step) returns None when
    the loss, every gradient and every `running_mean`/`running_var` buffer are finite,
    else the name of the first bad one ("loss", "gradient of 'layers.0...'", "BN
    statistic 'layers.0...running_var'"). `snapshot()` before a step and `restore()`
    after a bad one put the BN buffers (and their batch counters) back.
    """

    def __init__(self, model: nn.Module):
        # (label, tensor) pairs built once: the per-step path formats no names
        self.params = [(n, p) for n, p in model.named_parameters() if p.numel() > 0]
        self._grad_labels = [(f"gradient of {n!r}", p) for n, p in self.params]
        buffers = [(n, b) for n, b in model.named_buffers() if b is not None and b.numel() > 0]
        self.stats = [(f"BN statistic {n!r}", b) for n, b in buffers
                      if n.rpartition(".")[2] in BN_STATISTICS and b.is_floating_point()]
        self._bn_state = [b for n, b in buffers if n.rpartition(".")[2] in _BN_STATE]
        self._shadow: list[torch.Tensor] | None = None

    def check(self, loss: float | None = None) -> str | None:
        """None when `loss` (a Python float), the gradients and the BN statistics are
        all finite; else a description of the first bad one. One fused reduction."""
        if loss is not None and not math.isfinite(loss):
            return f"loss ({loss})"
        named = [(label, p.grad) for label, p in self._grad_labels if p.grad is not None] + self.stats
        if _norms_finite([t for _, t in named]):
            return None
        return _first_bad(named)

    def check_state(self) -> str | None:
        """None when every parameter and BN statistic is finite (what a checkpoint
        holds), else the first bad one ("parameter 'x' (NaN)"). One fused reduction."""
        named = [(f"parameter {n!r}", p.detach()) for n, p in self.params] + self.stats
        if _norms_finite([t for _, t in named]):
            return None
        return _first_bad(named)

    def snapshot(self) -> None:
        """Copy the BN buffers (one fused copy into buffers allocated once)."""
        if self._shadow is None:
            self._shadow = [b.detach().clone() for b in self._bn_state]
        else:
            torch._foreach_copy_(self._shadow, [b.detach() for b in self._bn_state])

    def restore(self) -> None:
        """Put back the BN buffers of the last `snapshot()`."""
        if self._shadow is None:
            raise RuntimeError("FiniteGuard.restore() before snapshot()")
        with torch.no_grad():
            torch._foreach_copy_(self._bn_state, self._shadow)
