"""Ranking study: does broadening and shrinking rank architectures better?

Measures the ranking correlation between a supernet's proxy accuracy and stand-alone
training, the way FairNAS measured SPOS (Kendall tau 0.62) against FairNAS (0.95), on
this project's own code, the `tiny` space and the built-in digits data set.

1. Architectures: `--archs` K (default 24) drawn from the space, spread over the MAC
   range: 4,000 uniform samples sorted by MACs, cut into K equal-count bins, one
   architecture drawn at random from each bin (seeded).
2. Stand-alone training: each architecture exported as a plain model
   (`bsnas.nn.static.static_twin`) with fresh weights (`bsnas.pipeline.retrain.reinitialize`),
   trained from scratch with one fixed recipe (SGD with Nesterov momentum, cosine decay
   to 0, label smoothing and weight decay from the base config's `train.*`; learning
   rate `--standalone-lr` per 256 images; `--standalone-epochs` epochs) on the training
   loader of `bsnas.train.runtime.build_data` (the held-out split stays out), then measured on
   the held-out split and the validation set. `--noise-archs` of them (the lowest,
   middle and highest MACs) are trained again with other seeds (model initialisation,
   dropout, batch order and augmentation; the data split never changes) to show the
   noise floor. Rankings use the seed-0 run of every architecture.
3. Supernets, one per setting, all from one base config (configs/quickstart.yaml with
   its epoch-valued keys scaled to `--supernet-epochs`), differing only by the
   overrides below, so they have the same seed, data, optimiser and number of steps:
     spos     (a) SPOS: uniform single-path sampling of ops *and widths* from the first
              step (broaden.warmup_epochs=0, broaden.broaden_epochs=0), no shrinking.
              Widths are sampled rather than fixed at their maximum so that the proxy
              of a narrow architecture is measured on trained weights (SPOS searches
              channel numbers the same way).
     broaden  (b) the spring blocks' broadening schedule (warm-up at the largest
              widths, then the width range grows), no shrinking.
     bsnas    (c) broadening and shrinking (BS-NAS).
     fair     (d, optional) (a) with strict-fairness op sampling (train.sampling=fair):
              same number of optimisation steps, but each step accumulates the
              gradients of m paths (m = ops per layer), so m times the compute.
   `--setting NAME:key=value,key=value` adds a setting (the base plus those
   overrides), e.g. `--setting bsnas-loss:shrink.score=loss`.
4. Proxy: every one of the K architectures evaluated in every trained supernet on the
   held-out split after BN recalibration (`bsnas.evaluator.PathEvaluator`, as shrinking
   and search do), including the architectures that shrinking turned off (the
   supernet still holds their weights; the table counts them).
5. Statistics against stand-alone validation top-1: Kendall tau-b and Spearman rho with
   percentile-bootstrap 95% intervals (resampling the K architectures, numpy only),
   whether the best stand-alone architecture is in the proxy's top 3, its rank by the
   proxy, and how much stand-alone accuracy the proxy's top pick gives up. The same
   statistics for "MACs as the proxy" and "parameters as the proxy" give the trivial
   baseline that a supernet must beat.

Outputs in `--out` (default benchmarks/out/ranking, or .../ranking-quick): base_config.yaml
(a copy of `--config`; pass it back as `--config` to re-render a run after the base file
changed), archs.json,
standalone.json and proxy.json (caches, written atomically: an interrupted run resumes
where it stopped; a changed recipe or setting gets new cache keys), supernets/<setting>-
<hash>/ (trainer output, checkpoints: a supernet resumes mid-training), ranking.json,
ranking.md, scatter_<setting>.png. ranking.md also goes into benchmarks/results/ranking.md
(`--results`) between markers of its label (quick or default), leaving the rest of the
file alone.

Usage: python benchmarks/ranking.py [--quick] [--jobs N] [--settings spos,broaden,bsnas]
Runs torch single-threaded; `--jobs 2` trains two models at a time on an idle 2-core
machine.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import math
import os
import random
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bsnas import cost  # noqa: E402
from bsnas.config import Config, load_config  # noqa: E402
from bsnas.space import Arch, load_space  # noqa: E402
from bsnas.train.checkpoint import save_json_atomic  # noqa: E402

log = logging.getLogger("ranking")

BASE_CONFIG = os.path.join(ROOT, "configs", "quickstart.yaml")
RESULTS_MD = os.path.join(ROOT, "benchmarks", "results", "ranking.md")
SECTION = "## Ranking correlation"

SPOS = ["broaden.warmup_epochs=0", "broaden.broaden_epochs=0", "shrink.enabled=false"]
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "spos": ("(a) SPOS: uniform ops and widths from step 0, no broadening, no shrinking", SPOS),
    "broaden": ("(b) broadening, no shrinking", ["shrink.enabled=false"]),
    "bsnas": ("(c) broadening + shrinking (BS-NAS)", ["shrink.enabled=true"]),
    "fair": ("(d) as (a) with strict-fairness op sampling (FairNAS)", SPOS + ["train.sampling=fair"]),
}
DEFAULT_SETTINGS = "spos,broaden,bsnas"


# --------------------------------------------------------------------------- statistics


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of `x` (ascending), ties given their average rank (scipy's default)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    return ranks


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (scipy.stats.kendalltau's default): (P - Q) / sqrt((P + Q + Tx)
    (P + Q + Ty)) with P/Q the concordant/discordant pairs and Tx/Ty the pairs tied in
    x only / y only. nan when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"need two 1-d sequences of the same length >= 2, got {x.shape} and {y.shape}")
    iu = np.triu_indices(len(x), 1)
    dx = np.sign(x[:, None] - x[None, :])[iu]
    dy = np.sign(y[:, None] - y[None, :])[iu]
    s = float(np.sum(dx * dy))
    n0 = len(dx)
    denom = math.sqrt(float(n0 - np.sum(dx == 0)) * float(n0 - np.sum(dy == 0)))
    return s / denom if denom else math.nan


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks; nan when either side
    is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"need two 1-d sequences of the same length >= 2, got {x.shape} and {y.shape}")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(np.sum(rx * rx) * np.sum(ry * ry)))
    return float(np.sum(rx * ry)) / denom if denom else math.nan


def bootstrap_ci(x: Sequence[float], y: Sequence[float], stat: Callable, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of `stat(x, y)`: resample the n pairs with
    replacement `n_boot` times; resamples where the statistic is undefined (nan, e.g.
    every pair the same) are left out. (nan, nan) when none is defined."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    vals = np.array([stat(x[i], y[i]) for i in idx])
    vals = vals[~np.isnan(vals)]
    if len(vals) == 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


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
    """How much `truth` the proxy's top pick gives up: max(truth) minus the truth of the
    proxy's best item (the worst of them when the proxy ties)."""
    p, t = np.asarray(proxy, dtype=float), np.asarray(truth, dtype=float)
    return float(t.max() - t[p == p.max()].min())


