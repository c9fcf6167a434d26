"""Ranking study: does broadening and shrinking rank architectures better, and does its
search find a better model at equal MACs?

Measures the ranking correlation between a supernet's proxy accuracy and stand-alone
training, the way FairNAS measured SPOS (Kendall tau 0.62) against FairNAS (0.95), on
this project's own code: `--dataset fashion_mnist` (base config configs/fashion.yaml,
the study of record) or `--dataset digits` (configs/quickstart.yaml, the built-in data
set; its truth saturates, see benchmarks/results/ranking.md).

1. Supernets: one per (setting, supernet seed), `--supernet-seeds` S seeds each (the
   run's `seed`: initialisation, path sampling, batch order and its held-out split),
   all from one base config with its epoch-valued keys scaled to `--supernet-epochs`,
   differing only by the overrides below (same data, optimiser and number of steps):
     spos       SPOS: uniform single-path sampling of ops *and widths* from the first
                step, no broadening, no shrinking.
     broaden    the spring blocks' broadening schedule, no shrinking.
     bsnas      broadening and shrinking (BS-NAS).
     randshrink control: broadening and shrinking with `shrink.mode=random`: at every
                decision the same number of op and width drops as the bsnas run of the
                same seed made (`shrink.random_drops` from its shrink_log.json),
                chosen at random; it runs after that bsnas run.
     fair       (optional) spos with strict-fairness op sampling (m times the compute).
   `--setting NAME:key=value,...` adds a setting.
2. Architectures, the same for every setting, each set stratified by MACs (a pool of
   uniform samples sorted by MACs cut into K equal-count bins, one drawn per bin):
     A  `--archs` from the full space;
     B  `--archs-b` from the final enabled space of the bsnas supernet of seed 0 (where
        BS-NAS claims its gain: ranking inside the shrunk space).
3. Ground truth: every architecture exported as a plain model with fresh weights and
   trained from scratch with one recipe (SGD Nesterov, cosine to 0, label smoothing and
   weight decay of the base config, lr `--standalone-lr` per 256 images,
   `--standalone-epochs` epochs, fractional allowed: the first steps of the last epoch)
   on the training split; truth = top-1 on the validation set (Fashion-MNIST: the
   official t10k test set, never used to choose anything), averaged over
   `--truth-seeds` seeds (model init, batch order, augmentation). `--noise-archs` of
   set A (spread over MACs; all of A when the truth has several seeds) are trained with
   `--seeds` seeds: the seed noise, and the noise ceiling of tau.
4. Proxy: every architecture of A and B evaluated in every supernet on the first
   `--proxy-images` of its held-out split after BN recalibration
   (`bsnas.evaluator.PathEvaluator`), including those that shrinking turned off.
5. Statistics (scipy.stats): Kendall tau-b and Spearman rho against the truth, top-5
   overlap, regret of the proxy's first pick, tau within MACs bins (does the supernet
   know more than MACs?), MACs-only and params-only baselines; per setting a
   hierarchical bootstrap interval of the seed-mean tau (architectures resampled, then
   supernet seeds within the setting), and for each pair of settings a paired
   hierarchical bootstrap of the difference in tau (architectures resampled jointly
   across the two settings, seeds within each) with its 95% interval. Power: the
   half-width of the paired intervals is the smallest difference in tau the study
   resolves.
6. Search at equal cost: in every supernet the evolutionary search
   (`bsnas.strategy.evolution.Evolution`, fitness = proxy) under one MACs cap
   (`--max-macs`, default the median MACs of set A) over that supernet's enabled
   space, and random search with the same number of proxy evaluations over the same
   enabled space (best by proxy). Both winners are trained from scratch with
   `--retrain-seeds` seeds (the ground-truth recipe) and compared with the best
   architecture of set A under the cap (random architectures, by their truth).
7. `--pilot`: before the budget is spent, trains the noise architectures of A with two
   seeds at each of `--pilot-epochs` and reports the seed noise against the spread of
   the truth (and the tau ceiling it implies) and the seconds per model, so that the
   study buys epochs rather than architectures when the noise is not well below the
   spread; then stops.

Outputs in `--out` (default benchmarks/out/ranking-<dataset>[-quick]): base_config.yaml
(a copy of `--config`), archs.json, standalone.json and proxy.json (caches, written
atomically after every model: an interrupted run resumes where it stopped; a changed
recipe or setting gets new cache keys), supernets/<setting>-<hash>/ (trainer output and
checkpoints: a supernet resumes mid-training; search state), pilot.json, ranking.json
(statistics, and the compute each part took), ranking.md, scatter.png (proxy vs truth
per setting) and tau.png (tau with intervals). ranking.md also goes into
benchmarks/results/ranking.md (`--results`) between markers of its label, with the two
plots copied next to it as ranking-<label>-scatter.png and ranking-<label>-tau.png.
`--no-train` renders what the caches hold (partial results included) without training
anything.

Compute: `--small-space` swaps the config's space for `fashion-small` (SMALL_SPACE, 6
layers at 14x14 and 7x7: about a tenth of the `fashion` preset's cost per image);
`--set data.train_limit=N` trains supernets and stand-alone models on a seeded subset;
`--proxy-images` and `--set data.calib_images=N` bound the cost of each proxy. `--quick`
on fashion_mnist trains on 2,000 images.

Usage: python benchmarks/ranking.py --dataset fashion_mnist [--pilot] [--quick] [--jobs N]
Runs torch single-threaded; `--jobs 2` trains two models at a time on an idle 2-core
machine (a slot is refilled as soon as its model finishes).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import logging
import math
import os
import random
import resource
import sys
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Sequence

import numpy as np
from scipy import stats as sps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bsnas.config import DEFAULTS, Config, load_config  # noqa: E402
from bsnas.profiler import cost  # noqa: E402
from bsnas.space import Arch, EnabledSpace, load_space  # noqa: E402
from bsnas.train.checkpoint import save_json_atomic  # noqa: E402

log = logging.getLogger("ranking")

CONFIGS = {"digits": os.path.join(ROOT, "configs", "quickstart.yaml"),
           "fashion_mnist": os.path.join(ROOT, "configs", "fashion.yaml")}
BASE_CONFIG = CONFIGS["digits"]
RESULTS_MD = os.path.join(ROOT, "benchmarks", "results", "ranking.md")
SECTION = "## Ranking correlation"

#: `--small-space`: a 6-layer Fashion-MNIST space at 14x14 and 7x7 (the `fashion` preset's
#: 12 layers, first stage at 28x28, cost about 10x more per image: too much for a study of
#: some 60 stand-alone models and 8 supernets on a 2-core CPU within about 90 minutes).
SMALL_SPACE = """\
name: fashion-small
resolution: 28
in_channels: 1
classes: 10
activation: relu6
stem: {channels: 16, kernel: 3, stride: 2}
ops: [k3, k5, k7, skip]
width: {min_ratio: 1.0, max_ratio: 6.0, step: 1.0, round_to: 8}
stages:
  - {channels: 16, layers: 2, stride: 1}
  - {channels: 24, layers: 2, stride: 2}
  - {channels: 40, layers: 2, stride: 1}
head: {channels: 128, dropout: 0.1}
"""

SPOS = ["broaden.warmup_epochs=0", "broaden.broaden_epochs=0", "shrink.enabled=false"]
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "spos": ("(a) SPOS: uniform ops and widths from step 0, no broadening, no shrinking", SPOS),
    "broaden": ("(b) broadening, no shrinking", ["shrink.enabled=false"]),
    "bsnas": ("(c) broadening + shrinking (BS-NAS)", ["shrink.enabled=true"]),
    "randshrink": ("(r) broadening + random shrinking, as many drops as bsnas", ["shrink.enabled=true"]),
    "fair": ("(d) as (a) with strict-fairness op sampling (FairNAS)", SPOS + ["train.sampling=fair"]),
}
DEFAULT_SETTINGS = "spos,broaden,bsnas,randshrink"
#: Settings whose overrides are completed from another setting's run (randshrink <- bsnas).
DERIVED = {"randshrink": "bsnas"}


# --------------------------------------------------------------------------- statistics


def _pair(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"need two 1-d sequences of the same length >= 2, got {x.shape} and {y.shape}")
    return x, y


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of `x` (ascending), ties given their average rank (scipy.stats.rankdata)."""
    return sps.rankdata(np.asarray(x, dtype=float))


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (scipy.stats.kendalltau); nan when either side is constant."""
    x, y = _pair(x, y)
    if np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    # rounded: scipy's float noise would otherwise turn a perfect 1 into 0.9999999999999998
    return round(float(sps.kendalltau(x, y).statistic), 12)


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (scipy.stats.spearmanr); nan when either side is constant."""
    x, y = _pair(x, y)
    if np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return round(float(sps.spearmanr(x, y).statistic), 12)


