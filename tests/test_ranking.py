"""benchmarks/ranking.py: the ranking statistics against scipy and hand-computed cases,
the bootstrap intervals (plain and paired hierarchical) on synthetic data with known
answers, top-k overlap, regret, tau within MACs bins, the architecture selection, the
random-shrink drop counts, the RESULTS.md update, and a smoke run of the whole pipeline
(pilot, supernets, both architecture sets, searches, retraining) on a micro space that
checks its output files, that a second run reuses every cached result, and that a
truth of two seeds trains only the missing seeds, two at a time."""
import importlib.util
import json
import math
import os
import random

import numpy as np
import pytest
from idx_files import write_idx as write_idx_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("ranking", os.path.join(ROOT, "benchmarks", "ranking.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ranking = _load()


# --------------------------------------------------------------------------- statistics


def test_kendall_spearman_hand_computed():
    assert ranking.kendall_tau([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert ranking.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # one swapped pair out of 6: (5 - 1) / 6
    assert ranking.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # ranks 1,3,2,4: d^2 = 0,1,1,0 -> rho = 1 - 6*2 / (4*15) = 0.8
    assert ranking.spearman_rho([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    # tau-b with a tie in x: P=5, Q=0, tied-in-x pairs 1 -> 5 / sqrt(5 * 6)
    assert ranking.kendall_tau([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    assert math.isnan(ranking.kendall_tau([1, 1, 1], [1, 2, 3]))
    assert math.isnan(ranking.spearman_rho([1, 2, 3], [5, 5, 5]))
    assert list(ranking.rankdata([10, 20, 20, 5])) == [2, 3.5, 3.5, 1]
    with pytest.raises(ValueError):
        ranking.kendall_tau([1, 2], [1, 2, 3])


def test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (5, 12, 24):
        for _ in range(20):
            # rounded values: many ties, as accuracies on a few hundred images have
            x = rng.normal(size=n).round(1)
            y = (x + rng.normal(size=n)).round(1)
            assert ranking.kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
            assert ranking.spearman_rho(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
            assert np.allclose(ranking.rankdata(x), stats.rankdata(x))


def test_bootstrap_interval():
    rng = np.random.default_rng(1)
    x = rng.normal(size=24)
    y = x + rng.normal(scale=0.7, size=24)
    for stat in (ranking.kendall_tau, ranking.spearman_rho):
        lo, hi = ranking.bootstrap_ci(x, y, stat, n_boot=500, seed=3)
        assert -1 <= lo < stat(x, y) < hi <= 1
        assert ranking.bootstrap_ci(x, y, stat, n_boot=500, seed=3) == (lo, hi)  # seeded
    # a perfect ranking stays perfect in every resample that is defined
    assert ranking.bootstrap_ci([1, 2, 3, 4, 5], [2, 4, 6, 8, 10], ranking.kendall_tau, 200) == (1.0, 1.0)
    # nothing defined: every resample constant
    lo, hi = ranking.bootstrap_ci([1, 1, 1], [1, 2, 3], ranking.kendall_tau, 50)
    assert math.isnan(lo) and math.isnan(hi)


def test_topk_hit_rank_and_gap():
    truth = [0.90, 0.95, 0.80, 0.97, 0.85]   # best: item 3
    assert ranking.best_rank([5, 4, 3, 2, 1], truth) == 4
    assert not ranking.topk_hit([5, 4, 3, 2, 1], truth, 3)
    assert ranking.topk_hit([5, 4, 3, 2, 1], truth, 4)
    assert ranking.topk_hit([1, 2, 3, 9, 4], truth, 1)
    # ties count against: item 3 tied with three others for first -> rank 4
    assert ranking.best_rank([9, 9, 9, 9, 1], truth) == 4
    assert ranking.pick_gap([1, 2, 3, 9, 4], truth) == 0.0
    assert ranking.pick_gap([9, 2, 3, 1, 4], truth) == pytest.approx(0.07)
    assert ranking.pick_gap([9, 2, 9, 1, 4], truth) == pytest.approx(0.17)  # worst of the tied picks
    # several best items: the best-ranked of them counts
    assert ranking.best_rank([1, 5, 2, 3], [0.9, 0.9, 0.8, 0.7]) == 1


def test_noise_ceiling():
    truth = np.linspace(0.9, 0.98, 24)
    assert ranking.noise_ceiling(truth, 0.0) == 1.0
    small, large = ranking.noise_ceiling(truth, 0.002, 200), ranking.noise_ceiling(truth, 0.05, 200)
    assert 1 > small > large > -0.5


def test_noise_stats_truth_seeds_and_true_spread():
    space = ranking.load_space("tiny")
    rng = random.Random(0)
    archs = [space.sample(rng) for _ in range(4)]
    assert len({str(a) for a in archs}) == 4
    # seed noise only in the arch x seed interaction (a checkerboard of +-0.01)
    acc = np.array([[0.80, 0.82], [0.84, 0.82], [0.80, 0.82], [0.84, 0.82]])
    standalone = {(ranking.digest(a.to_dict()), s): {"val_top1": acc[i, s]} for i, a in enumerate(archs)
                  for s in range(2)}
    truth = acc.mean(axis=1) + np.array([0.0, 0.03, 0.06, 0.09])
    one = ranking.noise_stats(archs, space, standalone, [0, 1, 2, 3], 2, truth, 1)
    two = ranking.noise_stats(archs, space, standalone, [0, 1, 2, 3], 2, truth, 2)
    sigma = one["seed_sigma"]
    assert sigma == pytest.approx(ranking.seed_noise(acc)[1]) and sigma > 0
    # a mean of two seeds is less noisy: a higher ceiling, and less noise taken off the spread
    assert two["ceiling"] >= one["ceiling"] and two["truth_seeds"] == 2
    var = np.var(truth, ddof=1)
    assert one["true_spread"] == pytest.approx(math.sqrt(max(var - sigma ** 2, 0)))
    assert two["true_spread"] == pytest.approx(math.sqrt(var - sigma ** 2 / 2))


# --------------------------------------------------------------------------- set-up


def test_select_archs_spread_and_deterministic():
    from bsnas import cost
    from bsnas.space import load_space
    space = load_space("tiny")
    a = ranking.select_archs(space, 8, seed=0, pool=500)
    assert a == ranking.select_archs(space, 8, seed=0, pool=500)
    assert len(set(a)) == 8
    macs = [cost.flops(space, x) for x in a]
    assert macs == sorted(macs)
    pool = sorted(cost.flops(space, space.sample(random.Random(i))) for i in range(500))
    assert macs[0] <= pool[len(pool) // 4] and macs[-1] >= pool[3 * len(pool) // 4]
    assert ranking.noise_indices(24, 3) == [0, 12, 23]
    assert ranking.noise_indices(6, 1) == [3]


def test_settings_differ_only_by_their_overrides(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text("train: {epochs: 8, warmup_epochs: 0.5}\nbroaden: {warmup_epochs: 1, broaden_epochs: 3}\n"
                    "shrink: {start: 5, interval: 2}\n")
    base = ranking.base_config(24, ["shrink.samples=7"], str(path))
    assert base.train.epochs == 24 and base.shrink.start == 15 and base.shrink.interval == 6
    assert base.broaden.warmup_epochs == 3 and base.broaden.broaden_epochs == 9
    assert base.train.warmup_epochs == 1.5 and base.shrink.samples == 7
    flat = {}
    for name, (_, overrides) in ranking.SETTINGS.items():
        cfg = ranking.setting_config(base, overrides).to_dict()
        flat[name] = {f"{s}.{k}": v for s, sub in cfg.items() if isinstance(sub, dict) for k, v in sub.items()}
    diff = lambda a, b: {k for k in flat[a] if flat[a][k] != flat[b][k]}  # noqa: E731
    assert diff("broaden", "bsnas") == {"shrink.enabled"}
    assert diff("spos", "broaden") == {"broaden.warmup_epochs", "broaden.broaden_epochs"}
    assert diff("spos", "fair") == {"train.sampling"}


def test_update_results(tmp_path):
    path = str(tmp_path / "RESULTS.md")
    ranking.update_results(path, "quick", "### quick run\n\nA\n")
    text = open(path).read()
    assert text.startswith("# bsnas benchmark results") and ranking.SECTION in text
    with open(path, "a") as f:
        f.write("\n## Another section\n\nkeep me\n")
    ranking.update_results(path, "default", "### default run\n\nB\n")
    ranking.update_results(path, "quick", "### quick run\n\nC\n")
    text = open(path).read()
    assert "\nA\n" not in text and "\nB\n" in text and "\nC\n" in text and "keep me" in text
    assert text.index("B") < text.index("## Another section")
    assert text.count(ranking.SECTION) == 1


def test_topk_overlap_and_regret():
    truth = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    assert ranking.topk_overlap(truth, truth, 5) == 1.0
    # proxy reverses the order: top 5 of 7 by each share 3 items (indices 2, 3, 4)
    assert ranking.topk_overlap(truth[::-1], truth, 5) == pytest.approx(3 / 5)
    assert ranking.topk_overlap([1, 2, 3], [3, 2, 1], 5) == 1.0  # k capped at n
    assert ranking.regret([0, 0, 0, 0, 0, 0, 9], truth) == 0.0
    assert ranking.regret([9, 0, 0, 0, 0, 0, 0], truth) == pytest.approx(0.6)


def test_mac_bins_and_binned_tau():
    macs = [5, 1, 4, 2, 6, 3]
    assert list(ranking.mac_bins(macs, 3)) == [2, 0, 1, 0, 2, 1]
    # truth falls with MACs across bins but the proxy orders every bin perfectly:
    # overall tau is negative, tau within bins is 1
    macs = np.arange(9.0)
    truth = np.array([7, 8, 9, 4, 5, 6, 1, 2, 3], dtype=float)
    proxy = macs.copy()
    assert ranking.kendall_tau(proxy, truth) < 0
    assert ranking.binned_tau(proxy, truth, macs, 3) == pytest.approx(1.0)
    assert ranking.binned_tau(-proxy, truth, macs, 3) == pytest.approx(-1.0)
    # weights are the pairs per bin: 7 items in 2 bins of 4 and 3 (6 and 3 pairs),
    # perfect in the first, reversed in the second
    assert ranking.binned_tau([1, 2, 3, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6, 7], range(7), 2) \
        == pytest.approx((6 * 1 + 3 * -1) / 9)


def test_hierarchical_bootstrap_known_answers():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=30)
    noisy = truth[None, :] + rng.normal(scale=0.8, size=(2, 30))
    # identical settings whose seeds agree: the paired difference is exactly 0 in every
    # resample (architectures are drawn jointly for both)
    same = np.tile(noisy[0], (2, 1))
    hb = ranking.hierarchical_bootstrap(truth, {"a": same, "b": same.copy()}, 200, seed=1)
    d = hb["diff"][("a", "b")]
    assert d["diff"] == 0 and d["ci"] == (0.0, 0.0) and d["half_width"] == 0
    # with two different seeds each, the seeds are resampled within each setting: the
    # difference varies around 0
    lo, hi = ranking.hierarchical_bootstrap(truth, {"a": noisy, "b": noisy.copy()}, 200, seed=1)["diff"][("a", "b")]["ci"]
    assert lo < 0 < hi
    # a perfect and a reversed proxy: tau 1 and -1 in every resample, difference 2
    hb = ranking.hierarchical_bootstrap(truth, {"up": np.tile(truth, (2, 1)), "down": np.tile(-truth, (3, 1))}, 200)
    assert hb["tau"] == {"up": 1.0, "down": -1.0}
    assert hb["diff"][("up", "down")]["ci"] == (2.0, 2.0)
    # the point estimate is the mean over seeds of scipy's tau-b
    stats = pytest.importorskip("scipy.stats")
    hb = ranking.hierarchical_bootstrap(truth, {"n": noisy}, 100)
    assert hb["tau"]["n"] == pytest.approx(np.mean([stats.kendalltau(p, truth).statistic for p in noisy]))
    lo, hi = hb["ci"]["n"]
    assert lo < hb["tau"]["n"] < hi
    # a clearly better setting is resolved; two equally noisy ones are not
    good = truth[None, :] + rng.normal(scale=0.2, size=(2, 30))
    bad1 = truth[None, :] + rng.normal(scale=2.0, size=(2, 30))
    bad2 = truth[None, :] + rng.normal(scale=2.0, size=(2, 30))
    hb = ranking.hierarchical_bootstrap(truth, {"good": good, "bad1": bad1, "bad2": bad2}, 400, seed=2)
    assert hb["diff"][("good", "bad1")]["ci"][0] > 0
    lo, hi = hb["diff"][("bad1", "bad2")]["ci"]
    assert lo < 0 < hi
    # seed-to-seed spread widens the per-setting interval (seeds are resampled too)
    flat = np.tile(good[0], (2, 1))
    spread = np.stack([truth + rng.normal(scale=0.1, size=30), truth + rng.normal(scale=3.0, size=30)])
    w_flat = np.subtract(*ranking.hierarchical_bootstrap(truth, {"x": flat}, 400, 3)["ci"]["x"][::-1])
    w_spread = np.subtract(*ranking.hierarchical_bootstrap(truth, {"x": spread}, 400, 3)["ci"]["x"][::-1])
    assert w_spread > w_flat
    with pytest.raises(ValueError):
        ranking.hierarchical_bootstrap(truth, {"x": np.zeros((2, 5))}, 10)


def test_seed_noise_interaction():
    # every architecture shifted alike by seed 1: no interaction, only within-arch spread
    acc = np.array([[0.80, 0.82], [0.85, 0.87], [0.90, 0.92]])
    pooled, inter = ranking.seed_noise(acc)
    assert pooled == pytest.approx(0.02 / math.sqrt(2)) and inter == pytest.approx(0.0, abs=1e-12)
    # simulated: arch effects, a shift of +0.02 for seed 1, independent noise 0.01:
    # the interaction finds the noise, the pooled std adds half the squared shift
    rng = np.random.default_rng(0)
    acc = rng.normal(0.85, 0.02, (400, 1)) + np.array([0.0, 0.02]) + rng.normal(0, 0.01, (400, 2))
    pooled, inter = ranking.seed_noise(acc)
    assert inter == pytest.approx(0.01, rel=0.1)
    assert pooled == pytest.approx(math.sqrt(0.01 ** 2 + 0.02 ** 2 / 2), rel=0.1)
    with pytest.raises(ValueError):
        ranking.seed_noise(np.array([0.8, 0.9]))


def test_supernet_cache_key_ignores_runtime_keys():
    from bsnas.config import load_config
    a = load_config(None).to_dict()
    b = load_config(None, ["keep_freed_memory=false", "train.progress=false", "data.workers=0",
                           "out_dir=elsewhere"]).to_dict()
    c = load_config(None, ["train.lr=0.3"]).to_dict()
    assert ranking.digest(ranking.result_keys(a)) == ranking.digest(ranking.result_keys(b))
    assert ranking.digest(ranking.result_keys(a)) != ranking.digest(ranking.result_keys(c))


def test_drops_per_decision():
    log = {"decisions": [{"n_op_drops": 2, "n_width_drops": 1, "dropped": []},
                         {"dropped": [{"kind": "op"}, {"kind": "width"}, {"kind": "width"}]}]}
    assert ranking.drops_per_decision(log) == [[2, 1], [1, 2]]
    assert ranking.drops_per_decision({}) == []


# --------------------------------------------------------------------------- smoke

MICRO = """\
name: micro
resolution: 16
classes: 10
stem: {channels: 8, kernel: 3, stride: 2}
ops: [k3, k5, skip]
width: {min_ratio: 1.0, max_ratio: 3.0, step: 1.0, round_to: 8}
stages:
  - {channels: 8, layers: 2, stride: 1}
  - {channels: 16, layers: 1, stride: 2}
head: {channels: 32, dropout: 0.0}
"""


MICRO_28 = MICRO.replace("resolution: 16", "resolution: 28\nin_channels: 1")

BASE = """\
space: micro.yaml
seed: 0
data: {dataset: fashion_mnist, root: idx, loader: torch, workers: 0, holdout: 100, batch_size: 32,
       eval_batch_size: 300, calib_batches: 1}
train: {epochs: 2, lr: 2.0, warmup_epochs: 0.25, log_every: 10}
broaden: {warmup_epochs: 0.25, broaden_epochs: 0.5}
shrink: {start: 1, interval: 1, samples: 8, min_ops: 1, min_widths: 2}
"""


def write_idx(folder, n_train: int = 500, n_test: int = 200, seed: int = 0) -> None:
    """Small Fashion-MNIST-format idx files (gzipped): class c is a bright 6x6 square at
    a class-dependent place plus noise, so that models learn and differ."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 90, (n, 28, 28)).astype(np.uint8)
        for j, c in enumerate(labels):
            r, q = divmod(int(c), 5)
            images[j, 4 + 12 * r:10 + 12 * r, 2 + 5 * q:8 + 5 * q] += 120
        for name, arr in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
            write_idx_file(os.path.join(folder, name), arr, gz=True)


def test_pipeline_smoke(tmp_path, capsys, monkeypatch):
    (tmp_path / "micro.yaml").write_text(MICRO_28)
    (tmp_path / "base.yaml").write_text(BASE.replace("root: idx", f"root: {tmp_path / 'idx'}"))
    write_idx(tmp_path / "idx")
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    settings = "spos,bsnas" + (",randshrink" if ranking.random_shrink_available() else "")
    loose = ["--set", "shrink.threshold=0"] if "threshold" in ranking.DEFAULTS["shrink"] else []
    argv = ["--quick", "--archs", "4", "--archs-b", "3", "--standalone-epochs", "0.5", "--supernet-epochs", "2",
            "--noise-archs", "2", "--seeds", "2", "--supernet-seeds", "2", "--retrain-seeds", "2",
            "--settings", settings, "--bootstrap", "50", "--search-population", "4",
            "--search-generations", "2", "--label", "smoke", "--dataset", "fashion_mnist", "--config", str(tmp_path / "base.yaml"),
            "--out", str(out), "--results", str(results), "--set", "data.holdout=100"] + loose

    # the pilot: the noise archs x 2 seeds x 2 epoch counts, then stop
    ranking.main(argv + ["--pilot", "--pilot-epochs", "0.25,0.5"])
    first = capsys.readouterr().out
    assert first.count("[stand-alone] pilot") == 8 and "Verdict:" in first
    pilot = json.loads((out / "pilot.json").read_text())
    assert [r["epochs"] for r in pilot["rows"]] == [0.25, 0.5]
    assert all(r["sigma"] >= 0 and r["seconds"] > 0 for r in pilot["rows"])
    assert not (out / "proxy.json").exists()

    stats = ranking.main(argv)
    first = capsys.readouterr().out
    n_settings = len(settings.split(","))
    # the pilot's 0.5-epoch runs are the study's: A's noise archs are not trained again
    assert first.count("[stand-alone] A") == 4 - 2 and "(noise)" not in first
    assert first.count("[supernet] supernet ") >= 2 * n_settings
    for name in ("archs.json", "standalone.json", "proxy.json", "ranking.json", "ranking.md",
                 "scatter.png", "tau.png", "pilot.json"):
        assert (out / name).stat().st_size > 0, name
    archs = json.loads((out / "archs.json").read_text())
    assert len(archs["A"]) == 4 and len(archs["B"]) == 3 and archs["B_source"].startswith("bsnas-s0-")
    proxy = json.loads((out / "proxy.json").read_text())["settings"]
    assert len(proxy) == 2 * n_settings
    assert all(len(p["proxies"]) == len({a["key"] for a in archs["A"] + archs["B"]}) for p in proxy.values())
    bsnas = {k.split("-")[1]: p for k, p in proxy.items() if k.startswith("bsnas-")}
    assert bsnas["s0"]["decisions"] and bsnas["s0"]["enabled_size"] < bsnas["s0"]["space_size"]
    # set B is drawn from bsnas seed 0's final enabled space
    assert all(bsnas["s0"]["proxies"][a["key"]]["enabled"] for a in archs["B"])
    if "randshrink" in settings:
        for s in ("s0", "s1"):
            src = next(k for k in proxy if k.startswith(f"bsnas-{s}-"))
            ctl = next(k for k in proxy if k.startswith(f"randshrink-{s}-"))
            logs = [json.loads((out / "supernets" / k / "shrink_log.json").read_text()) for k in (src, ctl)]
            assert ranking.drops_per_decision(logs[0]) == ranking.drops_per_decision(logs[1])
    for label in ("A", "B"):
        s = stats["sets"][label]
        assert set(s["rows"]) == {"MACs (no supernet)", "params (no supernet)", *settings.split(",")}
        for name in settings.split(","):
            row = s["rows"][name]
            assert row["seeds"] == 2 and len(row["per_seed"]) == 2
            assert -1 <= row["tau_mean"] <= 1 or math.isnan(row["tau_mean"])
            assert 0 <= row["top5_overlap"] <= 1 and row["regret"] >= 0
            assert -1 <= row["macs_tau"] <= 1 or math.isnan(row["macs_tau"])
            assert -1 <= row["seed_tau"] <= 1 or math.isnan(row["seed_tau"])
        assert len(s["diffs"]) == (n_settings + 1) * n_settings // 2  # MACs and every setting, pairwise
    assert stats["rows"] is stats["sets"]["A"]["rows"]
    search = stats["search"]
    assert set(search["settings"]) == set(settings.split(","))
    for row in search["settings"].values():
        assert row["evolution"]["n"] == 2 * 2 and row["random"]["n"] == 2 * 2  # supernet x retrain seeds
        assert all(w["macs"] <= search["cap"] for w in row["evolution"]["winners"] + row["random"]["winners"])
        assert all(w["evaluations"] > 0 for w in row["evolution"]["winners"])
    pairs = {(d["a"], d["b"]) for d in search["diffs"]}
    assert (("bsnas", "evolution"), ("spos", "evolution")) in pairs
    assert all(((n, "evolution"), (n, "random")) in pairs for n in settings.split(","))
    assert {"truth A", "truth B", "supernet training", "searched winners, from scratch"} <= set(stats["compute"])
    md = results.read_text()
    assert "<!-- ranking:smoke:begin -->" in md and "| spos: (a) SPOS" in md and "Paired differences" in md
    assert "Pilot" in md and "Search at equal cost" in md and "Differences in the searched models' test top-1" in md
    assert "| bsnas minus it, searched (points) |" in md and "| tau with MACs | tau between seeds |" in md
    assert stats["compute"]["pilot (stand-alone)"]["n"] == 8
    # the plots sit next to the results file, linked from its block
    for name in ("scatter", "tau"):
        assert (tmp_path / f"ranking-smoke-{name}.png").stat().st_size > 0 and f"(ranking-smoke-{name}.png)" in md
    saved = json.loads((out / "ranking.json").read_text())
    assert saved["stats"]["compute"] and saved["meta"]["search"]["max_macs"] == search["cap"]

    # a second run trains nothing and reports the same statistics
    again = ranking.main(argv)
    second = capsys.readouterr().out
    assert "trained 0 stand-alone models and 0 supernets" in second
    for label in ("A", "B"):
        for name in settings.split(","):
            assert again["sets"][label]["rows"][name]["tau_mean"] == stats["sets"][label]["rows"][name]["tau_mean"] \
                or math.isnan(stats["sets"][label]["rows"][name]["tau_mean"])

    # the truth as the mean of two seeds, two models trained at a time: only the missing
    # seeds train, every architecture of A becomes a noise architecture
    import sys
    sys.modules["ranking"] = ranking  # the spawned workers unpickle ranking.train_standalone
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    two = ranking.main(argv + ["--truth-seeds", "2", "--jobs", "2"])
    third = capsys.readouterr().out
    assert third.count("[stand-alone] A") == 2 and third.count("[stand-alone] B") == 3
    assert "truth = stand-alone test top-1 (mean of 2 seeds)" in third
    rows = {r["arch"]: r for r in two["noise"]["rows"]}
    assert len(rows) == 4 and all(len(r["val_top1"]) == 2 for r in rows.values())
    for arch, t in zip(two["sets"]["A"]["archs"], two["sets"]["A"]["truth"]):
        assert t == pytest.approx(np.mean(rows[arch]["val_top1"]))


def test_headline_orients_differences_against_bsnas():
    row = lambda tau: {"tau_mean": tau, "tau_ci": (tau - 0.1, tau + 0.1), "top5_overlap": 0.6,  # noqa: E731
                       "regret": 0.004}
    sets = {"A": {"rows": {"MACs (no supernet)": row(0.1), "params (no supernet)": row(0.0),
                           "spos": row(0.2), "bsnas": row(0.5)},
                  "diffs": [{"a": "MACs", "b": "bsnas", "diff": -0.4, "ci": (-0.7, -0.1)},
                            {"a": "bsnas", "b": "spos", "diff": 0.3, "ci": (0.05, 0.6)}]},
            "B": None}
    search = {"settings": {"bsnas": {"evolution": {"mean": 0.861, "std": 0.002, "n": 4}}},
              "diffs": [{"a": ("bsnas", "evolution"), "b": ("spos", "evolution"), "diff": 0.012,
                         "ci": (-0.004, 0.03)}]}
    lines = ranking.headline_markdown({"sets": sets, "search": search})
    table = {ln.split(" | ")[0].lstrip("| "): ln for ln in lines[2:] if ln}
    assert set(table) == {"MACs (no supernet)", "spos", "bsnas"}
    assert "| 0.40 [0.10, 0.70] |" in table["MACs (no supernet)"]
    assert "| 0.30 [0.05, 0.60] |" in table["spos"] and table["spos"].endswith("| 1.20 [-0.40, 3.00] |")
    assert "86.10 +- 0.20 (n=4)" in table["bsnas"] and "0.40" in table["bsnas"]


def test_group_mean_diff():
    d = ranking.group_mean_diff([[0.9, 0.9], [0.9, 0.9]], [[0.8, 0.8]], 200)
    assert d["diff"] == pytest.approx(0.1) and d["ci"] == pytest.approx((0.1, 0.1))
    rng = np.random.default_rng(1)
    a = [list(0.85 + rng.normal(0, 0.01, 4)) for _ in range(3)]
    b = [list(0.84 + rng.normal(0, 0.01, 4)) for _ in range(3)]
    d = ranking.group_mean_diff(a, b, 500)
    # the point is the difference of the means of group means, inside its interval
    assert d["diff"] == pytest.approx(np.mean([np.mean(g) for g in a]) - np.mean([np.mean(g) for g in b]))
    assert d["ci"][0] < d["diff"] < d["ci"][1]
    assert math.isnan(ranking.group_mean_diff([], b)["diff"])
