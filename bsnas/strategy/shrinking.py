"""Shrinking the search space: turn off the ops and widths whose paths are evidently
worse than their layer's best, not those that merely drew unlucky paths.

From epoch `start` on, every `interval` epochs, and never after the last epoch
(`epochs`), `Shrinker`:

1. samples `samples` paths uniformly from the enabled space, from a random generator
   seeded by (seed, epoch), so every DDP rank draws the same paths without talking;
2. measures each distinct path on the held-out split after BN recalibration
   (`bsnas.evaluator.PathEvaluator`), sharded across ranks (`paths[rank::world]`) and
   all-gathered, so every rank ends with the same, complete results;
3. scores every enabled (layer, op) and (layer, width) by the mean of the per-path
   scores of the sampled paths that used it, with its standard error SE = sample
   standard deviation / sqrt(count) (`score_candidates`). A width is used by a path
   whose layer runs a kernel op at that width, since a layer's widths are shared by its
   kernel ops. The path score is its top-1 (`score: accuracy`), its loss (`loss`), or
   with `cost_aware: per_macs` its top-1 per million multiply-accumulates
   (`bsnas.profiler.cost.flops`), which favours the candidates that buy accuracy
   cheaply;
4. measures the evidence against each candidate: its gap to the best candidate of the
   same kind in its layer (the best mean among those with at least `MIN_PATHS` paths),
   divided by the standard error of that gap, z = gap / sqrt(SE_best^2 + SE^2) (the two
   candidates' paths are disjoint samples). A candidate with fewer than `MIN_PATHS`
   scored paths has no SE, hence no z, and is never turned off;
5. turns off the candidates with z > `threshold`, most evident first, at most
   `max_op_drops` ops and `max_width_drops` widths per decision (separate budgets:
   a width is scored by fewer paths than an op, so its raw gap is noisier), never
   leaving a layer with fewer than `min_ops` ops or `min_widths` widths (`choose_drops`).

`cost_aware: protect_cheapest` never turns off a candidate of the cheapest
architecture of the enabled space (per layer, its cheapest op and its narrowest
width): that architecture stays available, so a search under a MACs cap
(`macs_cap`, default `search.max_macs`) keeps a feasible architecture whenever the
unshrunk space had one. `mode: random` is the control: no path is measured, and each
decision turns off `random_drops[k]` = [n_ops, n_widths] candidates (default
`max_op_drops`, `max_width_drops`) chosen uniformly at random, one at a time, among
those that may legally go (floors, protection), from a generator seeded by
(seed, epoch).

Steps 3 to 5 run on rank 0 only, which broadcasts the decision record; the other ranks
load its enabled space, so no rank relies on computing the same decision itself. A hash
of the enabled space is then compared across ranks.

Every decision, with all scores and path results, is kept in the trainer's
checkpointed `extra_state["shrink"]` and written to `<out_dir>/shrink_log.json`
(rank 0); z is `Infinity` in the JSON when both standard errors are 0 and the gap is
positive::

    {"format": "bsnas-shrink-log/2", "settings": {...},
     "decisions": [{"epoch": 6, "mode": "evidence", "metric": "accuracy", "samples": 20,
                    "distinct_paths": 20,
                    "paths": [{"arch": {...}, "top1": .., "loss": .., "macs": ..}],
                    "scores": [{"layer": 0, "kind": "op", "name": "k3", "score": ..,
                                "count": .., "se": .., "gap": .., "z": ..}, ...],
                    "threshold": 2.0, "budget": {"ops": 2, "widths": 2},
                    "dropped": [<scores entries>], "n_op_drops": 1, "n_width_drops": 2,
                    "protected": [{"layer": 0, "kind": "op", "name": "skip"}, ...],
                    "enabled": <EnabledSpace.state_dict() after the decision>,
                    "size_before": .., "size_after": .., "seconds": ..}]}

(`cheapest_macs` and `macs_cap` are added with `protect_cheapest`.)
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable, Sequence

import torch

from bsnas.evaluator import PathEvaluator
from bsnas.profiler import cost
from bsnas.space import SKIP, Arch, EnabledSpace, LayerChoice
from bsnas.train import collectives
from bsnas.train.checkpoint import save_json_atomic

__all__ = ["CandidateScore", "PathResult", "Shrinker", "apply_drops", "candidate_macs",
           "choose_drops", "choose_random_drops", "describe", "protected_candidates",
           "score_candidates"]

log = logging.getLogger(__name__)

LOG_NAME = "shrink_log.json"
LOG_FORMAT = "bsnas-shrink-log/2"
#: Gaps up to this are ties with the layer's best (float noise of averaging), never dropped.
TIE = 1e-9
#: Paths a candidate needs for a standard error, hence for a z-value and a drop.
MIN_PATHS = 2
STATE_KEY = "shrink"
MODES = ("evidence", "random")
COST_AWARE = ("none", "per_macs", "protect_cheapest")
#: Path metrics: top-1 (higher is better), loss (lower), top-1 per million MACs (higher).
METRICS = ("accuracy", "loss", "accuracy_per_mmac")


@dataclass(frozen=True)
class PathResult:
    """A measured path: held-out top-1 (fraction), mean cross-entropy and, when known,
    its MACs (multiply-accumulates of one image)."""
    arch: Arch
    top1: float
    loss: float
    macs: int | None = None


@dataclass(frozen=True)
class CandidateScore:
    """The score of one enabled candidate: `kind` "op" (name an op such as "k5") or
    "width" (name a hidden width in channels) of searchable layer `layer`. `score` is
    the mean path score of the `count` sampled paths that used it (None when none did),
    `se` its standard error (None below `MIN_PATHS` paths); `gap` how much worse it is
    than the layer's best candidate of the same kind (in the metric's units; 0 for the
    best; None without a score); `z` = gap / SE of the gap (None without both SEs)."""
    layer: int
    kind: str
    name: str | int
    score: float | None
    count: int
    se: float | None
    gap: float | None
    z: float | None


def path_score(r: PathResult, metric: str) -> float:
    """The score of one measured path under `metric` (see `METRICS`)."""
    if metric == "accuracy":
        return r.top1
    if metric == "loss":
        return r.loss
    if metric == "accuracy_per_mmac":
        if not r.macs:
            raise ValueError(f"metric accuracy_per_mmac needs the MACs of every path; {r.arch} has {r.macs!r}")
        return r.top1 / (r.macs / 1e6)
    raise ValueError(f"shrink metric must be one of {list(METRICS)}, got {metric!r}")


def _mean_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n < MIN_PATHS:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def z_value(gap: float, se_best: float, se: float) -> float:
    """gap / sqrt(se_best^2 + se^2): infinite for a positive gap with both SEs 0, 0 for
    a gap within `TIE` of 0."""
    if abs(gap) <= TIE:
        return 0.0
    denom = math.sqrt(se_best ** 2 + se ** 2)
    if denom == 0:
        return math.inf if gap > 0 else -math.inf
    return gap / denom


def score_candidates(enabled: EnabledSpace, results: Sequence[PathResult],
                     metric: str = "accuracy") -> list[CandidateScore]:
    """Score every enabled (layer, op) and (layer, width) by the mean `metric` (see
    `METRICS`) of the `results` whose path used it, with its standard error, its gap to
    the best candidate of the same kind in its layer and the z-value of that gap (see
    the module doc). The layer's best is the best mean among candidates with at least
    `MIN_PATHS` paths (among all scored ones when none has that many; then no z).
    Returned in layer order, ops before widths, each in the space's order."""
    if metric not in METRICS:
        raise ValueError(f"shrink metric must be one of {list(METRICS)}, got {metric!r}")
    higher = metric != "loss"
    values = [path_score(r, metric) for r in results]
    out: list[CandidateScore] = []
    for i in range(enabled.num_layers):
        for kind, names, used in (
                ("op", enabled.ops(i), lambda r, n: r.arch[i].op == n),
                ("width", enabled.widths(i),
                 lambda r, n: r.arch[i].op != SKIP and r.arch[i].width == n)):
            stats = {}
            for name in names:
                vals = [v for r, v in zip(results, values) if used(r, name)]
                stats[name] = (*_mean_se(vals), len(vals))
            pool = [(m, se) for m, se, _ in stats.values() if se is not None] or \
                   [(m, se) for m, se, _ in stats.values() if m is not None]
            best = (max if higher else min)(pool, key=lambda t: t[0]) if pool else None
            for name, (mean, se, count) in stats.items():
                gap = z = None
                if mean is not None:
                    gap = best[0] - mean if higher else mean - best[0]
                    if se is not None and best[1] is not None:
                        z = z_value(gap, best[1], se)
                out.append(CandidateScore(i, kind, name, mean, count, se, gap, z))
    return out


