"""The held-out fitness of a supernet path, as shrinking and evolutionary search use
it: activate the path, recalibrate BN on a fixed set of training images, measure it on
the held-out split (`bsnas.evaluate.evaluate_path`).

Both callers evaluate hundreds of paths on the same two small image sets, so
`PathEvaluator` decodes those sets once and keeps the batches in memory (when they fit
in `max_cache_bytes`); otherwise it streams them from the loaders every time.
"""
from __future__ import annotations

import logging

from bsnas.evaluate import evaluate_path
from bsnas.space import Arch

__all__ = ["PathEvaluator", "materialize"]

log = logging.getLogger(__name__)

#: Default memory budget of the cached calibration + held-out batches (bytes).
DEFAULT_CACHE_BYTES = 1 << 30


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