def noise_ceiling(truth: Sequence[float], sigma: float, draws: int = 1000, seed: int = 0) -> float:
    """Approximately the best Kendall tau a proxy could reach against `truth` when
    stand-alone training itself has seed noise `sigma`: the mean tau between `truth` and
    `truth` plus Gaussian noise of standard deviation sigma * sqrt(2) (the difference of
    two independent seeds)."""
    t = np.asarray(truth, dtype=float)
    if not sigma > 0:
        return 1.0
    rng = np.random.default_rng(seed)
    return float(np.nanmean([kendall_tau(t, t + rng.normal(0, sigma * math.sqrt(2), len(t)))
                             for _ in range(draws)]))


def correlation(proxy: Sequence[float], truth: Sequence[float], n_boot: int = 1000, seed: int = 0,
                k: int = 3) -> dict:
    """Every statistic of one proxy against one ground truth."""
    return {"kendall_tau": kendall_tau(proxy, truth),
            "kendall_ci": bootstrap_ci(proxy, truth, kendall_tau, n_boot, seed),
            "spearman_rho": spearman_rho(proxy, truth),
            "spearman_ci": bootstrap_ci(proxy, truth, spearman_rho, n_boot, seed + 1),
            f"top{k}_hit": topk_hit(proxy, truth, k), "best_rank": best_rank(proxy, truth),
            "pick_gap": pick_gap(proxy, truth)}


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