def _floors(enabled: EnabledSpace, min_ops: int, min_widths: int):
    if min_ops < 1 or min_widths < 1:
        raise ValueError(f"min_ops and min_widths must be >= 1, got {min_ops} and {min_widths}")
    left = {"op": [len(enabled.ops(i)) for i in range(enabled.num_layers)],
            "width": [len(enabled.widths(i)) for i in range(enabled.num_layers)]}
    return left, {"op": min_ops, "width": min_widths}


def _is_enabled(enabled: EnabledSpace, layer: int, kind: str, name) -> bool:
    return enabled.is_enabled(layer, name) if kind == "op" else name in enabled.widths(layer)


def choose_drops(enabled: EnabledSpace, scores: Sequence[CandidateScore], threshold: float = 2.0,
                 max_op_drops: int = 2, max_width_drops: int = 2, min_ops: int = 1,
                 min_widths: int = 1, protected: Iterable[tuple] = ()) -> list[CandidateScore]:
    """The candidates to turn off: those with z > `threshold` (and a gap > `TIE`), most
    evident first (largest z, then largest gap, then (layer, kind, name)), at most
    `max_op_drops` ops and `max_width_drops` widths, skipping any whose removal would
    leave its layer with fewer than `min_ops` ops or `min_widths` widths and any in
    `protected` ((layer, kind, name) triples). A candidate without a z (fewer than
    `MIN_PATHS` paths) is never chosen. `enabled` is not modified."""
    if threshold < 0 or max_op_drops < 0 or max_width_drops < 0:
        raise ValueError(f"threshold and the drop budgets must be >= 0, got {threshold}, "
                         f"{max_op_drops} and {max_width_drops}")
    left, floor = _floors(enabled, min_ops, min_widths)
    budget = {"op": max_op_drops, "width": max_width_drops}
    protected = set(protected)
    ranked = sorted((s for s in scores if s.z is not None and s.z > threshold and s.gap > TIE),
                    key=lambda s: (-s.z, -s.gap, s.layer, s.kind, str(s.name)))
    chosen = []
    for s in ranked:
        if not _is_enabled(enabled, s.layer, s.kind, s.name):
            raise ValueError(f"layer {s.layer}: {s.kind} {s.name!r} is scored but not enabled")
        if budget[s.kind] == 0 or left[s.kind][s.layer] - 1 < floor[s.kind] \
                or (s.layer, s.kind, s.name) in protected:
            continue
        budget[s.kind] -= 1
        left[s.kind][s.layer] -= 1
        chosen.append(s)
    return chosen


