"""Evaluation: the accuracy of a model, and the held-out fitness of one supernet path
after BN recalibration, as shrinking and evolutionary search use it.

`evaluate(model, loader)` measures top-1/top-5 and the loss. `evaluate_path` activates a
path, recalibrates BN on a fixed set of training images and measures it on the held-out
split, leaving the supernet as it was. Shrinking and search evaluate hundreds of paths
on the same two small image sets, so `PathEvaluator` decodes those sets once and keeps
the batches in memory (when they fit in `max_cache_bytes`); otherwise it streams them
from the loaders every time.
"""
from __future__ import annotations

import itertools
import logging

import torch
import torch.nn.functional as F

from bsnas.nn import recalibrate_bn
from bsnas.space import Arch

__all__ = ["PathEvaluator", "evaluate", "evaluate_path", "materialize"]

log = logging.getLogger(__name__)

#: Default memory budget of the cached calibration + held-out batches (bytes).
DEFAULT_CACHE_BYTES = 1 << 30


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, max_batches: int = 0) -> dict[str, float]:
    """Top-1, top-5 (fractions) and mean cross-entropy of `model` in eval mode over
    `loader` (all batches, or the first `max_batches` when > 0). Restores the model's
    training flag."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = count = 0
    loss = 0.0
    batches = loader if max_batches <= 0 else itertools.islice(loader, max_batches)
    try:
        for x, y in batches:
            logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == y.view(-1, 1)
            correct1 += hit[:, 0].sum().item()
            correct5 += hit.any(dim=1).sum().item()
            count += y.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return {"top1": correct1 / count, "top5": correct5 / count, "loss": loss / count,
            "samples": count}


def _bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.detach().clone() for name, buf in model.named_buffers()
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


@torch.no_grad()
def evaluate_path(supernet, arch, calib_loader, eval_loader) -> dict[str, float]:
    """Activate `arch`, recalibrate BN on all of `calib_loader` (a fixed set of training
    images), evaluate on all of `eval_loader` (e.g. the held-out split), and restore
    every BN statistic of the supernet afterwards, so evaluating a path never changes
    the supernet. Returns `evaluate`'s dict."""
    saved = _bn_buffers(supernet)
    previous = supernet.active
    try:
        supernet.activate(arch)
        recalibrate_bn(supernet, calib_loader)
        return evaluate(supernet, eval_loader)
    finally:
        buffers = dict(supernet.named_buffers())
        for name, value in saved.items():
            buffers[name].copy_(value)
        supernet.activate(previous)


def materialize(loader, max_bytes: int):
    """The batches of one pass over `loader` as a list of `(images, labels)` when their
    images take at most `max_bytes`, else `loader` itself (streamed on every use). A
    list makes every later pass identical and skips decoding and augmentation."""
    batches, total = [], 0
    for x, y in loader:
        total += x.element_size() * x.nelement()
        if total > max_bytes:
            log.info("evaluation batches exceed %d MiB: streaming them from the loader",
                     max_bytes >> 20)
            return loader
        batches.append((x, y))
    return batches


class PathEvaluator:
    """`evaluator(arch)` -> `{"top1", "top5", "loss", "samples"}` of `arch` on the
    held-out batches after BN recalibration on the calibration batches. The supernet's
    weights, BN statistics and active path are left as they were."""

    def __init__(self, supernet, calib_loader, holdout_loader,
                 max_cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.supernet = supernet
        self.calib = materialize(calib_loader, max_cache_bytes // 2)
        self.holdout = materialize(holdout_loader, max_cache_bytes // 2)

    def __call__(self, arch: Arch) -> dict[str, float]:
        return evaluate_path(self.supernet, arch, self.calib, self.holdout)
