"""Latency: the per-choice table on CPU with the tiny space, its sum, the prediction
report, the correlation statistics and the command lines."""
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bsnas import cost, load_space
from bsnas.cli import main as cli_main
from bsnas.profiler.latency import evaluate_table, kendall_tau, measure_table, pearson, time_module

REPO = Path(__file__).resolve().parent.parent
FAST = {"warmup": 1, "repeats": 2, "rounds": 1}


@pytest.fixture(scope="module")
def table():
    return measure_table("tiny", "cpu", **FAST)


def test_table_covers_every_choice(table):
    space = load_space("tiny")
    assert table["format"] == "bsnas-latency-table/1"
    assert (table["space"], table["device"], table["resolution"], table["batch_size"]) == ("tiny", "cpu", 32, 1)
    assert table["unit"] == "ms" and set(table["fixed_ms"]) == {"stem", "head"}
    assert len(table["layers"]) == space.num_layers
    for entry, spec in zip(table["layers"], space.layers):
        assert set(entry) == set(spec.ops)
        for op in spec.kernel_ops:
            assert list(entry[op]) == [str(w) for w in spec.widths]
            assert all(isinstance(t, float) and 0 < t < 1e3 for t in entry[op].values())
        if spec.allows_skip:
            assert entry["skip"] == 0.0
    assert json.loads(json.dumps(table)) == table


def test_latency_is_table_sum(table):
    space = load_space("tiny")
    for seed in range(5):
        arch = space.sample(seed)
        expected = sum(table["fixed_ms"].values()) + sum(
            0.0 if c.op == "skip" else table["layers"][i][c.op][str(c.width)] for i, c in enumerate(arch))
        assert cost.latency(table, arch) == pytest.approx(expected)


def test_measure_table_options():
    t = measure_table("tiny", "cpu", batch_size=2, resolution=16, warmup=0, repeats=1, rounds=2)
    assert (t["batch_size"], t["resolution"], t["repeats"], t["rounds"]) == (2, 16, 1, 2)
    with pytest.raises(ValueError, match="need warmup >= 0 and repeats >= 1"):
        measure_table("tiny", "cpu", repeats=0)
    with pytest.raises(ValueError, match="rounds >= 1"):
        measure_table("tiny", "cpu", rounds=0)
    with pytest.raises(ValueError, match="device must be cpu or cuda|invalid device"):
        measure_table("tiny", "meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        measure_table("tiny", "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_table_on_cuda():
    t = measure_table("tiny", "cuda", **FAST)
    assert t["device"] == "cuda" and all(v > 0 for v in t["fixed_ms"].values())


def test_time_module_median():
    calls = []
    module = torch.nn.Identity()
    module.register_forward_hook(lambda *a: calls.append(1))
    assert time_module(module, torch.zeros(1), warmup=2, repeats=5) >= 0
    assert len(calls) == 7


def test_evaluate_table(table):
    report = evaluate_table("tiny", table, archs=4, seed=1, **FAST)
    assert report["archs"] == 4 and len(report["rows"]) == 4
    for key in ("pearson", "kendall_tau", "kendall_tau_macs"):
        assert -1.0 <= report[key] <= 1.0 or math.isnan(report[key])
    for row in report["rows"]:
        assert row["measured_ms"] > 0 and row["predicted_ms"] > 0
    json.dumps(report)
    with pytest.raises(ValueError, match="latency table is for space 'tiny', not 'mobilenetv2'"):
        evaluate_table("mobilenetv2", table, archs=2)


def test_correlations():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3])) and math.isnan(pearson([1, 1], [1, 2]))
    with pytest.raises(ValueError, match="same length"):
        kendall_tau([1, 2], [1])


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    x = [rng.randint(0, 9) for _ in range(60)]  # with ties
    y = [v + rng.gauss(0, 3) for v in x]
    y[:5] = [1.0] * 5
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y)[0], abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)


def test_cli_latency_table(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert cli_main(["latency-table", "--space", "tiny", "--device", "cpu", "--warmup", "0", "--repeats", "1",
                     "--rounds", "1", "--resolution", "16", "--threads", "1", "--quiet", "--out", str(out)]) == 0
    t = json.loads(out.read_text())
    assert t["space"] == "tiny" and t["resolution"] == 16 and t["threads"] == 1
    assert "108 choices of space 'tiny'" in capsys.readouterr().out
    assert cli_main(["latency-table", "--space", "nope", "--quiet", "--out", str(out)]) == 2
    assert "unknown space 'nope'" in capsys.readouterr().err


def test_module_entry_point_report(tmp_path, table):
    """`python -m bsnas latency-report` with an existing table: the report the lead runs."""
    (tmp_path / "table.json").write_text(json.dumps(table))
    out = tmp_path / "report.json"
    res = subprocess.run([sys.executable, "-m", "bsnas", "latency-report", "--space", "tiny", "--archs", "3",
                          "--warmup", "0", "--repeats", "1", "--rounds", "1", "--threads", "1",
                          "--table", str(tmp_path / "table.json"),
                          "--out", str(out), "--quiet"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["archs"] == 3 and report["table"] == table
    assert "Kendall tau" in res.stdout