def choose_random_drops(enabled: EnabledSpace, n_ops: int, n_widths: int, rng: random.Random,
                        min_ops: int = 1, min_widths: int = 1,
                        protected: Iterable[tuple] = ()) -> list[CandidateScore]:
    """The random control: `n_ops` ops, then `n_widths` widths, each drawn uniformly (by
    `rng`) among the candidates that may still legally be turned off: enabled, not
    `protected`, and leaving its layer at least `min_ops` ops / `min_widths` widths.
    Fewer when no legal candidate is left. Entries carry no score. `enabled` is not
    modified."""
    if n_ops < 0 or n_widths < 0:
        raise ValueError(f"random drop counts must be >= 0, got {n_ops} and {n_widths}")
    left, floor = _floors(enabled, min_ops, min_widths)
    protected = set(protected)
    chosen: list[CandidateScore] = []
    taken: set[tuple] = set()
    for kind, n in (("op", n_ops), ("width", n_widths)):
        for _ in range(n):
            legal = [(i, name) for i in range(enabled.num_layers)
                     if left[kind][i] - 1 >= floor[kind]
                     for name in (enabled.ops(i) if kind == "op" else enabled.widths(i))
                     if (i, kind, name) not in protected and (i, kind, name) not in taken]
            if not legal:
                break
            i, name = legal[rng.randrange(len(legal))]
            taken.add((i, kind, name))
            left[kind][i] -= 1
            chosen.append(CandidateScore(i, kind, name, None, 0, None, None, None))
    return chosen


