"""Accuracy of a model, and of one supernet path after BN recalibration (the fitness
that shrinking and evolutionary search use)."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from bsnas.nn import recalibrate_bn


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
