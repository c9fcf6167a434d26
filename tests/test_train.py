"""Supernet training: a short run, exact resume after SIGKILL, DDP with 2 CPU processes,
the broadening schedule, sampling and the learning-rate schedule."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bsnas.config import load_config
from bsnas.pipeline.run import build_trainer
from bsnas.space import EnabledSpace, PathSampler, load_space
from bsnas.train.broadening import BroadeningSchedule
from bsnas.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from bsnas.train.runtime import lr_lambda
from idx_files import write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _overrides(cache, out_dir, **extra):
    o = {"out_dir": out_dir, "data.cache_dir": cache, "data.loader": "torch",
         "data.holdout": 900, "data.batch_size": 32, "data.eval_batch_size": 128,
         "data.workers": 0, "data.calib_batches": 1, "data.scale": "[0.5, 1.0]",
         "data.flip": "false", "data.verify": "false", "train.epochs": 2, "train.lr": 0.4,
         "train.eval_every": 0, "train.progress": "false", "train.log_every": 2, "broaden.warmup_epochs": 0.5,
         "broaden.broaden_epochs": 1, "deterministic": "true", "seed": 3}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def test_short_run_writes_logs_and_checkpoints(cache, tmp_path):
    out = str(tmp_path / "run")
    cfg = load_config(None, _overrides(cache, out, **{"train.eval_every": 2,
                                                     "train.keep_checkpoints": 2,
                                                     "train.checkpoint_every": 5}))
    trainer = build_trainer(cfg)  # the trainer of `bsnas train`: it also plots the curves
    summary = trainer.fit()
    assert summary["epoch"] == 2 and summary["val_top1"] >= 0
    for name in ("train_log.csv", "epochs.csv", "summary.json", "broadening.csv",
                 "training_curves.png", "config.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert len(list_checkpoints(out)) == 2  # only the newest `keep_checkpoints`
    ckpt = load_checkpoint(latest_checkpoint(out))
    assert ckpt["epoch"] == 2 and ckpt["step"] == trainer.step == 2 * trainer.steps_per_epoch
    # Broadening reached the full width range and logged each step of it.
    with open(os.path.join(out, "broadening.csv")) as f:
        rows = f.read().strip().splitlines()[1:]
    assert len(rows) >= 2
    full = tuple(len(layer.widths) for layer in trainer.space.layers)
    assert trainer.broadening.stages(2.0) == full


SCRIPT = """
import sys
from bsnas.config import load_config
from bsnas.train import Trainer
cfg = load_config(None, sys.argv[2:])
Trainer(cfg, resume=sys.argv[1] == "resume").fit()
"""


def _run(args, resume=False, **kw):
    cmd = [sys.executable, "-c", SCRIPT, "resume" if resume else "fresh", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **kw)


def _final_model(out):
    return load_checkpoint(latest_checkpoint(out))["model"]


def test_resume_after_sigkill_matches_uninterrupted_run(cache, tmp_path):
    common = {"train.checkpoint_every": 4, "train.keep_checkpoints": 50}
    ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
    ref = _run(_overrides(cache, ref_dir, **common))
    assert ref.wait(timeout=600) == 0, ref.stdout.read().decode()[-3000:]

    victim = _run(_overrides(cache, cut_dir, **common))
    deadline = time.time() + 600
    # Kill it hard once a mid-epoch checkpoint of the second epoch exists.
    while time.time() < deadline:
        found = list_checkpoints(cut_dir)
        if found and int(os.path.basename(found[-1])[5:14]) > 20:
            break
        if victim.poll() is not None:
            pytest.fail("training finished before it could be killed: " +
                        victim.stdout.read().decode()[-2000:])
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = load_checkpoint(latest_checkpoint(cut_dir))
    assert 0 < killed_at["batch_in_epoch"] or killed_at["epoch"] < 2

    resumed = _run(_overrides(cache, cut_dir, **common), resume=True)
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read().decode()[-3000:]
    a, b = _final_model(ref_dir), _final_model(cut_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_ddp_two_cpu_processes_stay_in_sync(cache, tmp_path):
    out = str(tmp_path / "ddp")
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(script), "fresh", *_overrides(cache, out, **{"train.epochs": 1})]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["params_in_sync"] is True
    assert summary["steps"] > 0
    # Only rank 0 wrote: one CSV header in the training log.
    with open(os.path.join(out, "train_log.csv")) as f:
        assert f.read().count("step,epoch") == 1


def test_broadening_schedule():
    space = load_space("tiny")
    enabled = EnabledSpace(space)
    sched = BroadeningSchedule(enabled, warmup_epochs=2, broaden_epochs=4)
    grid = space.layers[0].widths
    assert sched.allowed(0, 0.0) == (grid[-1],) and sched.allowed(0, 1.99) == (grid[-1],)
    assert sched.allowed(0, 6.0) == grid
    sizes = [len(sched.allowed(0, e / 4)) for e in range(0, 30)]
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == len(grid)
    assert sched.stage(0, 4.0) == 1 + int(0.5 * (len(grid) - 1))
    enabled.disable_width(0, grid[-1])  # shrinking removed the top width
    assert sched.allowed(0, 0.0) == (grid[-2],)  # falls back to the largest enabled


def test_sampler_is_deterministic_and_fair():
    space = load_space("tiny")
    enabled = EnabledSpace(space)
    sampler = PathSampler(enabled, seed=5)
    allowed = lambda i: enabled.widths(i)  # noqa: E731
    assert sampler.uniform(7, allowed) == PathSampler(enabled, 5).uniform(7, allowed)
    assert len({sampler.uniform(s, allowed) for s in range(20)}) > 10
    paths = sampler.fair(3, allowed)
    m = max(len(enabled.ops(i)) for i in range(enabled.num_layers))
    assert len(paths) == m
    for i in range(enabled.num_layers):
        used = [p.layers[i].op for p in paths]
        assert set(used) == set(enabled.ops(i))  # every enabled op trained this step
        if len(enabled.ops(i)) == m:
            assert sorted(used) == sorted(enabled.ops(i))  # exactly once each


def test_learning_rate_schedule():
    f = lr_lambda(total_steps=100, warmup_steps=10, schedule="cosine")
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=1e-6) and f(100) == pytest.approx(0.0, abs=1e-9)
    g = lr_lambda(total_steps=100, warmup_steps=0, schedule="linear")
    assert g(50) == pytest.approx(0.5)


# --------------------------------------------------------------------------- Fashion-MNIST

FASHION_SPACE = """name: fashion_test
resolution: 28
in_channels: 1
classes: 10
stem: {channels: 8, kernel: 3, stride: 2}
ops: [k3, k5, skip]
width: {min_ratio: 1.0, max_ratio: 3.0, step: 1.0, round_to: 8}
stages:
  - {channels: 8, layers: 2, stride: 1}
  - {channels: 16, layers: 1, stride: 2}