def _percentiles(vals: np.ndarray, level: float) -> tuple[float, float]:
    vals = np.asarray(vals, dtype=float)
    vals = vals[~np.isnan(vals)]
    if len(vals) == 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def bootstrap_ci(x: Sequence[float], y: Sequence[float], stat: Callable, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of `stat(x, y)` over the n pairs
    (scipy.stats.bootstrap, paired, `n_boot` resamples); resamples where the statistic
    is undefined (nan, e.g. every pair the same) are left out. (nan, nan) when none is
    defined."""
    x, y = _pair(x, y)
    if n_boot <= 0:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sps.bootstrap((x, y), stat, paired=True, vectorized=False, n_resamples=n_boot,
                            method="percentile", random_state=np.random.default_rng(seed))
    return _percentiles(res.bootstrap_distribution, level)


def proxy_rank(proxy: Sequence[float], i: int) -> int:
    """Rank of item `i` by `proxy` (1 = highest), ties counted against it: the number of
    items whose proxy is >= its own."""
    p = np.asarray(proxy, dtype=float)
    return int(np.sum(p >= p[i]))


def best_rank(proxy: Sequence[float], truth: Sequence[float]) -> int:
    """The proxy rank (see `proxy_rank`) of the best item by `truth`; with several
    best items, the best-ranked of them."""
    t = np.asarray(truth, dtype=float)
    return min(proxy_rank(proxy, i) for i in np.flatnonzero(t == t.max()))


def topk_hit(proxy: Sequence[float], truth: Sequence[float], k: int = 3) -> bool:
    """Whether the best item by `truth` is among the proxy's top `k` (ties at the
    boundary count against it)."""
    return best_rank(proxy, truth) <= k


def pick_gap(proxy: Sequence[float], truth: Sequence[float]) -> float:
    """Regret of the proxy's first pick: max(truth) minus the truth of the proxy's best
    item (the worst of them when the proxy ties). Same units as `truth`."""
    p, t = np.asarray(proxy, dtype=float), np.asarray(truth, dtype=float)
    return float(t.max() - t[p == p.max()].min())


regret = pick_gap


def topk_overlap(proxy: Sequence[float], truth: Sequence[float], k: int = 5) -> float:
    """Fraction of the top `k` by `truth` that are also in the top `k` by `proxy`
    (ties broken by position, the same rule on both sides); k is capped at n."""
    p, t = _pair(proxy, truth)
    k = min(k, len(p))
    top = lambda v: set(np.lexsort((np.arange(len(v)), -v))[:k].tolist())  # noqa: E731
    return len(top(p) & top(t)) / k


def mac_bins(macs: Sequence[float], bins: int) -> np.ndarray:
    """Equal-count MACs bins: the bin index 0..bins-1 of every item (by MACs rank)."""
    m = np.asarray(macs, dtype=float)
    order = np.argsort(m, kind="mergesort")
    out = np.empty(len(m), dtype=int)
    out[order] = np.minimum(np.arange(len(m)) * bins // max(1, len(m)), bins - 1)
    return out


def binned_tau(proxy: Sequence[float], truth: Sequence[float], macs: Sequence[float], bins: int = 3) -> float:
    """Kendall tau-b within equal-count MACs bins, averaged with weights = the pairs of
    each bin: how well the proxy ranks architectures of similar cost, i.e. what it
    knows beyond MACs. nan when no bin has a defined tau."""
    p, t = _pair(proxy, truth)
    b = mac_bins(macs, bins)
    taus, weights = [], []
    for j in range(bins):
        sel = b == j
        n = int(sel.sum())
        if n >= 2:
            v = kendall_tau(p[sel], t[sel])
            if not math.isnan(v):
                taus.append(v)
                weights.append(n * (n - 1) / 2)
    return float(np.average(taus, weights=weights)) if taus else math.nan


def _nanmean(v) -> float:
    """Mean of the defined values; nan when none is."""
    v = [x for x in v if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def seed_noise(acc: np.ndarray) -> tuple[float, float]:
    """Seed noise of stand-alone accuracies `acc` [archs, seeds] (every architecture
    trained with the same seeds): (pooled within-architecture std, interaction std).
    The interaction std leaves out the shift a seed gives every architecture alike
    (two-way residual: acc - arch mean - seed mean + grand mean, with (A-1)(S-1) degrees
    of freedom); only it reorders architectures trained with one common seed."""
    acc = np.asarray(acc, dtype=float)
    if acc.ndim != 2 or acc.shape[1] < 2:
        raise ValueError(f"need accuracies [archs, seeds >= 2], got shape {acc.shape}")
    pooled = float(math.sqrt(np.mean(np.var(acc, axis=1, ddof=1))))
    if acc.shape[0] < 2:
        return pooled, math.nan
    r = acc - acc.mean(axis=1, keepdims=True) - acc.mean(axis=0, keepdims=True) + acc.mean()
    return pooled, float(math.sqrt(np.sum(r * r) / ((acc.shape[0] - 1) * (acc.shape[1] - 1))))


def noise_ceiling(truth: Sequence[float], sigma: float, draws: int = 1000, seed: int = 0) -> float:
    """Approximately the best Kendall tau a proxy could reach against `truth` when
    stand-alone training itself has seed noise `sigma`: the mean tau between `truth` and
    `truth` plus Gaussian noise of standard deviation sigma * sqrt(2) (the difference of
    two independent seeds)."""
    t = np.asarray(truth, dtype=float)
    if not sigma > 0:
        return 1.0
    rng = np.random.default_rng(seed)
    return _nanmean([kendall_tau(t, t + rng.normal(0, sigma * math.sqrt(2), len(t))) for _ in range(draws)])


def seed_mean_tau(proxies: np.ndarray, truth: np.ndarray, idx: np.ndarray | None = None,
                  seeds: np.ndarray | None = None) -> float:
    """Mean over supernet seeds (rows of `proxies` [S, K], or the rows `seeds`) of the
    Kendall tau-b against `truth` [K], on the architectures `idx` (default all)."""
    idx = np.arange(proxies.shape[1]) if idx is None else idx
    seeds = np.arange(proxies.shape[0]) if seeds is None else seeds
    vals = [kendall_tau(proxies[s, idx], truth[idx]) for s in seeds]
    return float(np.mean(vals))  # nan when any seed is undefined


def hierarchical_bootstrap(truth: Sequence[float], proxies: dict[str, np.ndarray], n_boot: int = 1000,
                           seed: int = 0, level: float = 0.95) -> dict:
    """Hierarchical bootstrap of the seed-mean Kendall tau of several settings on the
    same K architectures. `proxies[name]` is [S_name, K] (one row per supernet seed).
    Each resample draws K architectures with replacement, the same for every setting
    (paired), then within each setting its S seeds with replacement, and computes each
    setting's seed-mean tau. Returns {"tau": {name: point}, "ci": {name: (lo, hi)},
    "diff": {(a, b): {"diff", "ci", "half_width"}}} for every ordered pair a < b in
    `proxies`' order; resamples with an undefined tau are left out of that statistic."""
    t = np.asarray(truth, dtype=float)
    names = list(proxies)
    P = {n: np.atleast_2d(np.asarray(proxies[n], dtype=float)) for n in names}
    for n in names:
        if P[n].shape[1] != len(t):
            raise ValueError(f"setting {n!r}: {P[n].shape[1]} proxies for {len(t)} architectures")
    rng = np.random.default_rng(seed)
    K = len(t)
    boot = {n: np.empty(n_boot) for n in names}
    for b in range(n_boot):
        idx = rng.integers(0, K, K)
        for n in names:
            s = rng.integers(0, P[n].shape[0], P[n].shape[0])
            boot[n][b] = seed_mean_tau(P[n], t, idx, s)
    point = {n: seed_mean_tau(P[n], t) for n in names}
    out = {"tau": point, "ci": {n: _percentiles(boot[n], level) for n in names}, "diff": {}}
    for a, b in itertools.combinations(names, 2):
        lo, hi = _percentiles(boot[a] - boot[b], level)
        out["diff"][(a, b)] = {"diff": point[a] - point[b], "ci": (lo, hi),
                               "half_width": (hi - lo) / 2 if not math.isnan(lo) else math.nan}
    return out


def correlation(proxy: Sequence[float], truth: Sequence[float], n_boot: int = 1000, seed: int = 0,
                k: int = 3, macs: Sequence[float] | None = None, bins: int = 3) -> dict:
    """Every statistic of one proxy against one ground truth."""
    out = {"kendall_tau": kendall_tau(proxy, truth),
           "kendall_ci": bootstrap_ci(proxy, truth, kendall_tau, n_boot, seed),
           "spearman_rho": spearman_rho(proxy, truth),
           "spearman_ci": bootstrap_ci(proxy, truth, spearman_rho, n_boot, seed + 1),
           f"top{k}_hit": topk_hit(proxy, truth, k), "best_rank": best_rank(proxy, truth),
           "pick_gap": pick_gap(proxy, truth), "top5_overlap": topk_overlap(proxy, truth, 5)}
    if macs is not None:
        out["binned_tau"] = binned_tau(proxy, truth, macs, bins)
    return out


# --------------------------------------------------------------------------- set-up


def digest(obj) -> str:
    """A short, stable hash of a JSON-serialisable object (cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def base_config(supernet_epochs: int, overrides: Sequence[str] = (), path: str = BASE_CONFIG) -> Config:
    """The config file at `path` (default configs/quickstart.yaml) with `train.epochs =
    supernet_epochs` and its epoch-valued schedule (learning-rate warm-up, broadening
    warm-up and length, shrink start and interval) scaled by the same factor, then
    `overrides`."""
    q = load_config(path)
    f = supernet_epochs / q.train.epochs
    scaled = [f"train.epochs={supernet_epochs}",
              f"train.warmup_epochs={q.train.warmup_epochs * f:g}",
              f"broaden.warmup_epochs={q.broaden.warmup_epochs * f:g}",
              f"broaden.broaden_epochs={q.broaden.broaden_epochs * f:g}",
              f"shrink.start={max(1, round(q.shrink.start * f))}",
              f"shrink.interval={max(1, round(q.shrink.interval * f))}",
              "train.progress=false", "train.keep_checkpoints=1", "train.log_every=10",
              f"train.eval_every={supernet_epochs}"]
    return load_config(path, scaled + list(overrides))


def setting_config(base: Config, overrides: Sequence[str]) -> Config:
    """`base` with a setting's overrides applied (out_dir is set later)."""
    return load_config(None, list(overrides), extra=base.to_dict())


#: Config keys that change how a run executes but not what it computes: left out of the
#: supernets' cache keys, so that a new default of one of them keeps the caches valid.
RUNTIME_KEYS = {"out_dir", "keep_freed_memory", "device", "data.workers", "data.verify", "data.cache_dir",
                "data.eval_batch_size", "train.progress", "train.log_every", "train.keep_checkpoints",
                "train.checkpoint_every", "train.eval_every"}


