"""benchmarks/ranking.py (issue 7): the ranking statistics against scipy and hand-computed
cases, the bootstrap interval, the top-k hit rate, the architecture selection, the
RESULTS.md update, and a smoke run of the whole pipeline on a micro space that checks
its output files and that a second run reuses every cached result."""
import importlib.util
import json
import math
import os
import random

import numpy as np
import pytest

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


def test_pipeline_smoke(tmp_path, capsys):
    space = tmp_path / "micro.yaml"
    space.write_text(MICRO)
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    argv = ["--archs", "3", "--standalone-epochs", "1", "--supernet-epochs", "1", "--noise-archs", "1",
            "--seeds", "2", "--settings", "spos,bsnas", "--bootstrap", "50", "--label", "smoke",
            "--set", f"space={space}", "--set", "data.holdout=100", "--set", "data.calib_batches=1",
            "--set", "shrink.samples=3", "--set", "data.verify=false",
            "--out", str(out), "--results", str(results)]
    stats = ranking.main(argv)
    first = capsys.readouterr().out
    assert "4 stand-alone models and 2 supernets to train" in first
    assert first.count("[stand-alone ") == 4 and first.count("[supernet ") == 2
    for name in ("archs.json", "standalone.json", "proxy.json", "ranking.json", "ranking.md",
                 "scatter_spos.png", "scatter_bsnas.png"):
        assert (out / name).stat().st_size > 0, name
    assert set(stats["rows"]) == {"MACs (no supernet)", "params (no supernet)", "spos", "bsnas"}
    for row in stats["rows"].values():
        assert -1 <= row["vs_val"]["kendall_tau"] <= 1 or math.isnan(row["vs_val"]["kendall_tau"])
    proxy = json.loads((out / "proxy.json").read_text())["settings"]
    assert len(proxy) == 2 and all(len(p["proxies"]) == 3 for p in proxy.values())
    bsnas = next(p for k, p in proxy.items() if k.startswith("bsnas-"))
    assert bsnas["decisions"] and bsnas["enabled_size"] < bsnas["space_size"]
    assert len(json.loads((out / "standalone.json").read_text())["runs"]) == 4
    md = results.read_text()
    assert "<!-- ranking:smoke:begin -->" in md and "| spos: (a) SPOS" in md

    # a second run trains nothing and reports the same statistics
    again = ranking.main(argv)
    second = capsys.readouterr().out
    assert "0 stand-alone models and 0 supernets to train" in second
    assert again["rows"]["bsnas"]["vs_val"]["kendall_tau"] == stats["rows"]["bsnas"]["vs_val"]["kendall_tau"]