head: {channels: 32}
"""


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """Small Fashion-MNIST idx files (a blocky template per class plus noise) and a
    matching 28x28x1 space file."""
    import numpy as np
    root = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    templates = np.kron(rng.integers(0, 256, (10, 7, 7)), np.ones((4, 4)))
    for split, n in (("train", 600), ("t10k", 50)):
        labels = rng.integers(0, 10, n)
        images = np.clip(0.6 * templates[labels] + rng.normal(0, 40, (n, 28, 28)), 0, 255)
        write_idx(root / f"{split}-images-idx3-ubyte", images.astype(np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte", labels.astype(np.uint8))
    space = root / "space.yaml"
    space.write_text(FASHION_SPACE)
    return {"root": str(root), "space": str(space)}


def _fashion_overrides(fashion, out_dir, **extra):
    o = {"out_dir": out_dir, "space": fashion["space"], "data.dataset": "fashion_mnist",
         "data.root": fashion["root"], "data.loader": "torch", "data.holdout": 100,
         "data.batch_size": 32, "data.eval_batch_size": 64, "data.workers": 0,
         "data.calib_images": 64, "train.epochs": 2, "train.lr": 0.4, "train.eval_every": 1,
         "train.progress": "false", "train.log_every": 2, "train.channels_last": "true",
         "broaden.warmup_epochs": 0.5, "broaden.broaden_epochs": 1, "deterministic": "true",
         "seed": 4}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def test_fashion_mnist_splits(fashion):
    from bsnas.train.runtime import Dist, build_data
    cfg = load_config(None, _fashion_overrides(fashion, "unused"))
    space = load_space(cfg.space)
    data = build_data(cfg, space, torch.device("cpu"), Dist())
    # training images minus the held-out ones; t10k is the validation set, in order
    assert len(data.train) == (600 - 100) // 32  # batches, the last partial one dropped
    held = torch.cat([y for _, y in data.holdout])
    val_x, val_y = (torch.cat(t) for t in zip(*data.val))
    calib = torch.cat([y for _, y in data.calib])
    assert len(held) == 100 and len(val_y) == 50 and len(calib) == 64
    from bsnas.data import load_fashion_mnist
    t10k = load_fashion_mnist(fashion["root"], "test")
    assert torch.equal(val_y, t10k.labels)
    torch.testing.assert_close(val_x, (t10k.images.float() / 255 - t10k.mean[0]) / t10k.std[0])
    assert val_x.shape == (50, 1, 28, 28)
    # the held-out images come from the training file (split_holdout keeps them apart)
    train_all = load_fashion_mnist(fashion["root"], "train").images
    held_x = torch.cat([x for x, _ in data.holdout])
    raw = (held_x * t10k.std[0] + t10k.mean[0]) * 255
    rows = {bytes(x.numpy()) for x in train_all}
    assert all(bytes(r.round().to(torch.uint8).numpy()) in rows for r in raw)
    data.train.set_epoch(0)
    trained = torch.cat([y for _, y in data.train.iterate(0)])
    assert len(trained) == 15 * 32
    # calib_batches, when set, wins; calib_images is capped at the training images
    for extra, want in (({"data.calib_batches": 3}, 96), ({"data.calib_images": 10 ** 6}, 500),
                        ({"data.train_limit": 300, "data.calib_images": 10 ** 6}, 200)):
        cfg = load_config(None, _fashion_overrides(fashion, "unused", **extra))
        d = build_data(cfg, space, torch.device("cpu"), Dist())
        assert sum(len(y) for _, y in d.calib) == want, extra
    cfg = load_config(None, _fashion_overrides(fashion, "unused", **{"data.train_limit": 300}))
    assert sum(len(y) for _, y in build_data(cfg, space, "cpu", Dist()).holdout) == 100


def test_fashion_mnist_errors_name_the_problem(fashion, tmp_path):
    from bsnas.train.runtime import Dist, build_data
    cfg = load_config(None, _fashion_overrides(fashion, "unused", **{"data.root": str(tmp_path)}))
    with pytest.raises(ValueError, match=rf"{tmp_path}/train-images-idx3-ubyte.*does not exist.*"
                                         rf"apt-get install dataset-fashion-mnist"):
        build_data(cfg, load_space(cfg.space), "cpu", Dist())
    cfg = load_config(None, _fashion_overrides(fashion, "unused"))
    with pytest.raises(ValueError, match="Fashion-MNIST images are 28x28, but space 'tiny' has "
                                         "resolution 32"):
        build_data(cfg, load_space("tiny"), "cpu", Dist())
    cfg = load_config(None, _fashion_overrides(fashion, "unused", **{"data.holdout": 600}))
    with pytest.raises(ValueError, match=r"data.holdout must be in \[0, 600\)"):
        build_data(cfg, load_space(cfg.space), "cpu", Dist())


def test_fashion_mnist_resume_matches_uninterrupted_run(fashion, tmp_path):
    """A run resumed from a mid-epoch checkpoint (as if killed right after writing it)
    ends with exactly the parameters of the uninterrupted run."""
    import shutil
    common = {"train.checkpoint_every": 4, "train.keep_checkpoints": 50}
    ref_dir = str(tmp_path / "ref")
    ref = _run(_fashion_overrides(fashion, ref_dir, **common))
    assert ref.wait(timeout=600) == 0, ref.stdout.read().decode()[-3000:]
    steps_per_epoch = (600 - 100) // 32
    by_epoch = {}  # the last mid-epoch checkpoint of each epoch
    for p in list_checkpoints(ref_dir):
        state = load_checkpoint(p)
        if state["batch_in_epoch"] > 0:
            by_epoch[state["epoch"]] = p
    assert sorted(by_epoch) == [0, 1]
    for path in by_epoch.values():
        state = load_checkpoint(path)
        assert 0 < state["batch_in_epoch"] < steps_per_epoch
        cut_dir = tmp_path / f"cut{state['step']}"
        cut_dir.mkdir()
        shutil.copy(path, cut_dir)
        resumed = _run(_fashion_overrides(fashion, str(cut_dir), **common), resume=True)
        assert resumed.wait(timeout=600) == 0, resumed.stdout.read().decode()[-3000:]
        a, b = _final_model(ref_dir), _final_model(str(cut_dir))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{k} differs after resuming at step {state['step']}"
    with open(os.path.join(ref_dir, "summary.json")) as f:
        history = json.load(f)["history"]
    assert len(history) == 2 and all(0 <= h["val_top1"] <= 1 for h in history)