def result_keys(cfg: dict) -> dict:
    """`cfg` (a nested dict) without `RUNTIME_KEYS`: what a supernet's cache key hashes."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out[k] = {kk: vv for kk, vv in v.items() if f"{k}.{kk}" not in RUNTIME_KEYS}
        elif k not in RUNTIME_KEYS:
            out[k] = v
    return out


def random_shrink_available() -> bool:
    """Whether this bsnas has the random-shrinking control (config key shrink.mode)."""
    return "mode" in DEFAULTS["shrink"] and "random_drops" in DEFAULTS["shrink"]


def drops_per_decision(shrink_log: dict) -> list[list[int]]:
    """[[n_op_drops, n_width_drops], ...] of every decision of a `shrink_log.json`
    (counted from the dropped list when the record has no counts)."""
    out = []
    for d in shrink_log.get("decisions", []):
        dropped = d.get("dropped", [])
        n_op = d.get("n_op_drops", sum(s.get("kind") == "op" for s in dropped))
        n_w = d.get("n_width_drops", sum(s.get("kind") == "width" for s in dropped))
        out.append([int(n_op), int(n_w)])
    return out


def select_archs(space, k: int, seed: int = 0, pool: int = 4000, enabled: EnabledSpace | None = None,
                 tag: str = "ranking") -> list[Arch]:
    """`k` distinct architectures spread over the MAC range: `pool` uniform samples (of
    `enabled` when given, else of the space) sorted by MACs, cut into `k` equal-count
    bins, one drawn at random from each bin. Returned in ascending MACs."""
    rng = random.Random(f"{tag}:{seed}")
    draw = (lambda: enabled.sample(rng)) if enabled is not None else (lambda: space.sample(rng))
    archs = sorted({draw() for _ in range(pool)}, key=lambda a: (cost.flops(space, a), str(a)))
    if len(archs) < k:
        raise ValueError(f"only {len(archs)} distinct architectures in the pool, need {k}")
    bounds = np.linspace(0, len(archs), k + 1).round().astype(int)
    return [archs[rng.randrange(lo, hi)] for lo, hi in zip(bounds[:-1], bounds[1:])]


def noise_indices(k: int, n: int) -> list[int]:
    """`n` of the `k` MAC-sorted architectures spread evenly: lowest, ..., highest."""
    if n <= 0:
        return []
    if n == 1:
        return [k // 2]
    return sorted({int(round(i * (k - 1) / (n - 1))) for i in range(n)})


# --------------------------------------------------------------------------- tasks

_DATA: dict = {}


def _data(cfg: Config, space):
    """`build_data` once per process and data config."""
    from bsnas.train.runtime import Dist, build_data
    key = digest({"data": cfg.data.to_dict(), "seed": cfg.seed, "space": space.to_dict()})
    if key not in _DATA:
        _DATA[key] = build_data(cfg, space, torch.device("cpu"), Dist())
    return _DATA[key]


def train_standalone(cfg_dict: dict, recipe: dict, arch_dict: dict, seed: int) -> dict:
    """Train one architecture from scratch with `recipe` (`epochs` may be fractional:
    the last epoch stops after its share of the batches); its validation
    accuracy (top-1 and loss on the validation set: Fashion-MNIST's t10k). Runs in a worker
    process or in-process."""
    from bsnas.evaluator import evaluate
    from bsnas.nn.static import static_twin
    from bsnas.pipeline.retrain import reinitialize, train_epoch
    from bsnas.supernet import Supernet
    from bsnas.train.runtime import lr_lambda, param_groups, seed_everything

    torch.set_num_threads(1)
    tic, cpu = time.perf_counter(), time.process_time()
    cfg = load_config(None, extra=cfg_dict)
    space = load_space(cfg.space)
    arch = space.validate(Arch.from_dict(arch_dict))
    data = _data(cfg, space)
    seed_everything(1000 + seed, False)
    model = reinitialize(static_twin(Supernet(space), arch))
    t = cfg.train
    per_epoch = len(data.train)
    steps = max(1, int(round(recipe["epochs"] * per_epoch)))
    opt = torch.optim.SGD(param_groups(model, t.weight_decay),
                          lr=recipe["lr"] * cfg.data.batch_size / 256, momentum=t.momentum,
                          nesterov=t.nesterov and t.momentum > 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, 0, t.schedule))
    losses = []
    for epoch in range(math.ceil(steps / per_epoch)):
        # other seeds see other batch orders and augmentations over the same split
        data.train.set_epoch(epoch + 1000 * seed)
        n = min(per_epoch, steps - epoch * per_epoch)
        losses += train_epoch(model, data.train if n == per_epoch else itertools.islice(data.train, n),
                              opt, sched, t.label_smoothing)
    val = evaluate(model, data.val)
    return {"arch": arch.to_dict(), "seed": seed, "val_top1": val["top1"], "val_loss": val["loss"],
            "steps": steps, "final_train_loss": float(np.mean(losses[-min(len(losses), per_epoch):]))
            if losses else math.nan,
            "seconds": round(time.perf_counter() - tic, 2),
            "cpu_seconds": round(time.process_time() - cpu, 2)}


def _first_images(loader, n: int):
    """The batches of `loader` holding its first `n` images (all when n <= 0), as a
    list, the last one cut to size."""
    if n <= 0:
        return loader
    out, have = [], 0
    for x, y in loader:
        take = min(len(y), n - have)
        out.append((x[:take], y[:take]))
        have += take
        if have >= n:
            break
    return out


def run_search(evaluator, enabled: EnabledSpace, space, spec: dict, seed: int, state_path: str) -> dict:
    """Evolutionary search of `enabled` under `spec["max_macs"]` with the proxy as
    fitness, then random search with the same number of proxy evaluations over the same
    enabled space under the same cap (best by proxy). `spec`: max_macs, population,
    generations, top_k, mutants, crossovers, mutation_prob."""
    from bsnas.strategy.evolution import Constraints, Evolution, EvolutionParams

    tic = time.perf_counter()
    params = EvolutionParams(population=spec["population"], generations=spec["generations"],
                             top_k=spec["top_k"], mutants=spec["mutants"],
                             mutation_prob=spec["mutation_prob"], crossovers=spec["crossovers"])
    cap = spec["max_macs"]
    fitness = {}

    def proxy(arch: Arch) -> dict:
        if arch not in fitness:
            with torch.random.fork_rng(devices=[]):
                fitness[arch] = evaluator(arch)
        return fitness[arch]

    try:
        evo = Evolution(enabled, lambda a: proxy(a)["top1"], params, Constraints(max_macs=cap), seed,
                        state_path, {"spec": spec})
        result = evo.run(resume=True)
    except ValueError as e:  # e.g. the cap is not attainable in the enabled space
        return {"error": str(e)}
    best = result.best
    evo_s = time.perf_counter() - tic
    n = len(result.candidates)
    rng = random.Random(f"random-search:{seed}")
    sampled: list[Arch] = []
    seen = set()
    for _ in range(1000 * n):
        if len(sampled) >= n:
            break
        a = enabled.sample(rng)
        if a not in seen and cost.flops(space, a) <= cap:
            seen.add(a)
            sampled.append(a)
    rows = [(proxy(a)["top1"], a) for a in sampled]
    r_top1, r_best = max(rows, key=lambda r: (r[0], -cost.flops(space, r[1])))
    return {"evolution": {"arch": best.arch.to_dict(), "str": str(best.arch), "proxy_top1": best.top1,
                          "macs": cost.flops(space, best.arch), "evaluations": n,
                          "seconds": round(evo_s, 1)},
            "random": {"arch": r_best.to_dict(), "str": str(r_best), "proxy_top1": r_top1,
                       "macs": cost.flops(space, r_best), "evaluations": len(rows),
                       "seconds": round(time.perf_counter() - tic - evo_s, 1)}}


def train_supernet(cfg_dict: dict, arch_dicts: list[dict], done: list[str], proxy_images: int = 0,
                   search: dict | None = None) -> dict:
    """Train (or resume) one supernet setting, measure the architectures whose keys are
    not in `done` on the first `proxy_images` held-out images after BN recalibration,
    and, with `search` (see `run_search`), run the searches at equal cost."""
    from bsnas.evaluator import PathEvaluator
    from bsnas.strategy.shrinking import Shrinker
    from bsnas.train.trainer import Trainer

    torch.set_num_threads(1)
    tic, cpu = time.perf_counter(), time.process_time()
    cfg = load_config(None, extra=cfg_dict)
    trainer = Trainer(cfg, resume=True)
    resumed_at = trainer.epoch
    if cfg.shrink.enabled:
        trainer.epoch_hooks.append(Shrinker.from_config(cfg))
    trainer.fit()
    train_s, train_cpu = time.perf_counter() - tic, time.process_time() - cpu
    evaluator = PathEvaluator(trainer.supernet, trainer.data.calib,
                              _first_images(trainer.data.holdout, proxy_images))
    proxies = {}
    for d in arch_dicts:
        key = digest(d)
        if key in done:
            continue
        arch = Arch.from_dict(d)
        with torch.random.fork_rng(devices=[]):
            r = evaluator(arch)
        proxies[key] = {"top1": r["top1"], "loss": r["loss"], "enabled": trainer.enabled.contains(arch)}
    eval_s = time.perf_counter() - tic - train_s
    searched = None
    if search is not None:
        searched = run_search(evaluator, trainer.enabled, trainer.space, search, cfg.seed,
                              os.path.join(cfg.out_dir, f"search-{digest(search)}.json"))
        searched["key"] = digest(search)
    decisions = trainer.extra_state.get("shrink", {}).get("decisions", [])
    last = trainer.history[-1] if trainer.history else {}
    return {"proxies": proxies, "enabled": trainer.enabled.state_dict(),
            "enabled_size": trainer.enabled.size(), "space_size": trainer.space.size(),
            "decisions": [{"epoch": d["epoch"], "dropped": [f"L{s['layer']}:{s['name']}" for s in d["dropped"]],
                           "size_after": d["size_after"]} for d in decisions],
            "largest_holdout_top1": last.get("holdout_top1"), "largest_val_top1": last.get("val_top1"),
            "steps": trainer.step, "resumed_at_epoch": resumed_at, "search": searched,
            "proxy_images": proxy_images, "train_seconds": round(train_s, 1),
            "train_cpu_seconds": round(train_cpu, 1), "proxy_seconds": round(eval_s, 1),
            "seconds": round(time.perf_counter() - tic, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1)}


# --------------------------------------------------------------------------- analysis


def shrink_diagnostics(shrink_log: dict) -> list[dict]:
    """How noisy each shrinking decision was (from a `shrink_log.json`): the spread of
    the sampled paths' held-out top-1, how many paths scored a candidate (median), and
    how many dropped candidates were within noise of their layer's best: z (gap over
    the standard error of the gap) under 2, from the log's `z` when it records one, else
    from the path std x sqrt(1/n_a + 1/n_b)."""
    out = []
    for d in shrink_log.get("decisions", []):
        top1 = np.array([p["top1"] for p in d.get("paths", [])])
        sd = float(np.std(top1, ddof=1)) if len(top1) > 1 else math.nan
        scored = [s for s in d.get("scores", []) if s.get("score") is not None]
        best = {(s["layer"], s["kind"]): s["count"] for s in scored if s["gap"] == 0}
        within = 0
        for s in d.get("dropped", []):
            if s.get("z") is not None:
                within += s["z"] < 2
            elif (s["layer"], s["kind"]) in best and s["count"]:
                within += s["gap"] < 2 * sd * math.sqrt(1 / s["count"] + 1 / best[(s["layer"], s["kind"])])
        out.append({"epoch": d["epoch"], "paths": len(top1),
                    "path_top1_mean": float(np.mean(top1)) if len(top1) else math.nan,
                    "path_top1_std": sd,
                    "median_count": float(np.median([s["count"] for s in scored])) if scored else math.nan,
                    "dropped": len(d.get("dropped", [])), "dropped_within_noise": int(within),
                    "dropped_counts": [s["count"] for s in d.get("dropped", [])]})
    return out


def _fmt_ci(v: float, ci) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if ci is None or any(c is None or math.isnan(c) for c in ci):
        return f"{v:.2f}"
    return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _fmt_points(d: dict) -> str:
    """A difference of accuracies (`diff` with its interval `ci`, fractions) in points."""
    return _fmt_ci(100 * d["diff"], tuple(100 * c for c in d["ci"]))


def analyse_set(archs: list[Arch], space, truth: dict, proxies: dict[str, list[dict]], n_boot: int,
                bins: int = 3, seed: int = 0) -> dict | None:
    """Statistics of one architecture set. `truth[key]` = stand-alone validation top-1
    (see `Study.truth`); `proxies[setting]` = one proxy dict per supernet seed (key -> {"top1",
    "enabled"}). Architectures without truth, and seeds without every proxy, are left
    out. None when fewer than 3 architectures have a truth."""
    keys = [digest(a.to_dict()) for a in archs]
    have = [i for i, k in enumerate(keys) if k in truth]
    if len(have) < 3:
        return None
    keys = [keys[i] for i in have]
    archs = [archs[i] for i in have]
    t = np.array([truth[k] for k in keys])
    macs = np.array([cost.flops(space, a) for a in archs], dtype=float)
    prm = np.array([cost.params(space, a) for a in archs], dtype=float)
    rows, matrices = {}, {}
    for name, p in (("MACs (no supernet)", macs), ("params (no supernet)", prm)):
        c = correlation(p, t, n_boot, seed, macs=macs, bins=bins)
        rows[name] = {"baseline": True, "seeds": 1, "vs_val": c, "tau_mean": c["kendall_tau"],
                      "tau_ci": c["kendall_ci"], "rho_mean": c["spearman_rho"],
                      "top5_overlap": c["top5_overlap"], "regret": c["pick_gap"],
                      "binned_tau": c["binned_tau"], "best_rank": c["best_rank"]}
    matrices["MACs"] = macs[None, :]
    for name, per_seed in proxies.items():
        full = [p for p in per_seed if p is not None and all(k in p for k in keys)]
        if not full:
            continue
        P = np.array([[p[k]["top1"] for k in keys] for p in full])
        matrices[name] = P
        per = [correlation(P[s], t, 0 if s else n_boot, seed, macs=macs, bins=bins) for s in range(len(P))]
        rows[name] = {"baseline": False, "seeds": len(P), "vs_val": per[0], "per_seed": per,
                      "tau_mean": _nanmean([c["kendall_tau"] for c in per]),
                      "rho_mean": _nanmean([c["spearman_rho"] for c in per]),
                      "top5_overlap": _nanmean([c["top5_overlap"] for c in per]),
                      "regret": _nanmean([c["pick_gap"] for c in per]),
                      "binned_tau": _nanmean([c["binned_tau"] for c in per]),
                      "best_rank": _nanmean([c["best_rank"] for c in per]),
                      "outside_enabled": [int(sum(not full[s][k]["enabled"] for k in keys))
                                          for s in range(len(P))],
                      # what the proxy ranks by: size, and how much its seeds agree
                      "macs_tau": _nanmean([kendall_tau(P[s], macs) for s in range(len(P))]),
                      "seed_tau": _nanmean([kendall_tau(P[i], P[j])
                                            for i, j in itertools.combinations(range(len(P)), 2)]),
                      "proxy_top1": P.tolist()}
    hb = hierarchical_bootstrap(t, matrices, n_boot, seed)
    for name in matrices:
        if name != "MACs":
            rows[name]["tau_ci"] = hb["ci"][name]
    rows["MACs (no supernet)"]["tau_ci_hier"] = hb["ci"]["MACs"]
    diffs = [{"a": a, "b": b, **v} for (a, b), v in hb["diff"].items()]
    widths = [d["half_width"] for d in diffs if "MACs" not in (d["a"], d["b"]) and not math.isnan(d["half_width"])]
    return {"keys": keys, "archs": [str(a) for a in archs], "truth": t.tolist(), "macs": macs.tolist(),
            "params": prm.tolist(), "rows": rows, "diffs": diffs,
            "power": float(np.median(widths)) if widths else math.nan,
            "spread": float(np.std(t, ddof=1))}


def noise_stats(archs: list[Arch], space, standalone: dict, noise: list[int], seeds: int,
                truth: np.ndarray | None, truth_seeds: int = 1) -> dict:
    """Seed noise of the stand-alone truth over the noise architectures: per
    architecture the accuracies of its seeds; pooled std and the interaction std
    (`seed_noise`); the tau ceiling the interaction implies for `truth` (the K
    accuracies, each a mean of `truth_seeds` seeds, whose noise is sigma / sqrt of it)."""
    rows, variances = [], []
    for i in noise:
        k = digest(archs[i].to_dict())
        vals = [standalone[(k, s)]["val_top1"] for s in range(seeds) if (k, s) in standalone]
        if not vals:
            continue
        if len(vals) >= 2:
            variances.append(np.var(vals, ddof=1))
        rows.append({"index": i, "arch": str(archs[i]), "macs": int(cost.flops(space, archs[i])),
                     "val_top1": vals, "mean": float(np.mean(vals)),
                     "std": float(np.std(vals, ddof=1)) if len(vals) >= 2 else math.nan})
    pooled = float(math.sqrt(np.mean(variances))) if variances else math.nan
    full = [r["val_top1"] for r in rows if len(r["val_top1"]) == seeds]
    sigma = seed_noise(np.array(full))[1] if seeds >= 2 and len(full) >= 2 else math.nan
    known = truth is not None and len(truth) >= 2 and not math.isnan(sigma)
    ceiling = noise_ceiling(truth, sigma / math.sqrt(truth_seeds), 500) if known else math.nan
    # the spread of the truth less its seed noise: how far apart the architectures really are
    true_spread = math.sqrt(max(float(np.var(truth, ddof=1)) - sigma ** 2 / truth_seeds, 0.0)) if known \
        else math.nan
    return {"rows": rows, "seed_sigma": sigma, "pooled_sigma": pooled, "ceiling": ceiling,
            "truth_seeds": truth_seeds, "true_spread": true_spread}


def group_mean_diff(a: list[list[float]], b: list[list[float]], n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict:
    """Difference of the means of two two-level samples (groups = the winners of
    supernet seeds, values = their retraining seeds): the mean of group means, and a
    bootstrap interval that draws groups with replacement, then values within each
    drawn group, independently for `a` and `b`."""
    a, b = [g for g in a if g], [g for g in b if g]
    if not a or not b:
        return {"diff": math.nan, "ci": (math.nan, math.nan)}
    rng = np.random.default_rng(seed)

    def draw(groups):
        picked = [groups[i] for i in rng.integers(len(groups), size=len(groups))]
        return float(np.mean([np.mean(rng.choice(g, len(g))) for g in picked]))

    point = float(np.mean([np.mean(g) for g in a]) - np.mean([np.mean(g) for g in b]))
    return {"diff": point, "ci": _percentiles(np.array([draw(a) - draw(b) for _ in range(n_boot)]), level)}


def search_stats(searches: dict[str, list[dict | None]], standalone_by_arch: Callable[[dict], list[float]],
                 cap: float, set_a: dict | None, reference: str = "bsnas", n_boot: int = 1000) -> dict:
    """The searched models' from-scratch test accuracy per setting (evolution and random
    search at the same number of proxy evaluations), pooled over supernet seeds and
    retraining seeds; `reference`'s evolution winners minus every other setting's, and
    each setting's evolution minus its random search (`group_mean_diff`); the best
    random architecture of set A under the cap."""
    out = {"cap": cap, "settings": {}, "diffs": []}
    groups: dict = {}
    for name, per_seed in searches.items():
        row = {}
        for kind in ("evolution", "random"):
            winners, vals = [], []
            for s in per_seed:
                if not s or kind not in s:
                    continue
                v = standalone_by_arch(s[kind]["arch"])
                groups.setdefault((name, kind), []).append(v)
                winners.append({"str": s[kind]["str"], "macs": s[kind]["macs"], "proxy_top1": s[kind]["proxy_top1"],
                                "evaluations": s[kind]["evaluations"], "test_top1": v})
                vals += v
            row[kind] = {"winners": winners, "mean": _nanmean(vals),
                         "std": float(np.std(vals, ddof=1)) if len(vals) >= 2 else math.nan, "n": len(vals)}
        out["settings"][name] = row
    pairs = [((reference, "evolution"), (name, "evolution")) for name in searches if name != reference] \
        + [((name, "evolution"), (name, "random")) for name in searches]
    for x, y in pairs:
        if x in groups and y in groups:
            out["diffs"].append({"a": x, "b": y, **group_mean_diff(groups[x], groups[y], n_boot)})
    if set_a is not None:
        under = [(t, a, m) for t, a, m in zip(set_a["truth"], set_a["archs"], set_a["macs"]) if m <= cap]
        if under:
            t, a, m = max(under)
            out["random_a"] = {"n": len(under), "best": t, "best_arch": a, "best_macs": m,
                               "mean": float(np.mean([u[0] for u in under]))}
    return out


def scatter(path: str, sets: dict, settings: dict) -> str | None:
    """Proxy (held-out top-1, seed 0) against stand-alone test top-1 per setting; set A
    as circles, set B as crosses."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    names = [n for n in settings if any(s and n in s["rows"] for s in sets.values())]
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names) + 1, 3.9), squeeze=False,
                             constrained_layout=True)
    # one colour scale for both sets and every panel
    all_macs = [m for s in sets.values() if s for m in s["macs"]]
    vmin, vmax = min(all_macs) / 1e6, max(all_macs) / 1e6
    for ax, name in zip(axes[0], names):
        title = [name]
        for label, marker in (("A", "o"), ("B", "x")):
            s = sets.get(label)
            if not s or name not in s["rows"]:
                continue
            r = s["rows"][name]
            sc = ax.scatter(100 * np.asarray(s["truth"]), 100 * np.asarray(r["proxy_top1"][0]),
                            c=np.asarray(s["macs"]) / 1e6, cmap="viridis", vmin=vmin, vmax=vmax, s=24,
                            marker=marker, label=f"set {label}")
            title.append(f"{label}: tau {r['tau_mean']:.2f}")
        ax.set(xlabel="stand-alone test top-1 (%)", ylabel="proxy, held-out top-1 (%)")
        ax.set_title(f"{title[0]}\n" + ", ".join(title[1:]), fontsize=9)
        ax.legend(fontsize=7)
    fig.colorbar(sc, ax=axes[0].tolist(), label="MACs (M)")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def tau_plot(path: str, sets: dict) -> str | None:
    """Seed-mean Kendall tau with its 95% hierarchical bootstrap interval, per setting
    and baseline, sets A and B side by side."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    names = []
    for s in sets.values():
        if s:
            names += [n for n in s["rows"] if n not in names]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.8))
    for j, (label, s) in enumerate(sets.items()):
        if not s:
            continue
        xs, ys, lo, hi = [], [], [], []
        for i, n in enumerate(names):
            r = s["rows"].get(n)
            if r is None or math.isnan(r["tau_mean"]):
                continue
            ci = r.get("tau_ci") or (math.nan, math.nan)
            xs.append(i + (j - 0.5) * 0.3)
            ys.append(r["tau_mean"])
            lo.append(r["tau_mean"] - ci[0] if not math.isnan(ci[0]) else 0)
            hi.append(ci[1] - r["tau_mean"] if not math.isnan(ci[1]) else 0)
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=f"set {label}")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(range(len(names)), [n.replace(" (no supernet)", "") for n in names], rotation=20)
    ax.set(ylabel="Kendall tau vs stand-alone (95% CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _pct(v, digits: int = 1) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def pilot_markdown(pilot: dict) -> list[str]:
    """The pilot's table: per epochs, seed noise against the spread of the truth."""
    lines = ["Pilot (`--pilot`): the noise architectures of set A, two seeds each, per number of "
             "stand-alone epochs: seed noise against the spread of the truth (std over the "
             "architectures of their seed-mean test top-1), the tau a second stand-alone seed would "
             "reach at the study's K, and the time per model. Seed noise is the arch x seed "
             "interaction: a seed's shift common to every architecture does not reorder them (the "
             "pooled within-architecture std and the mean shift are shown too).", "",
             "| epochs | archs | test top-1 range (%) | seed noise (points) | pooled std | seed 1 - seed 0 | "
             "spread (points) | noise / spread | tau ceiling | s per model |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in pilot["rows"]:
        lines.append(f"| {r['epochs']:g} | {r['archs']} | {_pct(r['min'])}-{_pct(r['max'])} | "
                     f"{_pct(r['sigma'], 2)} | {_pct(r.get('pooled_sigma'), 2)} | {_pct(r.get('seed_shift'), 2)} | "
                     f"{_pct(r['spread'], 2)} | {r['ratio']:.2f} | "
                     f"{r['ceiling']:.2f} | {r['seconds']:.0f} |")
    lines += ["", pilot["verdict"], ""]
    return lines


def headline_markdown(result: dict, reference: str = "bsnas") -> list[str]:
    """The one table that answers the study's question, per setting: seed-mean tau on A
    and B with intervals, `reference` minus that setting's tau (paired interval),
    top-5 overlap and regret on A, and the searched model's from-scratch test top-1."""
    sets = {k: v for k, v in result["sets"].items() if v}
    if "A" not in sets:
        return []
    diff = {}
    for label, s in sets.items():
        for d in s["diffs"]:
            # every ordered pair appears once: orient it as reference minus the other
            if reference in (d["a"], d["b"]):
                other, sign = (d["b"], 1) if d["a"] == reference else (d["a"], -1)
                lo, hi = d["ci"]
                diff[(label, other)] = (sign * d["diff"], (lo, hi) if sign == 1 else (-hi, -lo))
    searched = result.get("search") or {}
    search = searched.get("settings", {})
    found_diff = {d["b"][0]: d for d in searched.get("diffs", [])
                  if d["a"] == (reference, "evolution") and d["b"][1] == "evolution"}
    labels = list(sets)
    head = ("| setting | " + " | ".join(f"tau {x} [95%]" for x in labels) + " | "
            + " | ".join(f"{reference} minus it, {x}" for x in labels)
            + f" | top-5 overlap A | regret A (points) | searched model, test top-1 (%) | {reference} minus it, "
            "searched (points) |")
    lines = [head, "|---|" + "---|" * (2 * len(labels)) + "---:|---:|---|---|"]
    for name, r in sets["A"]["rows"].items():
        if name == "params (no supernet)":
            continue
        key = "MACs" if name == "MACs (no supernet)" else name
        taus = [_fmt_ci(sets[x]["rows"][name]["tau_mean"], sets[x]["rows"][name].get("tau_ci"))
                if name in sets[x]["rows"] else "" for x in labels]
        diffs = [_fmt_ci(*diff[(x, key)]) if (x, key) in diff else "" for x in labels]
        e = search.get(name, {}).get("evolution")
        found = f"{_pct(e['mean'], 2)} +- {_pct(e['std'], 2)} (n={e['n']})" if e and e["n"] else ""
        fd = found_diff.get(name)
        fd = _fmt_points(fd) if fd else ""
        lines.append(f"| {name} | " + " | ".join(taus) + " | " + " | ".join(diffs)
                     + f" | {r['top5_overlap']:.2f} | {100 * r['regret']:.2f} | {found} | {fd} |")
    return lines + [""]


def markdown(label: str, meta: dict, result: dict, settings: dict) -> str:
    """The results block of one run (label: quick | default | fashion | a custom one)."""
    lines = [f"### {label} run", "",
             f"{meta['when']}; data `{meta['dataset']}`, space `{meta['space']}`; set A: "
             f"{meta['archs_a']} architectures of the full space, set B: {meta['archs_b']} of the "
             f"bsnas (seed 0) final enabled space; stand-alone recipe {meta['recipe']}; supernets "
             f"{meta['supernet_epochs']} epochs ({meta['supernet_steps']} steps) from `{meta['config']}` "
             f"scaled ({meta['schedule']}), {meta['supernet_seeds']} seeds per setting; proxy on "
             f"{meta['proxy_images']} held-out images; {meta['n_boot']} bootstrap resamples. Machine: "
             f"{meta['machine']}. Wall {meta['wall_min']:.1f} min, CPU {meta['cpu_min']:.1f} min "
             f"(this invocation; cached results are reused).", ""]
    headline = headline_markdown(result)
    if headline:
        power = ", ".join(f"set {x} {s['power']:.2f}" for x, s in result["sets"].items()
                          if s and not math.isnan(s["power"]))
        lines += ["Headline (details below)" + (f"; power, the smallest difference in tau the study resolves: "
                                                f"{power}" if power else "") + ".", ""]
        lines += headline
    if result.get("pilot"):
        lines += pilot_markdown(result["pilot"])
    n_truth = result["noise"].get("truth_seeds", 1)
    truth_of = "seed 0" if n_truth == 1 else f"mean of {n_truth} seeds"
    lines += ["Proxy = supernet held-out top-1 after BN recalibration; truth = stand-alone test top-1 "
              f"({truth_of}). Settings: mean over supernet seeds; tau interval: hierarchical bootstrap "
              "95% (architectures, then seeds within the setting); baselines: bootstrap over the "
              "architectures. `tau in MACs bins`: tau within 3 equal-count MACs bins (what the proxy "
              "knows beyond MACs). `top-5`: overlap of the proxy's and the truth's top 5. `regret`: "
              "test top-1 points lost by taking the proxy's first pick. `tau with MACs`: the proxy "
              "against MACs (what it ranks by); `tau between seeds`: two supernet seeds' proxies "
              "against each other (how repeatable it is; the truth's MACs tau is in the MACs row).", ""]
    for label_set, s in result["sets"].items():
        if not s:
            lines += [f"Set {label_set}: not measured yet.", ""]
            continue
        lines += [f"**Set {label_set}** ({len(s['keys'])} architectures, test top-1 "
                  f"{_pct(min(s['truth']))}-{_pct(max(s['truth']))} %, spread {_pct(s['spread'], 2)} points):", "",
                  "| proxy | seeds | Kendall tau [95%] | Spearman rho | tau in MACs bins | top-5 overlap | "
                  "regret (points) | best rank | outside enabled space | tau with MACs | tau between seeds |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for name, r in s["rows"].items():
            desc = name if r["baseline"] else f"{name}: {settings.get(name, ('',))[0]}"
            outside = "" if r["baseline"] else ", ".join(f"{o}/{len(s['keys'])}" for o in r["outside_enabled"])
            size = "" if r["baseline"] else f"{r['macs_tau']:.2f}"
            agree = "" if r["baseline"] else _fmt_ci(r["seed_tau"], None)
            lines.append(f"| {desc} | {r['seeds']} | {_fmt_ci(r['tau_mean'], r.get('tau_ci'))} | "
                         f"{r['rho_mean']:.2f} | {r['binned_tau']:.2f} | {r['top5_overlap']:.2f} | "
                         f"{100 * r['regret']:.2f} | {r['best_rank']:.1f} | {outside} | {size} | {agree} |")
        lines.append("")
    pairs = {}
    for label_set, s in result["sets"].items():
        for d in (s or {}).get("diffs", []):
            pairs.setdefault((d["a"], d["b"]), {})[label_set] = d
    if pairs:
        labels = list(result["sets"])
        lines += ["Paired differences in seed-mean tau (first minus second; paired hierarchical bootstrap "
                  "95%: architectures resampled jointly for both, supernet seeds within each):", "",
                  "| pair | " + " | ".join(f"set {x}" for x in labels) + " |",
                  "|---|" + "---|" * len(labels)]
        for (a, b), per in pairs.items():
            cells = [_fmt_ci(per[x]["diff"], per[x]["ci"]) if x in per else "" for x in labels]
            lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
        power = ", ".join(f"set {x}: {s['power']:.2f}" for x, s in result["sets"].items()
                          if s and not math.isnan(s["power"]))
        lines += ["", f"Power: the median half-width of the paired intervals between settings ({power or 'n/a'}) "
                  "is the smallest difference in tau this study resolves.", ""]
    n = result["noise"]
    if n["rows"]:
        lines += ["Seed noise of the truth (stand-alone test top-1, %, over seeds):", "",
                  "| arch | MACs | per seed | mean | std |", "|---|---|---|---|---|"]
        for r in n["rows"]:
            lines.append(f"| `{r['arch']}` | {r['macs'] / 1e6:.2f}M | "
                         f"{', '.join(_pct(v) for v in r['val_top1'])} | {_pct(r['mean'])} | {_pct(r['std'], 2)} |")
        spread = result["sets"].get("A", {}) or {}
        lines += ["", f"Seed noise (arch x seed interaction) {_pct(n['seed_sigma'], 2)} points (pooled "
                  f"within-architecture std {_pct(n.get('pooled_sigma'), 2)}) against a spread of "
                  f"{_pct(spread.get('spread', math.nan), 2)} points on set A; a proxy as good as another "
                  + ("stand-alone seed" if n_truth == 1 else f"mean of {n_truth} stand-alone seeds")
                  + f" would reach tau of about {n['ceiling']:.2f}. Less the noise, the architectures' "
                  f"test top-1 spreads by about {_pct(n.get('true_spread', math.nan), 2)} points.", ""]
    sr = result.get("search")
    if sr and sr["settings"]:
        lines += [f"Search at equal cost (MACs cap {sr['cap'] / 1e6:.3g}M): each supernet's evolutionary "
                  "search and a random search with the same number of proxy evaluations over the same "
                  "enabled space; each winner trained from scratch (ground-truth recipe); test top-1 "
                  "mean +- std over supernet seeds x retraining seeds (n).", "",
                  "| setting | evolution: test top-1 | n | winners (MACs, proxy) | random search: test top-1 "
                  "| n | evaluations |", "|---|---:|---:|---|---:|---:|---:|"]
        for name, row in sr["settings"].items():
            e, r = row["evolution"], row["random"]
            wins = "; ".join(f"`{w['str']}` ({w['macs'] / 1e6:.2f}M, {_pct(w['proxy_top1'])})" for w in e["winners"])
            evals = ", ".join(str(w["evaluations"]) for w in e["winners"])
            lines.append(f"| {name} | {_pct(e['mean'], 2)} +- {_pct(e['std'], 2)} | {e['n']} | {wins} | "
                         f"{_pct(r['mean'], 2)} +- {_pct(r['std'], 2)} | {r['n']} | {evals} |")
        ra = sr.get("random_a")
        if sr.get("diffs"):
            said = [f"{d['a'][0]} {d['a'][1]} minus {d['b'][0]} {d['b'][1]} "
                    f"{_fmt_points(d)}" for d in sr["diffs"]]
            lines += ["", "Differences in the searched models' test top-1 (points; bootstrap 95%: winners of "
                      "supernet seeds drawn with replacement, then their retraining seeds): " + "; ".join(said) + "."]
        if ra:
            lines += ["", f"Random architectures under the cap (set A, {ra['n']} of them): best test top-1 "
                      f"{_pct(ra['best'], 2)} % (`{ra['best_arch']}`, {ra['best_macs'] / 1e6:.2f}M MACs), "
                      f"mean {_pct(ra['mean'], 2)} %."]
        lines.append("")
    plots = {k: v for k, v in (meta.get("plots") or {}).items() if v}
    if plots:
        lines += ["Plots: " + ", ".join(f"[{k}]({os.path.basename(v)})" for k, v in plots.items())
                  + " (proxy against truth per setting, seed 0; tau with its interval per setting).", ""]
    c = result.get("compute")
    if c:
        lines += ["Compute (seconds of wall time per process, summed over the cached runs):", "",
                  "| part | models | seconds |", "|---|---:|---:|"]
        for part, v in c.items():
            lines.append(f"| {part} | {v['n']} | {v['seconds']:.0f} |")
        lines.append("")
    for name, diags in result.get("shrinking", {}).items():
        for d in diags:
            if not d["paths"]:  # the random control measures no path
                lines.append(f"- `{name}` epoch {d['epoch']}: {d['dropped']} dropped at random")
                continue
            lines.append(f"- `{name}` epoch {d['epoch']}: {d['paths']} paths, held-out top-1 "
                         f"{_pct(d['path_top1_mean'])} +- {_pct(d['path_top1_std'])} %; median "
                         f"{d['median_count']:.0f} paths per candidate; {d['dropped']} dropped, "
                         f"{d['dropped_within_noise']} of them within 2 standard errors of their layer's best")
    lines.append("")
    return "\n".join(lines)


def update_results(path: str, label: str, text: str) -> None:
    """Put `text` into the section of `path` between this label's markers (replacing an
    earlier block of the same label), creating the file or the section when absent."""
    begin, end = f"<!-- ranking:{label}:begin -->", f"<!-- ranking:{label}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = open(path).read() if os.path.exists(path) else "# bsnas benchmark results\n"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    elif SECTION in old:
        start = old.index(SECTION)
        nxt = old.find("\n## ", start + len(SECTION))
        cut = len(old) if nxt < 0 else nxt + 1
        new = old[:cut].rstrip() + "\n\n" + block + "\n" + ("\n" + old[cut:] if nxt >= 0 else "")
    else:
        new = old.rstrip() + f"\n\n{SECTION}\n\n{block}\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- driver


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=list(CONFIGS), default="digits",
                   help="digits (configs/quickstart.yaml) or fashion_mnist (configs/fashion.yaml)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few archs, short training, "
                   "a tiny search (fashion_mnist: 2,000 training images)")
    p.add_argument("--pilot", action="store_true", help="only the pilot: seed noise against spread "
                   "per number of stand-alone epochs (--pilot-epochs), and the time per model")
    p.add_argument("--pilot-epochs", help="comma-separated stand-alone epochs the pilot tries "
                   "(default: --standalone-epochs and twice that)")
    p.add_argument("--no-train", action="store_true", help="train nothing: render the caches")
    p.add_argument("--archs", type=int, help="K of set A, from the full space (default 24; quick 4)")
    p.add_argument("--archs-b", type=int, help="K of set B, from bsnas seed 0's enabled space "
                   "(default = --archs; quick 3; 0 = no set B)")
    p.add_argument("--standalone-epochs", type=float, help="fractional allowed (default 8 on digits, "
                   "1 on fashion_mnist; quick 1)")
    p.add_argument("--standalone-lr", type=float, default=0.8, help="per 256 images (default 0.8)")
    p.add_argument("--supernet-epochs", type=int, help="default 24 on digits, the config's on "
                   "fashion_mnist; quick 2")
    p.add_argument("--supernet-seeds", type=int, help="supernets per setting (default 2)")
    p.add_argument("--noise-archs", type=int, help="archs of A trained with several seeds (default 4; quick 2)")
    p.add_argument("--seeds", type=int, help="seeds of those (default 2)")
    p.add_argument("--truth-seeds", type=int, default=1,
                   help="stand-alone seeds averaged into the truth of every architecture of A and B "
                        "(default 1); with 2 or more every architecture of A is a noise architecture")
    p.add_argument("--retrain-seeds", type=int, help="seeds of each searched winner (default 2; quick 1)")
    p.add_argument("--proxy-images", type=int, default=0, help="held-out images a proxy is measured on "
                   "(default 0 = the whole held-out split)")
    p.add_argument("--max-macs", type=float, help="MACs cap of the searches (default: median MACs of set A)")
    p.add_argument("--search-population", type=int, help="default: the config's search.population; quick 4")
    p.add_argument("--search-generations", type=int, help="default: the config's search.generations; quick 2")
    p.add_argument("--no-search", action="store_true", help="skip the searches at equal cost")
    p.add_argument("--settings", default=DEFAULT_SETTINGS,
                   help=f"comma-separated, of {list(SETTINGS)} (default {DEFAULT_SETTINGS})")
    p.add_argument("--setting", action="append", default=[], metavar="NAME:key=v,key=v",
                   help="an extra setting: the base config plus these overrides")
    p.add_argument("--config", help="base config (default by --dataset)")
    p.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="override of the base config (all settings and stand-alone runs)")
    p.add_argument("--small-space", action="store_true", help="the study's space is SMALL_SPACE "
                   "(fashion-small, written to <out>/fashion-small.yaml) instead of the config's")
    p.add_argument("--seed", type=int, default=0, help="architecture selection seed")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=1, help="models trained at a time (processes)")
    p.add_argument("--out", help="output folder (default benchmarks/out/ranking[-fashion][-quick])")
    p.add_argument("--label", help="label of the results block (default quick, default or fashion)")
    p.add_argument("--results", default=RESULTS_MD, help="markdown file to update ('' = none)")
    p.add_argument("--verbose", action="store_true", help="log the trainer's and shrinker's lines")
    args = p.parse_args(argv)
    q, fashion = args.quick, args.dataset == "fashion_mnist"
    for name, default, quick in (("archs", 24, 4), ("standalone_epochs", 1.0 if fashion else 8.0, 1.0),
                                 ("supernet_epochs", None if fashion else 24, 2), ("supernet_seeds", 2, 2),
                                 ("noise_archs", 4, 2), ("seeds", 2, 2), ("retrain_seeds", 2, 1),
                                 ("search_population", None, 4), ("search_generations", None, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else default)
    if args.archs_b is None:
        args.archs_b = 3 if q else args.archs
    if min(args.archs, args.supernet_seeds, args.seeds, args.retrain_seeds, args.truth_seeds) < 1 \
            or args.archs_b < 0:
        p.error("--archs, --supernet-seeds, --seeds, --retrain-seeds and --truth-seeds must be >= 1, "
                "--archs-b >= 0")
    # every seed of the truth also measures the seed noise
    args.seeds = max(args.seeds, args.truth_seeds)
    if not args.standalone_epochs > 0:
        p.error("--standalone-epochs must be > 0")
    args.pilot_epochs = ([float(x) for x in args.pilot_epochs.split(",") if x.strip()] if args.pilot_epochs
                         else [args.standalone_epochs, 2 * args.standalone_epochs])
    if q and fashion:
        # a smoke run: a few thousand images (the user's --set still wins)
        args.set = ["data.train_limit=2500", "data.holdout=500", "data.calib_images=256"] + list(args.set)
    args.config = args.config or CONFIGS[args.dataset]
    if not os.path.isfile(args.config):
        p.error(f"base config {args.config} does not exist")
    stem = "ranking" + ("-fashion" if fashion else "") + ("-quick" if q else "")
    args.label = args.label or ("quick" if q else "fashion" if fashion else "default")
    args.out = args.out or os.path.join(ROOT, "benchmarks", "out", stem)
    return args


def _settings(args) -> dict[str, tuple[str, list[str]]]:
    out = {}
    for name in filter(None, (s.strip() for s in args.settings.split(","))):
        if name not in SETTINGS:
            raise SystemExit(f"unknown setting {name!r}; known: {list(SETTINGS)} (or use --setting)")
        if name in DERIVED and not random_shrink_available():
            print(f"setting {name!r} skipped: this bsnas has no shrink.mode=random", flush=True)
            continue
        out[name] = SETTINGS[name]
    for text in args.setting:
        name, _, rest = text.partition(":")
        if not name or not rest:
            raise SystemExit(f"--setting {text!r}: expected NAME:key=value[,key=value...]")
        overrides = [o.strip() for o in rest.split(",") if o.strip()]
        out[name.strip()] = (" ".join(overrides), overrides)
    return out


def _load(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _machine() -> str:
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs, load average {load[0]:.0f}/{load[1]:.0f}/{load[2]:.0f} "
            f"(1/5/15 min) at the end, torch {torch.__version__}, 1 thread per process")


class Study:
    """The study's state: configs, architecture sets, caches and the jobs still to do."""

    def __init__(self, args):
        self.args = args
        extra = []
        if args.small_space:
            path = os.path.join(args.out, "fashion-small.yaml")
            with open(path, "w") as f:
                f.write(SMALL_SPACE)
            extra = [f"space={path}"]
        self.base = base_config(args.supernet_epochs or load_config(args.config).train.epochs,
                                extra + list(args.set), args.config)
        self.space = load_space(self.base.space)
        self.settings = _settings(args)
        self.archs_a = select_archs(self.space, args.archs, args.seed)
        n_noise = len(self.archs_a) if args.truth_seeds > 1 else min(args.noise_archs, len(self.archs_a))
        self.noise = noise_indices(len(self.archs_a), n_noise)
        self.cap = args.max_macs or float(np.median([cost.flops(self.space, a) for a in self.archs_a]))
        # one MACs cap for the searches and for cost-aware shrinking
        self.base = load_config(None, [f"search.max_macs={self.cap}"], extra=self.base.to_dict())
        b = self.base.search
        pop = args.search_population or b.population
        self.search_spec = None if args.no_search else {
            "max_macs": self.cap, "population": pop,
            "generations": args.search_generations or b.generations,
            "top_k": b.top_k if pop == b.population else max(1, pop // 5),
            "mutants": b.mutants if pop == b.population else pop // 2,
            "crossovers": b.crossovers if pop == b.population else pop // 2,
            "mutation_prob": b.mutation_prob}
        self.sa_cfg = self.base.to_dict()
        # only what changes a stand-alone model keys its cache (not e.g. data.calib_batches)
        self.sa_data = {k: v for k, v in self.sa_cfg["data"].items()
                        if k not in ("calib_batches", "calib_images", "eval_batch_size", "workers", "verify",
                                     "cache_dir")}
        self.sa_path = os.path.join(args.out, "standalone.json")
        self.px_path = os.path.join(args.out, "proxy.json")
        self.sa_cache = _load(self.sa_path).get("runs", {})
        self.px_cache = _load(self.px_path).get("settings", {})
        self.archs_path = os.path.join(args.out, "archs.json")
        self._b: list[Arch] | None = None
        self._b_source = None
        stored = _load(self.archs_path)
        if stored.get("B") and stored.get("B_source") and len(stored["B"]) == args.archs_b:
            self._b = [Arch.from_dict(d["arch"]) for d in stored["B"]]
            self._b_source = stored["B_source"]

    # ------------------------------------------------------------------ keys
    def recipe(self, epochs: float | None = None) -> dict:
        e = self.args.standalone_epochs if epochs is None else epochs
        b = self.base
        return {"epochs": int(e) if float(e).is_integer() else e, "lr": self.args.standalone_lr,
                "optimizer": "sgd-nesterov", "schedule": b.train.schedule,
                "label_smoothing": b.train.label_smoothing, "weight_decay": b.train.weight_decay,
                "batch_size": b.data.batch_size}

    def sa_key(self, arch_dict: dict, seed: int, epochs: float | None = None) -> str:
        """Cache key of one stand-alone run: recipe, data, space, architecture and seed."""
        return digest({"recipe": self.recipe(epochs), "data": self.sa_data, "seed": seed,
                       "space": self.space.to_dict(), "arch": arch_dict})

    def supernet(self, name: str, s: int):
        """(cache key, config) of setting `name`, supernet seed `s`; None while a
        setting it derives from has not run."""
        overrides = list(self.settings[name][1]) + [f"seed={self.base.seed + s}"]
        if name in DERIVED:
            src = self.supernet(DERIVED[name], s)
            if src is None or src[0] not in self.px_cache:
                return None
            log_path = os.path.join(self.args.out, "supernets", src[0], "shrink_log.json")
            drops = drops_per_decision(_load(log_path))
            overrides += ["shrink.mode=random", f"shrink.random_drops={json.dumps(drops)}"]
        cfg = setting_config(self.base, overrides)
        d = cfg.to_dict()
        ckey = f"{name}-s{s}-{digest(result_keys(d))}"
        if ckey not in self.px_cache and not os.path.isdir(os.path.join(self.args.out, "supernets", ckey)):
            # caches of the first key scheme: a digest of the whole config
            for keep in (True, False):
                old = f"{name}-s{s}-{digest({k: v for k, v in {**d, 'keep_freed_memory': keep}.items() if k != 'out_dir'})}"
                if old in self.px_cache or os.path.isdir(os.path.join(self.args.out, "supernets", old)):
                    ckey = old
                    break
        cfg = load_config(None, [f"out_dir={os.path.join(self.args.out, 'supernets', ckey)}"], extra=cfg.to_dict())
        return ckey, cfg

    def set_b(self) -> list[Arch] | None:
        """Set B (from bsnas seed 0's final enabled space), once that supernet exists."""
        if self.args.archs_b == 0 or "bsnas" not in self.settings:
            return None
        src = self.supernet("bsnas", 0)
        if self._b is not None and self._b_source == src[0]:
            return self._b
        entry = self.px_cache.get(src[0])
        if not entry:
            return None
        enabled = EnabledSpace(self.space)
        enabled.load_state_dict(entry["enabled"])
        self._b = select_archs(self.space, self.args.archs_b, self.args.seed, enabled=enabled, tag="ranking-B")
        self._b_source = src[0]
        self.save_archs()
        return self._b

    def save_archs(self) -> None:
        row = lambda a: {"key": digest(a.to_dict()), "arch": a.to_dict(), "str": str(a),  # noqa: E731
                         "macs": cost.flops(self.space, a), "params": cost.params(self.space, a)}
        save_json_atomic({"space": self.space.name, "seed": self.args.seed, "cap": self.cap,
                          "A": [row(a) for a in self.archs_a], "noise": self.noise,
                          "B": [row(a) for a in self._b or []], "B_source": self._b_source}, self.archs_path)

    # ------------------------------------------------------------------ jobs
    def _sa_job(self, jobs: dict, arch: Arch, seed: int, prio: tuple, what: str, epochs: float | None = None):
        d = arch.to_dict()
        key = self.sa_key(d, seed, epochs)
        if key in self.sa_cache or key in jobs:
            return
        jobs[key] = {"kind": "standalone", "key": key, "prio": prio, "fn": train_standalone,
                     "args": (self.sa_cfg, self.recipe(epochs), d, seed),
                     "desc": f"{what} seed {seed} {arch} ({cost.flops(self.space, arch) / 1e6:.2f}M MACs)"}

    def pending(self) -> list[dict]:
        """The jobs whose inputs exist, in the order they should run."""
        jobs: dict = {}
        a = self.args
        for i, arch in enumerate(self.archs_a):
            self._sa_job(jobs, arch, 0, (0, i), f"A{i}")
        for s in range(1, a.seeds):
            for i in self.noise:
                # a second seed first; further seeds of the truth after everything else
                self._sa_job(jobs, self.archs_a[i], s, (0, 100 + i) if s == 1 else (3, s, i), f"A{i} (noise)")
        b = self.set_b()
        known = self.archs_a + (b or [])
        known_d = [x.to_dict() for x in known]
        for s in range(a.supernet_seeds):
            for j, name in enumerate(self.settings):
                sn = self.supernet(name, s)
                if sn is None:
                    continue
                ckey, cfg = sn
                entry = self.px_cache.get(ckey, {})
                done = list(entry.get("proxies", {}))
                missing = [d for d in known_d if digest(d) not in done]
                need_search = self.search_spec is not None and \
                    (entry.get("search") or {}).get("key") != digest(self.search_spec)
                if not entry or missing or need_search:
                    jobs[ckey] = {"kind": "supernet", "key": (name, s, ckey), "prio": (1, s, name in DERIVED, j),
                                  "fn": train_supernet,
                                  "args": (cfg.to_dict(), known_d, done, a.proxy_images,
                                           self.search_spec if need_search else None),
                                  "desc": f"supernet {name} seed {s}"}
        for i, arch in enumerate(b or []):
            self._sa_job(jobs, arch, 0, (1, 0, 2, i), f"B{i}")
            for s in range(1, a.truth_seeds):
                self._sa_job(jobs, arch, s, (1, 1, 3, s, i) if s == 1 else (3, s, 100 + i), f"B{i}")
        for s in range(a.supernet_seeds):
            for name in self.settings:
                sn = self.supernet(name, s)
                found = (self.px_cache.get(sn[0], {}).get("search") or {}) if sn else {}
                for kind in ("evolution", "random"):
                    if kind in found:
                        for r in range(a.retrain_seeds):
                            # two seeds first; further retraining seeds after the truth's
                            self._sa_job(jobs, Arch.from_dict(found[kind]["arch"]), r,
                                         (2, s, kind) if r < 2 else (4, r, s, kind), f"{name} s{s} {kind} winner")
        return sorted(jobs.values(), key=lambda j: j["prio"])

    def record(self, job: dict, result: dict, say) -> None:
        if job["kind"] == "standalone":
            self.sa_cache[job["key"]] = result
            save_json_atomic({"format": "bsnas-ranking-standalone/2", "runs": self.sa_cache}, self.sa_path)
            say(f"[stand-alone] {job['desc']}: test top-1 {result['val_top1']:.4f}, "
                f"{result['seconds']:.0f} s ({result['cpu_seconds']:.0f} s CPU)")
            return
        name, s, ckey = job["key"]
        old = self.px_cache.get(ckey, {})
        result["proxies"] = {**old.get("proxies", {}), **result["proxies"]}
        result["overrides"] = self.settings[name][1]
        if result.get("search") is None:
            result["search"] = old.get("search")
        if old and "train_seconds" in old and result.get("resumed_at_epoch") == self.base.train.epochs:
            # only re-evaluated: keep the training time of the run that trained it
            for k in ("train_seconds", "train_cpu_seconds"):
                result[k] = old[k]
            result["resumed_at_epoch"] = old.get("resumed_at_epoch", 0)
            result["proxy_seconds"] = old.get("proxy_seconds", 0) + result["proxy_seconds"]
        self.px_cache[ckey] = result
        save_json_atomic({"format": "bsnas-ranking-proxy/2", "settings": self.px_cache}, self.px_path)
        found = result.get("search") or {}
        extra = (f"; search: evolution {found['evolution']['proxy_top1']:.4f} after "
                 f"{found['evolution']['evaluations']} evaluations, random {found['random']['proxy_top1']:.4f}"
                 if "evolution" in found else f"; search: {found['error']}" if "error" in found else "")
        say(f"[supernet] {job['desc']}: {result['steps']} steps in {result['train_seconds']:.0f} s, "
            f"{len(result['proxies'])} proxies; enabled space {result['enabled_size']:.3g} of "
            f"{result['space_size']:.3g}{extra}")

    def run(self, jobs_at_once: int, say, only=None) -> dict:
        """Run pending jobs (those `only` accepts) until none is left; returns counts.
        With several at once a finished job's slot is refilled at once, so a long
        supernet does not hold the other slots idle."""
        counts = {"standalone": 0, "supernet": 0}

        def ready(running: dict) -> list[dict]:
            busy = {str(j["key"]) for j in running.values()}
            return [j for j in self.pending() if (only is None or only(j)) and str(j["key"]) not in busy]

        if jobs_at_once <= 1:
            while todo := ready({}):
                job = todo[0]
                self.record(job, job["fn"](*job["args"]), say)
                counts[job["kind"]] += 1
            return counts
        import multiprocessing
        running: dict = {}
        with ProcessPoolExecutor(jobs_at_once, mp_context=multiprocessing.get_context("spawn")) as pool:
            while True:
                for job in ready(running)[:jobs_at_once - len(running)]:
                    running[pool.submit(job["fn"], *job["args"])] = job
                if not running:
                    return counts
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    job = running.pop(f)
                    self.record(job, f.result(), say)
                    counts[job["kind"]] += 1

    # ------------------------------------------------------------------ pilot
    def pilot(self, say) -> dict:
        """Train the noise architectures of A with two seeds at each of the pilot
        epochs; seed noise, spread, tau ceiling (for K = --archs) and time per model."""
        a = self.args
        archs = [self.archs_a[i] for i in self.noise]
        todo = {}
        for e in a.pilot_epochs:
            for s in range(2):
                for i, arch in zip(self.noise, archs):
                    self._sa_job(todo, arch, s, (e, s, i), f"pilot {e:g} epochs A{i}", e)
        for job in sorted(todo.values(), key=lambda j: j["prio"]):
            self.record(job, job["fn"](*job["args"]), say)
        rows = []
        for e in a.pilot_epochs:
            runs = [[self.sa_cache[self.sa_key(x.to_dict(), s, e)] for s in range(2)] for x in archs]
            acc = np.array([[r["val_top1"] for r in pair] for pair in runs])
            pooled, sigma = seed_noise(acc)
            spread = float(np.std(acc.mean(axis=1), ddof=1))
            # a truth spread evenly with the measured std, at the study's K
            syn = np.linspace(0, spread * math.sqrt(12), a.archs)
            rows.append({"epochs": e, "archs": len(archs), "min": float(acc.min()), "max": float(acc.max()),
                         "sigma": sigma, "pooled_sigma": pooled, "seed_shift": float(np.mean(acc[:, 1] - acc[:, 0])), "spread": spread, "ratio": sigma / spread if spread else math.inf,
                         "ceiling": noise_ceiling(syn, sigma, 300),
                         "seconds": float(np.mean([r["seconds"] for pair in runs for r in pair]))})
        good = [r for r in rows if r["ceiling"] >= 0.75]
        pick = good[0] if good else rows[-1]
        verdict = (f"Verdict: {pick['epochs']:g} stand-alone epochs put the seed noise at "
                   f"{pick['ratio']:.2f} of the spread (tau ceiling {pick['ceiling']:.2f} at K = {a.archs}); "
                   + ("well below the spread: the study uses it." if good else
                      "not well below the spread: buy more epochs before more architectures."))
        out = {"rows": rows, "verdict": verdict, "chosen_epochs": pick["epochs"],
               "seconds": float(sum(r["seconds"] for pair in
                                    [[self.sa_cache[self.sa_key(x.to_dict(), s, e)] for s in range(2)]
                                     for e in a.pilot_epochs for x in archs] for r in pair)),
               "when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}
        save_json_atomic(out, os.path.join(a.out, "pilot.json"))
        return out

    # ------------------------------------------------------------------ analysis
    def truth(self) -> dict:
        """Stand-alone test top-1 per architecture of A and B: the mean over seeds
        0..--truth-seeds - 1; an architecture lacking one of them has no truth yet."""
        out = {}
        for x in self.archs_a + (self._b or []):
            keys = [self.sa_key(x.to_dict(), s) for s in range(self.args.truth_seeds)]
            if all(k in self.sa_cache for k in keys):
                out[digest(x.to_dict())] = float(np.mean([self.sa_cache[k]["val_top1"] for k in keys]))
        return out

    def analyse(self) -> dict:
        a = self.args
        truth = self.truth()
        proxies, searches, entries = {}, {}, {}
        for name in self.settings:
            proxies[name], searches[name] = [], []
            for s in range(a.supernet_seeds):
                sn = self.supernet(name, s)
                e = self.px_cache.get(sn[0]) if sn else None
                proxies[name].append(e["proxies"] if e else None)
                searches[name].append((e or {}).get("search"))
                if e:
                    entries[(name, s)] = (sn[0], e)
        sets = {"A": analyse_set(self.archs_a, self.space, truth, proxies, a.bootstrap)}
        if a.archs_b:
            sets["B"] = analyse_set(self._b, self.space, truth, proxies, a.bootstrap) if self._b else None
        standalone = {}
        for s in range(a.seeds):
            for x in self.archs_a:
                k = self.sa_key(x.to_dict(), s)
                if k in self.sa_cache:
                    standalone[(digest(x.to_dict()), s)] = self.sa_cache[k]
        noise = noise_stats(self.archs_a, self.space, standalone, self.noise, a.seeds,
                            np.array(sets["A"]["truth"]) if sets["A"] else None, a.truth_seeds)

        def by_arch(d: dict) -> list[float]:
            return [self.sa_cache[k]["val_top1"] for k in (self.sa_key(d, r) for r in range(a.retrain_seeds))
                    if k in self.sa_cache]

        search = search_stats({n: v for n, v in searches.items() if any(v)}, by_arch, self.cap, sets["A"],
                              n_boot=a.bootstrap) \
            if self.search_spec else None
        # compute, from the caches
        compute: dict = {}

        def add(part, secs):
            c = compute.setdefault(part, {"n": 0, "seconds": 0.0})
            c["n"] += 1
            c["seconds"] += secs

        pilot = _load(os.path.join(a.out, "pilot.json")) or None
        if pilot:
            compute["pilot (stand-alone)"] = {"n": sum(2 * r["archs"] for r in pilot["rows"]),
                                              "seconds": pilot["seconds"]}
        counted = set()
        t_seeds = range(a.truth_seeds)
        for label, archs, seeds in (("truth A", self.archs_a, t_seeds), ("truth B", self._b or [], t_seeds),
                                    ("truth noise seeds", [self.archs_a[i] for i in self.noise],
                                     range(1, a.seeds))):
            for x in archs:
                for s in seeds:
                    k = self.sa_key(x.to_dict(), s)
                    if k in self.sa_cache and k not in counted:
                        counted.add(k)
                        add(label, self.sa_cache[k]["seconds"])
        for name, per in searches.items():
            for found in per:
                for kind in ("evolution", "random"):
                    if found and kind in found:
                        for r in range(a.retrain_seeds):
                            k = self.sa_key(found[kind]["arch"], r)
                            if k in self.sa_cache and k not in counted:
                                counted.add(k)
                                add("searched winners, from scratch", self.sa_cache[k]["seconds"])
        resumed = sum(bool(e.get("resumed_at_epoch")) for e in (v[1] for v in entries.values()))
        # a resumed supernet's time counts from its resume only (what its process measured)
        train_part = "supernet training" + (f" ({resumed} resumed: counted from the resume)" if resumed else "")
        for (name, s), (ckey, e) in entries.items():
            add(train_part, e.get("train_seconds", 0))
            add("proxy evaluation", e.get("proxy_seconds", 0))
            for kind in ("evolution", "random"):
                if (e.get("search") or {}).get(kind):
                    add(f"search ({kind})", e["search"][kind]["seconds"])
        shrinking = {}
        for (name, s), (ckey, e) in entries.items():
            lp = os.path.join(a.out, "supernets", ckey, "shrink_log.json")
            if os.path.exists(lp):
                shrinking[f"{name} s{s}"] = shrink_diagnostics(_load(lp))
        return {"sets": sets, "noise": noise, "search": search, "compute": compute, "pilot": pilot,
                "shrinking": shrinking, "cap": self.cap,
                "rows": sets["A"]["rows"] if sets["A"] else {}}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {(" - ".join(k) if isinstance(k, tuple) else k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    tic = time.perf_counter()
    say = lambda s: print(s, flush=True)  # noqa: E731
    os.makedirs(args.out, exist_ok=True)
    study = Study(args)
    study.save_archs()
    if os.path.abspath(args.config) != os.path.abspath(os.path.join(args.out, "base_config.yaml")):
        with open(args.config) as src, open(os.path.join(args.out, "base_config.yaml"), "w") as dst:
            dst.write(src.read())
    if args.pilot:
        say(f"ranking pilot ({args.label}): {len(study.noise)} archs x 2 seeds x epochs "
            f"{', '.join(f'{e:g}' for e in args.pilot_epochs)} -> {args.out}")
        pilot = study.pilot(say)
        say("\n".join(pilot_markdown(pilot)))
    elif not args.no_train:
        ready = study.pending()
        n_sa = sum(j["kind"] == "standalone" for j in ready)
        say(f"ranking ({args.label}): {len(study.archs_a)} + {args.archs_b} archs, {len(study.settings)} settings x "
            f"{args.supernet_seeds} seeds; ready now: {n_sa} stand-alone models and {len(ready) - n_sa} "
            f"supernets ({args.jobs} at a time) -> {args.out}")
        counts = study.run(args.jobs, say)
        say(f"trained {counts['standalone']} stand-alone models and {counts['supernet']} supernets")
    result = study.analyse()
    sets = result["sets"]
    paths = {"scatter": scatter(os.path.join(args.out, "scatter.png"), sets, study.settings),
             "tau": tau_plot(os.path.join(args.out, "tau.png"), sets)}
    ru_self, ru_kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    steps = next((e["steps"] for e in study.px_cache.values()), 0)
    macs = [cost.flops(study.space, a) for a in study.archs_a]
    base = study.base
    shrink_rule = (f"evidence z > {base.shrink.threshold:g}" if "threshold" in base.shrink
                   else f"drop {base.shrink.drop_fraction:g}")
    meta = {"when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "dataset": args.dataset,
            "archs_a": len(study.archs_a), "archs_b": len(study._b or []), "space": study.space.name,
            "macs_range": f"{min(macs) / 1e6:.2f}M to {max(macs) / 1e6:.2f}M",
            "recipe": (lambda r: f"{r['epochs']:g} epochs, SGD Nesterov, lr {r['lr']:g} per 256 (batch "
                       f"{r['batch_size']}), {r['schedule']}, label smoothing {r['label_smoothing']:g}")(study.recipe()),
            "supernet_epochs": base.train.epochs, "supernet_steps": steps, "supernet_seeds": args.supernet_seeds,
            "proxy_images": args.proxy_images or "all",
            "config": os.path.relpath(args.config, ROOT),
            "schedule": f"lr {base.train.lr:g} per 256, broadening warm-up {base.broaden.warmup_epochs:g} + "
                        f"{base.broaden.broaden_epochs:g} epochs, shrinking from epoch {base.shrink.start} every "
                        f"{base.shrink.interval}, {base.shrink.samples} paths per decision, {shrink_rule}",
            "n_boot": args.bootstrap, "search": study.search_spec,
            "machine": _machine(), "wall_min": (time.perf_counter() - tic) / 60, "plots": paths,
            "cpu_min": (ru_self.ru_utime + ru_self.ru_stime + ru_kids.ru_utime + ru_kids.ru_stime) / 60}
    if args.results:
        # the plots go next to the results file, linked from its block
        import shutil
        for name, path in paths.items():
            if path:
                dst = os.path.join(os.path.dirname(os.path.abspath(args.results)), f"ranking-{args.label}-{name}.png")
                shutil.copyfile(path, dst)
                paths[name] = os.path.basename(dst)
    text = markdown(args.label, meta, result, study.settings)
    with open(os.path.join(args.out, "ranking.md"), "w") as f:
        f.write(text)
    save_json_atomic(_jsonable({"meta": meta, "settings": {n: {"description": study.settings[n][0],
                                                              "overrides": study.settings[n][1]}
                                                          for n in study.settings},
                                "archs_a": [str(a) for a in study.archs_a],
                                "archs_b": [str(a) for a in study._b or []], "stats": result}),
                     os.path.join(args.out, "ranking.json"))
    if args.results:
        update_results(args.results, args.label, text)
    say(text)
    return result


if __name__ == "__main__":
    main()