def select_archs(space, k: int, seed: int = 0, pool: int = 4000) -> list[Arch]:
    """`k` distinct architectures spread over the MAC range: `pool` uniform samples
    sorted by MACs, cut into `k` equal-count bins, one drawn at random from each bin.
    Returned in ascending MACs."""
    rng = random.Random(f"ranking:{seed}")
    archs = sorted({space.sample(rng) for _ in range(pool)}, key=lambda a: (cost.flops(space, a), str(a)))
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
    """Train one architecture from scratch with `recipe`; its held-out and validation
    accuracy. Runs in a worker process or in-process."""
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
    steps = recipe["epochs"] * len(data.train)
    opt = torch.optim.SGD(param_groups(model, t.weight_decay),
                          lr=recipe["lr"] * cfg.data.batch_size / 256, momentum=t.momentum,
                          nesterov=t.nesterov and t.momentum > 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(max(1, steps), 0, t.schedule))
    losses = []
    for epoch in range(recipe["epochs"]):
        # other seeds see other batch orders and augmentations over the same split
        data.train.set_epoch(epoch + 1000 * seed)
        losses += train_epoch(model, data.train, opt, sched, t.label_smoothing)
    held, val = evaluate(model, data.holdout), evaluate(model, data.val)
    return {"arch": arch.to_dict(), "seed": seed, "holdout_top1": held["top1"],
            "holdout_loss": held["loss"], "val_top1": val["top1"], "val_loss": val["loss"],
            "final_train_loss": float(np.mean(losses[-len(data.train):])) if losses else math.nan,
            "seconds": round(time.perf_counter() - tic, 2),
            "cpu_seconds": round(time.process_time() - cpu, 2)}


def train_supernet(cfg_dict: dict, arch_dicts: list[dict], done: list[str]) -> dict:
    """Train (or resume) one supernet setting, then measure the architectures whose
    keys are not in `done` on the held-out split after BN recalibration."""
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
    evaluator = PathEvaluator(trainer.supernet, trainer.data.calib, trainer.data.holdout)
    proxies = {}
    for d in arch_dicts:
        key = digest(d)
        if key in done:
            continue
        arch = Arch.from_dict(d)
        with torch.random.fork_rng(devices=[]):
            r = evaluator(arch)
        proxies[key] = {"top1": r["top1"], "loss": r["loss"], "enabled": trainer.enabled.contains(arch)}
    decisions = trainer.extra_state.get("shrink", {}).get("decisions", [])
    last = trainer.history[-1] if trainer.history else {}
    return {"proxies": proxies, "enabled": trainer.enabled.state_dict(),
            "enabled_size": trainer.enabled.size(), "space_size": trainer.space.size(),
            "decisions": [{"epoch": d["epoch"], "dropped": [f"L{s['layer']}:{s['name']}" for s in d["dropped"]],
                           "size_after": d["size_after"]} for d in decisions],
            "largest_holdout_top1": last.get("holdout_top1"), "largest_val_top1": last.get("val_top1"),
            "steps": trainer.step, "resumed_at_epoch": resumed_at,
            "train_seconds": round(train_s, 1), "train_cpu_seconds": round(train_cpu, 1),
            "seconds": round(time.perf_counter() - tic, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1)}


# --------------------------------------------------------------------------- analysis