def apply_drops(enabled: EnabledSpace, drops: Sequence[CandidateScore]) -> None:
    """Turn off the chosen candidates in `enabled`."""
    for s in drops:
        if s.kind == "op":
            enabled.disable_op(s.layer, s.name)
        else:
            enabled.disable_width(s.layer, s.name)


def candidate_macs(space) -> list[dict[tuple, int]]:
    """Per searchable layer of `space`, the MACs each (op, width) choice adds to an
    architecture (`bsnas.profiler.cost.flops`; skip is (SKIP, None)), relative to the
    layer's first choice: a layer's cost does not depend on the other layers' choices,
    so differences of these values are differences of whole architectures' MACs."""
    base = [LayerChoice(l.kernel_ops[0], l.widths[0]) if l.kernel_ops else LayerChoice(SKIP)
            for l in space.layers]
    total = cost.flops(space, Arch(space.name, base))
    out = []
    for i, layer in enumerate(space.layers):
        choices = [LayerChoice(op, w) for op in layer.kernel_ops for w in layer.widths]
        if layer.allows_skip:
            choices.append(LayerChoice(SKIP))
        row = {}
        for c in choices:
            arch = Arch(space.name, base[:i] + [c] + base[i + 1:])
            row[(c.op, c.width)] = cost.flops(space, arch) - total
        out.append(row)
    return out


def cheapest_arch(enabled: EnabledSpace) -> Arch:
    """The architecture of `enabled` with the fewest MACs: per layer its cheapest enabled
    (op, width) (ties: the space's order)."""
    table = candidate_macs(enabled.space)
    layers = []
    for i in range(enabled.num_layers):
        choices = [LayerChoice(op, w) for op in enabled.kernel_ops(i) for w in enabled.widths(i)]
        if SKIP in enabled.ops(i):
            choices.append(LayerChoice(SKIP))
        layers.append(min(choices, key=lambda c: table[i][(c.op, c.width)]))
    return Arch(enabled.space.name, layers)


def protected_candidates(enabled: EnabledSpace) -> set[tuple]:
    """(layer, kind, name) of the candidates `protect_cheapest` keeps: per layer the op
    of the cheapest architecture (`cheapest_arch`) and the narrowest enabled width, so
    that architecture, and the cheapest width of every kernel op, stay enabled."""
    arch = cheapest_arch(enabled)
    out = set()
    for i, c in enumerate(arch.layers):
        out.add((i, "op", c.op))
        out.add((i, "width", enabled.widths(i)[0]))
    return out


