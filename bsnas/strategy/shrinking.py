"""Shrinking the search space: turn off the ops and widths whose paths underperform.

From epoch `start` on, every `interval` epochs, `Shrinker`:

1. samples `samples` paths uniformly from the enabled space, from a random generator
   seeded by (seed, epoch), so every DDP rank draws the same paths without talking;
2. measures each distinct path on the held-out split after BN recalibration
   (`bsnas.evaluator.PathEvaluator`), sharded across ranks (`paths[rank::world]`) and
   all-gathered, so every rank ends with the same, complete results;
3. scores every enabled (layer, op) and (layer, width) by the mean accuracy (or loss)
   of the sampled paths that used it (`score_candidates`): a width is used by a path
   whose layer runs a kernel op at that width, since a layer's widths are shared by its
   kernel ops; a candidate that no sampled path used has no score;
4. turns off the worst `drop_fraction` of the enabled candidates, ranked by their gap
   to the best candidate of the same kind in their layer, keeping at least `min_ops`
   ops and `min_widths` widths per layer (`choose_drops`); a candidate without a score,
   or tied with its layer's best, is never dropped.

Steps 3 and 4 run on rank 0 only, which broadcasts the decision record; the other ranks
load its enabled space, so no rank relies on computing the same decision itself. A hash
of the enabled space is then compared across ranks.

Every decision, with all scores and path results, is kept in the trainer's
checkpointed `extra_state["shrink"]` and written to `<out_dir>/shrink_log.json`
(rank 0)::

    {"format": "bsnas-shrink-log/1", "settings": {...},
     "decisions": [{"epoch": 6, "samples": 20, "paths": [{"arch": {...}, "top1": .., "loss": ..}],
                    "scores": [{"layer": 0, "kind": "op", "name": "k3", "score": .., "count": ..,
                                "gap": ..}, ...],
                    "target": 3, "dropped": [<scores entries>],
                    "enabled": <EnabledSpace.state_dict() after the decision>,
                    "size_before": .., "size_after": .., "seconds": ..}]}
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from bsnas.evaluator import PathEvaluator
from bsnas.space import SKIP, Arch, EnabledSpace
from bsnas.train import collectives
from bsnas.train.checkpoint import save_json_atomic

__all__ = ["CandidateScore", "PathResult", "Shrinker", "choose_drops", "score_candidates"]

log = logging.getLogger(__name__)

LOG_NAME = "shrink_log.json"
#: Gaps up to this are ties with the layer's best (float noise of averaging), never dropped.
TIE = 1e-9
STATE_KEY = "shrink"


@dataclass(frozen=True)
class PathResult:
    """A measured path: held-out top-1 (fraction) and mean cross-entropy."""
    arch: Arch
    top1: float
    loss: float


@dataclass(frozen=True)
class CandidateScore:
    """The score of one enabled candidate: `kind` "op" (name an op such as "k5") or
    "width" (name a hidden width in channels) of searchable layer `layer`. `score` is
    the mean metric of the `count` sampled paths that used it (None when none did);
    `gap` is how much worse it is than the best scored candidate of the same kind in
    its layer (>= 0, in the metric's units; None without a score)."""
    layer: int
    kind: str
    name: str | int
    score: float | None
    count: int
    gap: float | None


def score_candidates(enabled: EnabledSpace, results: Sequence[PathResult],
                     metric: str = "accuracy") -> list[CandidateScore]:
    """Score every enabled (layer, op) and (layer, width) by the mean `metric` of the
    `results` whose path used it. `metric` "accuracy" (top-1, higher is better) or
    "loss" (lower is better). Returned in layer order, ops before widths, each in the
    space's order."""
    if metric not in ("accuracy", "loss"):
        raise ValueError(f"shrink metric must be 'accuracy' or 'loss', got {metric!r}")
    higher = metric == "accuracy"
    value = (lambda r: r.top1) if higher else (lambda r: r.loss)
    out: list[CandidateScore] = []
    for i in range(enabled.num_layers):
        for kind, names, used in (
                ("op", enabled.ops(i), lambda r, n: r.arch[i].op == n),
                ("width", enabled.widths(i),
                 lambda r, n: r.arch[i].op != SKIP and r.arch[i].width == n)):
            sums = {}
            for name in names:
                vals = [value(r) for r in results if used(r, name)]
                sums[name] = (sum(vals) / len(vals) if vals else None, len(vals))
            scored = [s for s, _ in sums.values() if s is not None]
            best = (max(scored) if higher else min(scored)) if scored else None
            for name, (score, count) in sums.items():
                gap = None if score is None else (best - score if higher else score - best)
                out.append(CandidateScore(i, kind, name, score, count, gap))
    return out


def drop_target(enabled: EnabledSpace, drop_fraction: float) -> int:
    """How many candidates a decision turns off: `drop_fraction` of the enabled ops and
    widths of all layers, rounded to the nearest integer (halves up)."""
    n = sum(len(enabled.ops(i)) + len(enabled.widths(i)) for i in range(enabled.num_layers))
    return int(math.floor(drop_fraction * n + 0.5))


def choose_drops(enabled: EnabledSpace, scores: Sequence[CandidateScore], target: int,
                 min_ops: int = 1, min_widths: int = 1) -> list[CandidateScore]:
    """Up to `target` candidates to turn off: the scored ones with the largest gap to
    their layer's best (> `TIE`), skipping any whose removal would leave its layer with
    fewer than `min_ops` ops or `min_widths` widths. Ties are broken by (layer, kind,
    name) so the choice is deterministic. `enabled` is not modified."""
    if min_ops < 1 or min_widths < 1:
        raise ValueError(f"min_ops and min_widths must be >= 1, got {min_ops} and {min_widths}")
    ops = [len(enabled.ops(i)) for i in range(enabled.num_layers)]
    widths = [len(enabled.widths(i)) for i in range(enabled.num_layers)]
    ranked = sorted((s for s in scores if s.gap is not None and s.gap > TIE),
                    key=lambda s: (-s.gap, s.layer, s.kind, str(s.name)))
    chosen = []
    for s in ranked:
        if len(chosen) >= target:
            break
        on = (enabled.is_enabled(s.layer, s.name) if s.kind == "op"
              else s.name in enabled.widths(s.layer))
        if not on:
            raise ValueError(f"layer {s.layer}: {s.kind} {s.name!r} is scored but not enabled")
        left = ops if s.kind == "op" else widths
        floor = min_ops if s.kind == "op" else min_widths
        if left[s.layer] - 1 < floor:
            continue
        left[s.layer] -= 1
        chosen.append(s)
    return chosen


def apply_drops(enabled: EnabledSpace, drops: Sequence[CandidateScore]) -> None:
    """Turn off the chosen candidates in `enabled`."""
    for s in drops:
        if s.kind == "op":
            enabled.disable_op(s.layer, s.name)
        else:
            enabled.disable_width(s.layer, s.name)


def enabled_digest(enabled: EnabledSpace) -> str:
    """A short hash of the enabled space (to check that DDP ranks agree)."""
    text = json.dumps(enabled.state_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Shrinker:
    """The shrinking schedule and decision rule (see the module doc); a
    `bsnas.train.trainer.Trainer` epoch hook: `trainer.epoch_hooks.append(Shrinker(...))`.

    `start`, `interval`: decisions after epochs start, start + interval, ... (epochs
    counted as completed epochs, so `start=6` decides after the sixth epoch);
    `samples`: paths sampled per decision; `drop_fraction`, `min_ops`, `min_widths`,
    `metric`: the decision rule; `seed`: the run's seed (paths depend on it and on the
    epoch only)."""

    def __init__(self, start: int, interval: int, samples: int, drop_fraction: float,
                 min_ops: int = 1, min_widths: int = 2, metric: str = "accuracy", seed: int = 0):
        if start < 0 or interval < 1 or samples < 1:
            raise ValueError(f"shrink needs start >= 0, interval >= 1 and samples >= 1, "
                             f"got {start}, {interval} and {samples}")
        if not 0 <= drop_fraction < 1:
            raise ValueError(f"shrink drop_fraction must be in [0, 1), got {drop_fraction}")
        if metric not in ("accuracy", "loss"):
            raise ValueError(f"shrink score must be 'accuracy' or 'loss', got {metric!r}")
        if min_ops < 1 or min_widths < 1:
            raise ValueError(f"shrink min_ops and min_widths must be >= 1, got {min_ops} and {min_widths}")
        self.start, self.interval, self.samples = start, interval, samples
        self.drop_fraction, self.min_ops, self.min_widths = drop_fraction, min_ops, min_widths
        self.metric, self.seed = metric, seed

    @classmethod
    def from_config(cls, cfg) -> "Shrinker":
        """From a run config (`cfg.shrink` and `cfg.seed`)."""
        s = cfg.shrink
        return cls(s.start, s.interval, s.samples, s.drop_fraction, s.min_ops, s.min_widths,
                   s.score, cfg.seed)

    def settings(self) -> dict:
        return {"start": self.start, "interval": self.interval, "samples": self.samples,
                "drop_fraction": self.drop_fraction, "min_ops": self.min_ops,
                "min_widths": self.min_widths, "score": self.metric, "seed": self.seed}

    # ------------------------------------------------------------------ steps
    def due(self, epoch: int) -> bool:
        """Whether a decision follows completed epoch `epoch`."""
        return epoch >= self.start and (epoch - self.start) % self.interval == 0

    def sample_paths(self, enabled: EnabledSpace, epoch: int) -> list[Arch]:
        """`samples` paths drawn uniformly from `enabled`, a function of (seed, epoch)
        and the enabled space only."""
        rng = random.Random(f"{self.seed}:shrink:{epoch}")
        return [enabled.sample(rng) for _ in range(self.samples)]

    @staticmethod
    def measure(paths: Sequence[Arch], evaluate: Callable[[Arch], dict], rank: int = 0,
                world_size: int = 1, device: torch.device | str = "cpu") -> list[PathResult]:
        """Measure the distinct `paths` (`evaluate(arch)` -> dict with "top1", "loss"):
        this rank takes `distinct[rank::world_size]`, the results are all-gathered
        (torch.distributed; tensors on `device`), and every rank returns the results
        of all `paths`, in order (repeated paths repeat their result)."""
        distinct = list(dict.fromkeys(paths))
        mine = distinct[rank::world_size]
        rows = [[float(r["top1"]), float(r["loss"])] for r in map(evaluate, mine)]
        if world_size > 1:
            per_rank = math.ceil(len(distinct) / world_size)
            local = torch.full((per_rank, 2), float("nan"), dtype=torch.float64, device=device)
            if rows:
                local[:len(rows)] = torch.tensor(rows, dtype=torch.float64, device=device)
            gathered = [torch.empty_like(local) for _ in range(world_size)]
            collectives.all_gather(gathered, local)
            table = [gathered[j % world_size][j // world_size].tolist() for j in range(len(distinct))]
        else:
            table = rows
        by_arch = {a: PathResult(a, top1, loss) for a, (top1, loss) in zip(distinct, table)}
        return [by_arch[a] for a in paths]

    def decide(self, enabled: EnabledSpace, results: Sequence[PathResult], epoch: int) -> dict:
        """Score, choose and apply a decision to `enabled`; returns its log record."""
        size_before = enabled.size()
        scores = score_candidates(enabled, results, self.metric)
        target = drop_target(enabled, self.drop_fraction)
        drops = choose_drops(enabled, scores, target, self.min_ops, self.min_widths)
        apply_drops(enabled, drops)
        return {
            "epoch": epoch, "samples": len(results), "distinct_paths": len(set(r.arch for r in results)),
            "paths": [{"arch": r.arch.to_dict(), "top1": r.top1, "loss": r.loss} for r in results],
            "scores": [asdict(s) for s in scores], "target": target,
            "dropped": [asdict(s) for s in drops], "enabled": enabled.state_dict(),
            "size_before": size_before, "size_after": enabled.size(),
        }

    # ------------------------------------------------------------------ trainer hook
    def __call__(self, trainer, epoch: int) -> dict | None:
        """Epoch hook: decide if one is due after `epoch`, else do nothing. Returns the
        decision record, or None."""
        state = trainer.extra_state.setdefault(STATE_KEY, {"decisions": []})
        if not self.due(epoch) or any(d["epoch"] == epoch for d in state["decisions"]):
            return None
        tic = time.perf_counter()
        d = trainer.dist
        device = next(trainer.supernet.parameters()).device
        paths = self.sample_paths(trainer.enabled, epoch)
        # Recalibration runs the net in training mode (dropout draws random numbers);
        # keep the training run's random stream as if no decision had happened.
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            evaluator = PathEvaluator(trainer.supernet, trainer.data.calib, trainer.data.holdout)
            results = self.measure(paths, evaluator, d.rank, d.world_size, device)
        # Decided once, on rank 0, and broadcast: every rank keeps rank 0's record and
        # enabled space even if its own scores differed in the last bit.
        record = None
        if d.rank == 0:
            record = self.decide(trainer.enabled, results, epoch)
            record["seconds"] = round(time.perf_counter() - tic, 3)
        if d.world_size > 1:
            record = collectives.broadcast_object(record, 0, device)
            if d.rank != 0:
                trainer.enabled.load_state_dict(record["enabled"])
            _check_ranks_agree(trainer.enabled, device)
        state["decisions"].append(record)
        if d.rank == 0:
            self.write_log(state["decisions"], trainer.out_dir)
            dropped = ", ".join(f"L{s['layer']}:{s['name']} (-{s['gap']:.3f})" for s in record["dropped"])
            log.info("shrinking after epoch %d: %d paths (%d distinct) in %.1fs; turned off %d/%d: %s; "
                     "space %.3e -> %.3e archs", epoch, record["samples"], record["distinct_paths"],
                     record["seconds"], len(record["dropped"]), record["target"], dropped or "none",
                     record["size_before"], record["size_after"])
        return record

    def write_log(self, decisions: list[dict], out_dir: str) -> str:
        """Write all decisions so far to `<out_dir>/shrink_log.json` (atomically)."""
        path = os.path.join(out_dir, LOG_NAME)
        save_json_atomic({"format": "bsnas-shrink-log/1", "settings": self.settings(),
                          "decisions": decisions}, path)
        return path


def _check_ranks_agree(enabled: EnabledSpace, device) -> None:
    import torch.distributed as dist
    digest = torch.tensor([int(enabled_digest(enabled), 16) & ((1 << 62) - 1)],
                          dtype=torch.int64, device=device)
    gathered = [torch.empty_like(digest) for _ in range(dist.get_world_size())]
    collectives.all_gather(gathered, digest)
    if any(int(g) != int(digest) for g in gathered):
        raise RuntimeError("shrinking: DDP ranks disagree on the enabled space after a decision")