def shrink_diagnostics(shrink_log: dict) -> list[dict]:
    """How noisy each shrinking decision was (from a `shrink_log.json`): the spread of
    the sampled paths' held-out top-1, how many paths scored a candidate (median), and
    how many dropped candidates were within noise of their layer's best, i.e. whose gap
    was under two standard errors of a difference of two means (path std x sqrt(1/n_a
    + 1/n_b), n the candidates' path counts)."""
    out = []
    for d in shrink_log.get("decisions", []):
        top1 = np.array([p["top1"] for p in d["paths"]])
        sd = float(np.std(top1, ddof=1)) if len(top1) > 1 else math.nan
        scored = [s for s in d["scores"] if s["score"] is not None]
        best = {(s["layer"], s["kind"]): s["count"] for s in scored if s["gap"] == 0}
        within = sum(s["gap"] < 2 * sd * math.sqrt(1 / s["count"] + 1 / best[(s["layer"], s["kind"])])
                     for s in d["dropped"])
        out.append({"epoch": d["epoch"], "paths": len(top1), "path_top1_mean": float(np.mean(top1)),
                    "path_top1_std": sd, "median_count": float(np.median([s["count"] for s in scored])),
                    "dropped": len(d["dropped"]), "dropped_within_noise": int(within),
                    "dropped_counts": [s["count"] for s in d["dropped"]]})
    return out


def _fmt_ci(v: float, ci: tuple[float, float]) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def analyse(archs: list[Arch], space, standalone: dict, proxies: dict, noise: list[int],
            seeds: int, n_boot: int) -> dict:
    """Statistics of every setting (and of the MACs/params baselines) against
    stand-alone validation top-1 (and held-out top-1)."""
    keys = [digest(a.to_dict()) for a in archs]
    truth = np.array([standalone[(k, 0)]["val_top1"] for k in keys])
    truth_held = np.array([standalone[(k, 0)]["holdout_top1"] for k in keys])
    # continuous, so it separates models that tie on top-1 near 100%
    truth_loss = -np.array([standalone[(k, 0)]["val_loss"] for k in keys])
    macs = np.array([cost.flops(space, a) for a in archs], dtype=float)
    prm = np.array([cost.params(space, a) for a in archs], dtype=float)
    rows = {}
    for name, p in (("MACs (no supernet)", macs), ("params (no supernet)", prm)):
        rows[name] = {"baseline": True, "vs_val": correlation(p, truth, n_boot),
                      "vs_holdout": correlation(p, truth_held, n_boot),
                      "vs_val_loss": correlation(p, truth_loss, n_boot)}
    for name, entry in proxies.items():
        top1 = np.array([entry["proxies"][k]["top1"] for k in keys])
        neg_loss = -np.array([entry["proxies"][k]["loss"] for k in keys])
        rows[name] = {"baseline": False, "vs_val": correlation(top1, truth, n_boot),
                      "vs_holdout": correlation(top1, truth_held, n_boot),
                      "vs_val_loss": correlation(top1, truth_loss, n_boot),
                      "loss_vs_val": correlation(neg_loss, truth, n_boot),
                      "outside_enabled": int(sum(not entry["proxies"][k]["enabled"] for k in keys)),
                      "proxy_top1": top1.tolist()}
    noise_rows, variances = [], []
    for i in noise:
        vals = [standalone[(keys[i], s)]["val_top1"] for s in range(seeds) if (keys[i], s) in standalone]
        if len(vals) >= 2:
            variances.append(np.var(vals, ddof=1))
        noise_rows.append({"index": i, "arch": str(archs[i]), "macs": int(macs[i]), "val_top1": vals,
                           "mean": float(np.mean(vals)),
                           "std": float(np.std(vals, ddof=1)) if len(vals) >= 2 else math.nan})
    sigma = float(math.sqrt(np.mean(variances))) if variances else math.nan
    return {"rows": rows, "truth_val_top1": truth.tolist(), "truth_holdout_top1": truth_held.tolist(),
            "macs": macs.tolist(), "params": prm.tolist(), "noise": noise_rows, "seed_sigma": sigma,
            "spread": float(np.std(truth, ddof=1)),
            "ceiling": noise_ceiling(truth, sigma) if not math.isnan(sigma) else math.nan}