def enabled_digest(enabled: EnabledSpace) -> str:
    """A short hash of the enabled space (to check that DDP ranks agree)."""
    text = json.dumps(enabled.state_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fmt_candidate(s: dict, with_z: bool = True, why: str = "") -> str:
    where = f"L{s['layer']}:{s['name']}"
    if not with_z or s.get("z") is None:
        return where
    return f"{where} (gap {s['gap']:.3g}, z {s['z']:.2f}{why})"


def describe(record: dict, evident_kept: int = 3) -> str:
    """One log line for a decision `record` (as `Shrinker.decide` returns it): what was
    turned off with its gap and z-value, the most evident candidates that stayed on
    (with why, when beyond the threshold: protected, budget spent, or the layer's
    floor), and the size of the space."""
    random_mode = record.get("mode") == "random"
    rule = "at random" if random_mode else f"z > {record['threshold']:g}"
    dropped = ", ".join(_fmt_candidate(s, not random_mode) for s in record["dropped"]) or "none"
    gone = {(s["layer"], s["kind"], s["name"]) for s in record["dropped"]}
    kept = sorted((s for s in record["scores"] if s.get("z") is not None and s["z"] > 0
                   and (s["layer"], s["kind"], s["name"]) not in gone),
                  key=lambda s: -s["z"])[:evident_kept]
    protected = {(p["layer"], p["kind"], p["name"]) for p in record.get("protected", [])}
    spent = {"op": record["n_op_drops"] >= record["budget"]["ops"],
             "width": record["n_width_drops"] >= record["budget"]["widths"]}

    def why(s: dict) -> str:
        if s["z"] <= record["threshold"]:
            return ""
        if (s["layer"], s["kind"], s["name"]) in protected:
            return ", protected"
        return ", budget spent" if spent[s["kind"]] else ", layer at its floor"

    line = (f"shrinking after epoch {record['epoch']} ({record.get('mode', 'evidence')}, "
            f"{record.get('metric', '')}): {record['samples']} paths ({record['distinct_paths']} "
            f"distinct) in {record.get('seconds', 0.0):.1f}s; turned off {record['n_op_drops']}/"
            f"{record['budget']['ops']} ops and {record['n_width_drops']}/{record['budget']['widths']} "
            f"widths ({rule}): {dropped}")
    if not random_mode:
        line += "; most evident kept: " + (", ".join(_fmt_candidate(s, True, why(s)) for s in kept)
                                           or "none")
    return line + f"; space {record['size_before']:.3e} -> {record['size_after']:.3e} archs"


class Shrinker:
    """The shrinking schedule and decision rule (see the module doc); a
    `bsnas.train.trainer.Trainer` epoch hook: `trainer.epoch_hooks.append(Shrinker(...))`.

    `start`, `interval`: decisions after epochs start, start + interval, ... (epochs
    counted as completed epochs, so `start=6` decides after the sixth epoch), none
    after the last epoch `epochs` (None: no last epoch known); `samples`: paths
    sampled per decision; `threshold`, `max_op_drops`, `max_width_drops`, `min_ops`,
    `min_widths`, `metric` ("accuracy" or "loss"): the evidence rule; `mode`
    "evidence" or "random" (with `random_drops`, a list of [n_ops, n_widths] per
    decision; None: the budgets); `cost_aware` "none", "per_macs" or
    "protect_cheapest" with `macs_cap` (MACs, for the log and a warning); `seed`:
    the run's seed (paths depend on it and on the epoch only)."""

    def __init__(self, start: int, interval: int, samples: int, *, threshold: float = 2.0,
                 max_op_drops: int = 2, max_width_drops: int = 2, min_ops: int = 1,
                 min_widths: int = 2, metric: str = "accuracy", seed: int = 0,
                 epochs: int | None = None, mode: str = "evidence",
                 random_drops: Sequence[Sequence[int]] | None = None, cost_aware: str = "none",
                 macs_cap: float | None = None):
        if start < 0 or interval < 1 or samples < 1:
            raise ValueError(f"shrink needs start >= 0, interval >= 1 and samples >= 1, "
                             f"got {start}, {interval} and {samples}")
        if not (threshold >= 0 and math.isfinite(threshold)):
            raise ValueError(f"shrink threshold must be a finite number >= 0, got {threshold}")
        if max_op_drops < 0 or max_width_drops < 0:
            raise ValueError(f"shrink max_op_drops and max_width_drops must be >= 0, got "
                             f"{max_op_drops} and {max_width_drops}")
        if metric not in ("accuracy", "loss"):
            raise ValueError(f"shrink score must be 'accuracy' or 'loss', got {metric!r}")
        if min_ops < 1 or min_widths < 1:
            raise ValueError(f"shrink min_ops and min_widths must be >= 1, got {min_ops} and {min_widths}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"shrink epochs must be >= 1, got {epochs}")
        if mode not in MODES:
            raise ValueError(f"shrink mode must be one of {list(MODES)}, got {mode!r}")
        if cost_aware not in COST_AWARE:
            raise ValueError(f"shrink cost_aware must be one of {list(COST_AWARE)}, got {cost_aware!r}")
        if cost_aware == "per_macs" and metric != "accuracy":
            raise ValueError("shrink cost_aware per_macs needs score 'accuracy' (top-1 per MMAC)")
        if macs_cap is not None and not macs_cap > 0:
            raise ValueError(f"shrink macs_cap must be > 0, got {macs_cap}")
        if random_drops is not None:
            if mode != "random":
                raise ValueError("shrink random_drops is only used with mode 'random'")
            random_drops = [tuple(int(n) for n in pair) for pair in random_drops]
            if any(len(p) != 2 or min(p) < 0 for p in random_drops):
                raise ValueError(f"shrink random_drops must be [n_ops, n_widths] pairs >= 0, got {random_drops}")
        self.start, self.interval, self.samples, self.epochs = start, interval, samples, epochs
        self.threshold, self.max_op_drops, self.max_width_drops = float(threshold), max_op_drops, max_width_drops
        self.min_ops, self.min_widths, self.metric, self.seed = min_ops, min_widths, metric, seed
        self.mode, self.random_drops = mode, random_drops
        self.cost_aware, self.macs_cap = cost_aware, macs_cap
        if random_drops is not None and epochs is not None and len(random_drops) != len(self.decision_epochs()):
            raise ValueError(f"shrink random_drops has {len(random_drops)} entries but the schedule makes "
                             f"{len(self.decision_epochs())} decisions (after epochs {self.decision_epochs()})")

    @classmethod
    def from_config(cls, cfg) -> "Shrinker":
        """From a run config (`cfg.shrink`, `cfg.train.epochs`, `cfg.seed`; `macs_cap`
        defaults to `cfg.search.max_macs`)."""
        s = cfg.shrink
        cap = s.macs_cap if s.macs_cap is not None else cfg.search.max_macs
        return cls(s.start, s.interval, s.samples, threshold=s.threshold, max_op_drops=s.max_op_drops,
                   max_width_drops=s.max_width_drops, min_ops=s.min_ops, min_widths=s.min_widths,
                   metric=s.score, seed=cfg.seed, epochs=cfg.train.epochs, mode=s.mode,
                   random_drops=s.random_drops, cost_aware=s.cost_aware, macs_cap=cap)

    def settings(self) -> dict:
        return {"mode": self.mode, "start": self.start, "interval": self.interval,
                "epochs": self.epochs, "samples": self.samples, "threshold": self.threshold,
                "max_op_drops": self.max_op_drops, "max_width_drops": self.max_width_drops,
                "random_drops": [list(p) for p in self.random_drops] if self.random_drops else None,
                "min_ops": self.min_ops, "min_widths": self.min_widths, "score": self.metric,
                "cost_aware": self.cost_aware, "macs_cap": self.macs_cap, "seed": self.seed}

    # ------------------------------------------------------------------ steps
    def due(self, epoch: int) -> bool:
        """Whether a decision follows completed epoch `epoch` (never after the last
        epoch: the space it would shrink is not trained any more)."""
        if self.epochs is not None and epoch >= self.epochs:
            return False
        return epoch >= self.start and (epoch - self.start) % self.interval == 0

    def decision_epochs(self) -> list[int]:
        """The epochs after which decisions follow (needs `epochs`)."""
        if self.epochs is None:
            raise ValueError("Shrinker.decision_epochs needs the number of epochs")
        return [e for e in range(max(1, self.start), self.epochs) if self.due(e)]

    def drop_budget(self, epoch: int) -> tuple[int, int]:
        """(ops, widths) the decision after `epoch` may turn off: the budgets, or in random
        mode with `random_drops` the entry of this decision."""
        if self.mode != "random" or self.random_drops is None:
            return self.max_op_drops, self.max_width_drops
        k = (epoch - self.start) // self.interval
        if not 0 <= k < len(self.random_drops):
            raise ValueError(f"shrink random_drops has {len(self.random_drops)} entries; the decision "
                             f"after epoch {epoch} is number {k + 1}")
        return self.random_drops[k]

    def sample_paths(self, enabled: EnabledSpace, epoch: int) -> list[Arch]:
        """`samples` paths drawn uniformly from `enabled`, a function of (seed, epoch)
        and the enabled space only; none in random mode (it decides without them)."""
        if self.mode == "random":
            return []
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
        """Score, choose and apply a decision to `enabled`; returns its log record (see
        the module doc)."""
        space = enabled.space
        size_before = enabled.size()
        results = [r if r.macs is not None else replace(r, macs=cost.flops(space, r.arch))
                   for r in results]
        metric = "accuracy_per_mmac" if self.cost_aware == "per_macs" else self.metric
        scores = score_candidates(enabled, results, metric)
        protected = protected_candidates(enabled) if self.cost_aware == "protect_cheapest" else set()
        n_ops, n_widths = self.drop_budget(epoch)
        if self.mode == "random":
            rng = random.Random(f"{self.seed}:shrink-random:{epoch}")
            drops = choose_random_drops(enabled, n_ops, n_widths, rng, self.min_ops, self.min_widths,
                                        protected)
        else:
            drops = choose_drops(enabled, scores, self.threshold, n_ops, n_widths, self.min_ops,
                                 self.min_widths, protected)
        extra = {}
        if self.cost_aware == "protect_cheapest":
            cheapest = cost.flops(space, cheapest_arch(enabled))
            extra = {"cheapest_macs": cheapest, "macs_cap": self.macs_cap}
            if self.macs_cap is not None and cheapest > self.macs_cap:
                log.warning("shrinking: the cheapest architecture has %d MACs, above the cap %g: "
                            "no architecture meets it", cheapest, self.macs_cap)
        apply_drops(enabled, drops)
        return {
            "epoch": epoch, "mode": self.mode, "metric": metric, "samples": len(results),
            "distinct_paths": len(set(r.arch for r in results)),
            "paths": [{"arch": r.arch.to_dict(), "top1": r.top1, "loss": r.loss, "macs": r.macs}
                      for r in results],
            "scores": [asdict(s) for s in scores], "threshold": self.threshold,
            "budget": {"ops": n_ops, "widths": n_widths},
            "dropped": [asdict(s) for s in drops],
            "n_op_drops": sum(s.kind == "op" for s in drops),
            "n_width_drops": sum(s.kind == "width" for s in drops),
            "protected": [{"layer": i, "kind": k, "name": n} for i, k, n in
                          sorted(protected, key=lambda t: (t[0], t[1], str(t[2])))],
            **extra, "enabled": enabled.state_dict(),
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
            log.info("%s", describe(record))
        return record

    def write_log(self, decisions: list[dict], out_dir: str) -> str:
        """Write all decisions so far to `<out_dir>/shrink_log.json` (atomically)."""
        path = os.path.join(out_dir, LOG_NAME)
        save_json_atomic({"format": LOG_FORMAT, "settings": self.settings(),
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
