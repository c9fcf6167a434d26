"""The quickstart pipeline end to end (`bsnas run`) on a reduced budget, then the
`search`, `retrain` and `train --resume` commands on its checkpoint."""
import contextlib
import io
import json
import os

import pytest
import torch

from bsnas import cost
from bsnas.cli import main
from bsnas.space import Arch
from bsnas.supernet import Supernet
from bsnas.train.checkpoint import latest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


def _reduced(out, cache):
    return [f"out_dir={out}", f"data.cache_dir={cache}", "data.verify=false", "data.holdout=600",
            "data.batch_size=64", "data.eval_batch_size=600", "data.calib_batches=1",
            "train.epochs=2", "train.progress=false", "broaden.warmup_epochs=0.25",
            "broaden.broaden_epochs=0.5", "shrink.start=1", "shrink.samples=10", "shrink.threshold=0",
            "search.population=3", "search.generations=2", "search.top_k=2", "search.mutants=1",
            "search.crossovers=1", "retrain.epochs=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("quick")
    out, cache = str(base / "run"), str(base / "cache")
    overrides = _reduced(out, cache)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["run", "--config", QUICKSTART, *overrides])
    assert rc == 0
    return {"out": out, "overrides": overrides, "stdout": stdout.getvalue()}


def test_run_writes_the_report_and_a_valid_best_arch(run):
    out = run["out"]
    report = os.path.join(out, "report", "report.md")
    assert f"report: {report}" in run["stdout"]
    for name in ("report.md", "training_curves.png", "shrink_heatmap.png", "pareto.png"):
        assert os.path.getsize(os.path.join(out, "report", name)) > 0, name
    text = open(report).read()
    for heading in ("## Chosen architecture", "## Supernet training", "## Shrinking",
                    "## Evolutionary search", "| after epoch |", "validation top-1 / top-5"):
        assert heading in text, heading

    net, enabled = Supernet.from_checkpoint(latest_checkpoint(out))
    best = Arch.load(os.path.join(out, "search", "best_arch.json"))
    assert enabled.contains(best)  # drawn from the shrunk space
    log = json.load(open(os.path.join(out, "shrink_log.json")))
    assert [d["epoch"] for d in log["decisions"]] == [1] and log["decisions"][0]["dropped"]
    assert enabled.state_dict() == log["decisions"][-1]["enabled"]
    assert enabled.size() < net.space.size()

    retrained = json.load(open(os.path.join(out, "retrain", "retrain.json")))
    assert retrained["macs"] == cost.flops(net.space, best)
    assert retrained["params"] == cost.params(net.space, best)
    assert 0 <= retrained["val_top1"] <= retrained["val_top5"] <= 1
    assert retrained["latency"]["median_ms"] > 0 and len(retrained["history"]) == 1
    summary = json.load(open(os.path.join(out, "run.json")))
    assert summary["val_top1"] == retrained["val_top1"] and set(summary["seconds"]) == {
        "train", "search", "retrain", "report"}

    model = torch.load(os.path.join(out, "model.pt"), weights_only=False)
    assert Arch.from_json(model.bsnas_arch) == best
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_search_retrain_and_train_commands_on_the_checkpoint(run, tmp_path, capsys):
    out, overrides = run["out"], run["overrides"]
    ckpt = latest_checkpoint(out)
    search_dir = str(tmp_path / "search")
    args = ["search", "--checkpoint", ckpt, "--config", QUICKSTART, "--out", search_dir, *overrides,
            "search.population=2", "search.generations=1", "search.top_k=1", "search.mutants=0",
            "search.crossovers=0"]
    assert main(args) == 0
    first = open(os.path.join(search_dir, "candidates.csv")).read()
    # resuming a finished search changes nothing
    assert main(args + ["--resume"]) == 0
    assert open(os.path.join(search_dir, "candidates.csv")).read() == first
    assert "best of 2 candidates" in capsys.readouterr().out

    # another seed would hold out other images: refused before any work
    assert main(args + ["seed=5"]) == 2
    assert "holds out different training images" in capsys.readouterr().err

    arch = os.path.join(search_dir, "best_arch.json")
    assert main(["retrain", "--arch", arch, "--checkpoint", ckpt, "--config", QUICKSTART,
                 "--out", str(tmp_path / "retrain"), *overrides, "retrain.epochs=0"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {"val_top1", "val_top5", "macs", "params", "latency_ms"}
    assert main(["retrain", "--arch", arch, "--config", QUICKSTART, *overrides]) == 2
    assert "no supernet checkpoint" in capsys.readouterr().err

    # the training run is complete: resuming it trains nothing and keeps the shrunk space
    assert main(["train", "--config", QUICKSTART, "--resume", *overrides]) == 0
    assert "trained 2 epochs (" in capsys.readouterr().out
    assert latest_checkpoint(out) == ckpt