def scatter(path: str, name: str, title: str, truth, proxy, macs, stats: dict) -> str | None:
    """Supernet proxy (held-out top-1) against stand-alone validation top-1, coloured by
    MACs."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    fig, ax = plt.subplots(figsize=(5, 4.2))
    sc = ax.scatter(100 * np.asarray(truth), 100 * np.asarray(proxy), c=np.asarray(macs) / 1e6,
                    cmap="viridis", s=28)
    fig.colorbar(sc, ax=ax, label="MACs (M)")
    v = stats["vs_val"]
    ax.set(xlabel="stand-alone validation top-1 (%)", ylabel="supernet proxy, held-out top-1 (%)",
           title=f"{name}: tau {v['kendall_tau']:.2f}, rho {v['spearman_rho']:.2f}")
    ax.text(0.02, 0.98, title, transform=ax.transAxes, va="top", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(label: str, meta: dict, stats: dict, proxies: dict, settings: dict) -> str:
    """The results table of one run (label: quick | default | a custom one)."""
    lines = [f"### {label} run", "",
             f"{meta['when']}; K = {meta['archs']} architectures of `{meta['space']}` "
             f"({meta['macs_range']} MACs), stand-alone recipe {meta['recipe']}; supernets "
             f"{meta['supernet_epochs']} epochs ({meta['supernet_steps']} steps) from "
             f"`{meta['config']}` scaled ({meta['schedule']}); {meta['n_boot']} bootstrap resamples. Machine: "
             f"{meta['machine']}. Wall {meta['wall_min']:.1f} min, CPU {meta['cpu_min']:.1f} min "
             f"(this invocation; cached results are reused).", "",
             "Proxy = supernet held-out top-1 after BN recalibration; truth = stand-alone "
             "validation top-1 (seed 0). Intervals: bootstrap 95% over the K architectures. "
             "`best rank`: the best stand-alone architecture's rank by the proxy (1 = first, "
             "ties count against). `pick gap`: stand-alone top-1 (points) lost by taking "
             "the proxy's first choice.", "",
             "| proxy | Kendall tau | Spearman rho | tau vs held-out truth | tau vs truth = -val loss "
             "| tau, proxy = -loss | best in top 3 | best rank | pick gap | K outside enabled space "
             "| supernet train time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in stats["rows"].items():
        v, h = row["vs_val"], row["vs_holdout"]
        if row["baseline"]:
            desc, loss_tau, outside, secs = name, "", "", ""
        else:
            desc = f"{name}: {settings[name][0]}"
            loss_tau = f"{row['loss_vs_val']['kendall_tau']:.2f}"
            p = proxies[name]
            outside = f"{row['outside_enabled']}/{meta['archs']}" + (
                f" (space {p['space_size']:.2g} -> {p['enabled_size']:.2g})"
                if p["enabled_size"] != p["space_size"] else "")
            secs = f"{p['train_seconds']:.0f} s" + (" (resumed)" if p.get("resumed_at_epoch") else "")
        lines.append(f"| {desc} | {_fmt_ci(v['kendall_tau'], v['kendall_ci'])} | "
                     f"{_fmt_ci(v['spearman_rho'], v['spearman_ci'])} | {h['kendall_tau']:.2f} | "
                     f"{_fmt_ci(row['vs_val_loss']['kendall_tau'], row['vs_val_loss']['kendall_ci'])} | {loss_tau} | "
                     f"{'yes' if v['top3_hit'] else 'no'} | {v['best_rank']} | "
                     f"{100 * v['pick_gap']:.1f} | {outside} | {secs} |")
    lines += ["", "Noise floor (stand-alone validation top-1, %, over seeds):", "",
              "| arch | MACs | per seed | mean | std |", "|---|---|---|---|---|"]
    for r in stats["noise"]:
        lines.append(f"| `{r['arch']}` | {r['macs'] / 1e6:.2f}M | "
                     f"{', '.join(f'{100 * v:.1f}' for v in r['val_top1'])} | {100 * r['mean']:.1f} | "
                     f"{100 * r['std']:.2f} |")
    lines += ["", f"Seed noise (pooled std) {100 * stats['seed_sigma']:.2f} points against a spread "
              f"of {100 * stats['spread']:.2f} points (std of the K stand-alone accuracies); a proxy "
              f"as good as a second stand-alone seed would reach tau of about {stats['ceiling']:.2f}.",
              ""]
    for name, p in proxies.items():
        if p["decisions"]:
            dec = "; ".join(f"after epoch {d['epoch']}: {', '.join(d['dropped']) or 'nothing'}"
                            for d in p["decisions"])
            lines.append(f"Shrinking in `{name}` (L<layer>:<op or width> turned off): {dec}.")
            for d in p.get("diagnostics", []):
                lines.append(f"- epoch {d['epoch']}: {d['paths']} paths, held-out top-1 "
                             f"{100 * d['path_top1_mean']:.1f} +- {100 * d['path_top1_std']:.1f} %; a "
                             f"candidate was scored by a median {d['median_count']:.0f} paths; "
                             f"{d['dropped_within_noise']} of {d['dropped']} dropped within 2 standard "
                             f"errors of their layer's best (path counts of the dropped: "
                             f"{', '.join(map(str, d['dropped_counts']))})")
            lines.append("")
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
    p.add_argument("--quick", action="store_true", help="a few minutes: 6 archs, 1 stand-alone "
                   "epoch, 2 supernet epochs, 2 archs x 2 seeds of noise")
    p.add_argument("--archs", type=int, help="K (default 24; quick 6)")
    p.add_argument("--standalone-epochs", type=int, help="default 8; quick 1")
    p.add_argument("--standalone-lr", type=float, default=0.8, help="per 256 images (default 0.8)")
    p.add_argument("--supernet-epochs", type=int, help="default 24; quick 2")
    p.add_argument("--noise-archs", type=int, help="archs trained with several seeds (default 3; quick 2)")
    p.add_argument("--seeds", type=int, help="seeds of those (default 3; quick 2)")
    p.add_argument("--settings", default=DEFAULT_SETTINGS,
                   help=f"comma-separated, of {list(SETTINGS)} (default {DEFAULT_SETTINGS})")
    p.add_argument("--setting", action="append", default=[], metavar="NAME:key=v,key=v",
                   help="an extra setting: the base config plus these overrides")
    p.add_argument("--config", default=BASE_CONFIG, help="base config (default configs/quickstart.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="override of the base config (all settings)")
    p.add_argument("--seed", type=int, default=0, help="architecture selection seed")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=1, help="models trained at a time (processes)")
    p.add_argument("--out", help="output folder (default benchmarks/out/ranking[-quick])")
    p.add_argument("--label", help="label of the results block (default quick or default)")
    p.add_argument("--results", default=RESULTS_MD, help="markdown file to update ('' = none)")
    p.add_argument("--verbose", action="store_true", help="log the trainer's and shrinker's lines")
    args = p.parse_args(argv)
    q = args.quick
    for name, default, quick in (("archs", 24, 6), ("standalone_epochs", 8, 1), ("supernet_epochs", 24, 2),
                                 ("noise_archs", 3, 2), ("seeds", 3, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else default)
    args.label = args.label or ("quick" if q else "default")
    args.out = args.out or os.path.join(ROOT, "benchmarks", "out", "ranking-quick" if q else "ranking")
    return args


def _settings(args) -> dict[str, tuple[str, list[str]]]:
    out = {}
    for name in filter(None, (s.strip() for s in args.settings.split(","))):
        if name not in SETTINGS:
            raise SystemExit(f"unknown setting {name!r}; known: {list(SETTINGS)} (or use --setting)")
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


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    tic = time.perf_counter()
    say = lambda s: print(s, flush=True)  # noqa: E731
    os.makedirs(args.out, exist_ok=True)

    base = base_config(args.supernet_epochs, args.set, args.config)
    space = load_space(base.space)
    settings = _settings(args)
    archs = select_archs(space, args.archs, args.seed)
    keys = [digest(a.to_dict()) for a in archs]
    noise = noise_indices(len(archs), args.noise_archs)
    save_json_atomic({"space": space.name, "seed": args.seed,
                      "archs": [{"key": k, "arch": a.to_dict(), "str": str(a), "macs": cost.flops(space, a),
                                 "params": cost.params(space, a)} for k, a in zip(keys, archs)],
                      "noise": noise}, os.path.join(args.out, "archs.json"))

    recipe = {"epochs": args.standalone_epochs, "lr": args.standalone_lr, "optimizer": "sgd-nesterov",
              "schedule": base.train.schedule, "label_smoothing": base.train.label_smoothing,
              "weight_decay": base.train.weight_decay, "batch_size": base.data.batch_size}
    sa_cfg = base.to_dict()
    # only what changes a stand-alone model keys its cache (not e.g. data.calib_batches)
    sa_data = {k: v for k, v in sa_cfg["data"].items()
               if k not in ("calib_batches", "eval_batch_size", "workers", "verify", "cache_dir")}
    sa_common = {"recipe": recipe, "data": sa_data, "seed": base.seed, "space": space.to_dict()}
    legacy = {**sa_common, "data": sa_cfg["data"]}  # keys of the first version of this script
    if os.path.abspath(args.config) != os.path.abspath(os.path.join(args.out, "base_config.yaml")):
        with open(args.config) as src, open(os.path.join(args.out, "base_config.yaml"), "w") as dst:
            dst.write(src.read())
    sa_path, px_path = os.path.join(args.out, "standalone.json"), os.path.join(args.out, "proxy.json")
    sa_cache = _load(sa_path).get("runs", {})
    px_cache = _load(px_path).get("settings", {})

    # --- what is left to do
    jobs = []  # (kind, cache key, fn, args, description)
    for name, (_, overrides) in settings.items():
        cfg = setting_config(base, overrides)
        ckey = f"{name}-{digest({k: v for k, v in cfg.to_dict().items() if k != 'out_dir'})}"
        cfg = load_config(None, [f"out_dir={os.path.join(args.out, 'supernets', ckey)}"], extra=cfg.to_dict())
        entry = px_cache.get(ckey, {})
        done = list(entry.get("proxies", {}))
        if not entry or set(keys) - set(done):
            jobs.append(("supernet", (name, ckey), train_supernet, (cfg.to_dict(), [a.to_dict() for a in archs], done),
                         f"supernet {name} ({' '.join(overrides)})"))
    for s in range(args.seeds):
        for i, (k, a) in enumerate(zip(keys, archs)):
            if s > 0 and i not in noise:
                continue
            rkey = digest({**sa_common, "arch": a.to_dict(), "seed": s})
            old = digest({**legacy, "arch": a.to_dict(), "seed": s})
            if rkey not in sa_cache and old in sa_cache:
                sa_cache[rkey] = sa_cache.pop(old)
            if rkey not in sa_cache:
                jobs.append(("standalone", rkey, train_standalone, (sa_cfg, recipe, a.to_dict(), s),
                             f"arch {i:2d} seed {s} {a} ({cost.flops(space, a) / 1e6:.2f}M MACs)"))
    n_sa = sum(j[0] == "standalone" for j in jobs)
    say(f"ranking ({args.label}): {len(archs)} archs, {n_sa} stand-alone models and "
        f"{len(jobs) - n_sa} supernets to train ({args.jobs} at a time) -> {args.out}")

    counter = {"standalone": 0, "supernet": 0}

    def record(job, result):
        kind, key, _, _, desc = job
        counter[kind] += 1
        if kind == "standalone":
            sa_cache[key] = result
            save_json_atomic({"format": "bsnas-ranking-standalone/1", "runs": sa_cache}, sa_path)
            say(f"[stand-alone {counter[kind]}/{n_sa}] {desc}: val top-1 {result['val_top1']:.4f}, "
                f"held-out {result['holdout_top1']:.4f}, {result['seconds']:.0f} s "
                f"({result['cpu_seconds']:.0f} s CPU)")
        else:
            name, ckey = key
            old = px_cache.get(ckey, {})
            result["proxies"] = {**old.get("proxies", {}), **result["proxies"]}
            result["overrides"] = settings[name][1]
            if old and "train_seconds" in old and result.get("resumed_at_epoch") == base.train.epochs:
                # only re-evaluated: keep the training time of the run that trained it
                for k in ("train_seconds", "train_cpu_seconds"):
                    result[k] = old[k]
                result["resumed_at_epoch"] = old.get("resumed_at_epoch", 0)
            px_cache[ckey] = result
            save_json_atomic({"format": "bsnas-ranking-proxy/1", "settings": px_cache}, px_path)
            say(f"[supernet {counter[kind]}/{len(jobs) - n_sa}] {desc}: {result['steps']} steps in "
                f"{result['train_seconds']:.0f} s, {len(archs)} proxies measured; enabled space "
                f"{result['enabled_size']:.3g} of {result['space_size']:.3g}")

    if args.jobs <= 1:
        for job in jobs:
            record(job, job[2](*job[3]))
    else:
        import multiprocessing
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(job[2], *job[3]): job for job in jobs}
            for fut in as_completed(futures):
                record(futures[fut], fut.result())

    # --- statistics over this run's archs and settings
    standalone = {}
    for s in range(args.seeds):
        for k, a in zip(keys, archs):
            rkey = digest({**sa_common, "arch": a.to_dict(), "seed": s})
            if rkey in sa_cache:
                standalone[(k, s)] = sa_cache[rkey]
    proxies = {}
    for name, (_, overrides) in settings.items():
        cfg = setting_config(base, overrides)
        ckey = f"{name}-{digest({k: v for k, v in cfg.to_dict().items() if k != 'out_dir'})}"
        proxies[name] = px_cache[ckey]
        log_path = os.path.join(args.out, "supernets", ckey, "shrink_log.json")
        proxies[name]["diagnostics"] = shrink_diagnostics(_load(log_path)) if os.path.exists(log_path) else []
    stats = analyse(archs, space, standalone, proxies, noise, args.seeds, args.bootstrap)
    for name in proxies:
        scatter(os.path.join(args.out, f"scatter_{name}.png"), name, settings[name][0],
                stats["truth_val_top1"], stats["rows"][name]["proxy_top1"], stats["macs"], stats["rows"][name])
    ru_self, ru_kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    steps = next(iter(proxies.values()))["steps"] if proxies else 0
    macs = stats["macs"]
    meta = {"when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "archs": len(archs),
            "space": space.name, "macs_range": f"{min(macs) / 1e6:.2f}M to {max(macs) / 1e6:.2f}M",
            "recipe": f"{recipe['epochs']} epochs, SGD Nesterov, lr {recipe['lr']:g} per 256 "
                      f"(batch {recipe['batch_size']}), {recipe['schedule']}, label smoothing "
                      f"{recipe['label_smoothing']:g}",
            "supernet_epochs": base.train.epochs, "supernet_steps": steps,
            "config": os.path.relpath(args.config, ROOT),
            "schedule": f"lr {base.train.lr:g} per 256, broadening warm-up {base.broaden.warmup_epochs:g} + "
                        f"{base.broaden.broaden_epochs:g} epochs, shrinking from epoch {base.shrink.start} every "
                        f"{base.shrink.interval}, {base.shrink.samples} paths per decision, drop "
                        f"{base.shrink.drop_fraction:g}, score {base.shrink.score}", "n_boot": args.bootstrap,
            "machine": _machine(), "wall_min": (time.perf_counter() - tic) / 60,
            "cpu_min": (ru_self.ru_utime + ru_self.ru_stime + ru_kids.ru_utime + ru_kids.ru_stime) / 60}
    text = markdown(args.label, meta, stats, proxies, settings)
    with open(os.path.join(args.out, "ranking.md"), "w") as f:
        f.write(text)
    save_json_atomic({"meta": meta, "settings": {n: {"description": settings[n][0], "overrides": settings[n][1]}
                                                 for n in settings},
                      "archs": [str(a) for a in archs], "stats": stats}, os.path.join(args.out, "ranking.json"))
    if args.results:
        update_results(args.results, args.label, text)
    say(text)
    return stats


if __name__ == "__main__":
    main()
