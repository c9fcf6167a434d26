"""Bad runs and bad files: non-finite training values stop the run (or skip the step)
without reaching a checkpoint; damaged, mismatched and left-over files are named in
one-line errors or cleaned up; a run folder is never mixed with another run's files."""
import copy
import logging
import os

import pytest
import torch

from bsnas.cli import main
from bsnas.config import load_config
from bsnas.train import Trainer
from bsnas.train.checkpoint import list_checkpoints, load_checkpoint
from bsnas.train.nonfinite import FiniteGuard, NonFiniteError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _overrides(cache, out_dir, **extra):
    o = {"out_dir": out_dir, "data.cache_dir": cache, "data.loader": "torch",
         "data.holdout": 900, "data.batch_size": 64, "data.eval_batch_size": 128,
         "data.workers": 0, "data.calib_batches": 1, "data.scale": "[0.5, 1.0]",
         "data.flip": "false", "data.verify": "false", "train.epochs": 1, "train.lr": 0.4,
         "train.eval_every": 0, "train.progress": "false", "train.log_every": 1,
         "broaden.warmup_epochs": 0.5, "broaden.broaden_epochs": 1, "shrink.enabled": "false",
         "deterministic": "true", "seed": 3}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def _trainer(cache, out, **extra) -> Trainer:
    return Trainer(load_config(None, _overrides(cache, out, **extra)))


def _read_csv(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _all_finite(ckpt) -> bool:
    return all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


# --------------------------------------------------------------------------- non-finite values


def _inject_at(trainer, step, what):
    """Make `what(trainer)` run after the backward pass of step `step` (1-based), just
    before the trainer checks the step's values."""
    check = trainer.guard.check

    def patched(loss=None):
        if trainer.step + 1 == step:
            with torch.no_grad():
                what(trainer)
        return check(loss)
    trainer.guard.check = patched


def _first_grad(trainer):
    return next((n, p) for n, p in trainer.supernet.named_parameters() if p.grad is not None)


def test_guard_finds_the_first_bad_tensor_with_one_check():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    net(torch.randn(2, 3, 5, 5)).sum().backward()
    guard = FiniteGuard(net)
    assert guard.check(1.0) is None and guard.check_state() is None
    assert guard.check(float("nan")) == "loss (nan)"
    net[1].running_var[2] = float("inf")
    assert guard.check(1.0) == "BN statistic '1.running_var' (inf)"
    net[0].bias.grad[1] = float("nan")
    assert guard.check(1.0) == "gradient of '0.bias' (NaN)"
    assert guard.check_state() == "BN statistic '1.running_var' (inf)"
    # huge finite values are finite (the infinity norm does not overflow)
    net[1].running_var.fill_(3e38)
    net[0].bias.grad.fill_(3e38)
    assert guard.check(1.0) is None


def test_guard_snapshot_restores_bn_buffers():
    bn = torch.nn.BatchNorm2d(3)
    guard = FiniteGuard(bn)
    guard.snapshot()
    before = copy.deepcopy(bn.state_dict())
    bn(torch.randn(4, 3, 2, 2))
    bn.running_mean[0] = float("nan")
    guard.restore()
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("where", ["loss", "gradient", "bn"])
def test_nonfinite_stops_naming_step_and_tensor(cache, tmp_path, where):
    out = str(tmp_path / "run")
    trainer = _trainer(cache, out, **{"train.checkpoint_every": 1})
    if where == "loss":
        def what(t):  # a NaN weight: the loss of the next step is NaN
            t.supernet.classifier.weight[0, 0] = float("nan")
        inject_step, name = 3, "loss (nan)"
        orig = trainer.train_step

        def train_step(x, y, ef):
            if trainer.step + 1 == inject_step:
                with torch.no_grad():
                    what(trainer)
            return orig(x, y, ef)
        trainer.train_step = train_step
    elif where == "gradient":
        inject_step = 3

        def what(t):
            _first_grad(t)[1].grad.view(-1)[0] = float("inf")
        _inject_at(trainer, inject_step, what)
        name = f"gradient of '{_first_grad_name(trainer)}' (inf)"
    else:
        inject_step, name = 3, "BN statistic 'stem.1.running_var' (NaN)"

        def what(t):
            dict(t.supernet.named_buffers())["stem.1.running_var"][0] = float("nan")
        _inject_at(trainer, inject_step, what)
    with pytest.raises(NonFiniteError) as e:
        trainer.fit()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"non-finite {name} at step {inject_step} "), msg
    assert "train.nonfinite=skip_step" in msg
    steps = [int(os.path.basename(p)[5:14]) for p in list_checkpoints(out)]
    assert steps == [1, 2]  # nothing from the bad step on
    assert all(_all_finite(load_checkpoint(p)) for p in list_checkpoints(out))


def _first_grad_name(trainer):
    # the stem's convolution is on every path and comes first
    return next(n for n, _ in trainer.supernet.named_parameters())


def test_huge_learning_rate_stops_the_cli_with_one_line(cache, tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = main(["train", *_overrides(cache, out, **{"train.lr": "1e30", "train.checkpoint_every": 1})])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bsnas train: error: non-finite ") and " at step " in err[-1], err
    assert all(_all_finite(load_checkpoint(p)) for p in list_checkpoints(out))


def test_skip_step_skips_the_update_and_restores_bn(cache, tmp_path, caplog):
    out = str(tmp_path / "run")
    trainer = _trainer(cache, out, **{"train.nonfinite": "skip_step"})
    bad_step = 3
    _inject_at(trainer, bad_step, lambda t: (
        _first_grad(t)[1].grad.view(-1).__setitem__(0, float("nan")),
        dict(t.supernet.named_buffers())["stem.1.running_var"].__setitem__(0, float("inf"))))
    seen = {}
    orig = trainer.train_step

    def train_step(x, y, ef):
        if trainer.step + 1 == bad_step:
            seen["before"] = copy.deepcopy(trainer.supernet.state_dict())
            lr = trainer.scheduler.get_last_lr()[0]
            out = orig(x, y, ef)
            seen["after"] = copy.deepcopy(trainer.supernet.state_dict())
            seen["lr_moved"] = trainer.scheduler.get_last_lr()[0] != lr
            return out
        return orig(x, y, ef)
    trainer.train_step = train_step
    with caplog.at_level(logging.WARNING, logger="bsnas.train.trainer"):
        trainer.fit()
    # the bad step changed nothing: weights, BN statistics and batch counters as before
    for k, v in seen["before"].items():
        assert torch.equal(v, seen["after"][k]), k
    assert seen["lr_moved"]  # the schedule still advances: the step was taken, its update skipped
    assert any(f"step {bad_step}: update skipped: non-finite gradient of " in r.getMessage()
               for r in caplog.records)
    rows = _read_csv(os.path.join(out, "epochs.csv"))
    assert [r["skipped_steps"] for r in rows] == ["1"]
    assert trainer.step == trainer.steps_per_epoch
    assert _all_finite(load_checkpoint(list_checkpoints(out)[-1]))


def test_healthy_run_counts_no_skipped_steps(cache, tmp_path):
    out = str(tmp_path / "run")
    _trainer(cache, out, **{"train.nonfinite": "skip_step"}).fit()
    assert [r["skipped_steps"] for r in _read_csv(os.path.join(out, "epochs.csv"))] == ["0"]


def test_checkpoint_is_never_written_with_nonfinite_weights(cache, tmp_path):
    out = str(tmp_path / "run")
    trainer = _trainer(cache, out)
    with torch.no_grad():
        trainer.supernet.classifier.bias[1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"not writing the checkpoint of step 0: non-finite "
                                             r"parameter 'classifier.bias' \(inf\)"):
        trainer.save()
    assert list_checkpoints(out) == []


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("override, message", [
    ("train.lr=nan", "config key 'train.lr' must be a finite number, got nan"),
    ("train.lr=inf", "config key 'train.lr' must be a finite number, got inf"),
    ("train.lr=.nan", "config key 'train.lr' must be a finite number, got nan"),
    ("train.momentum=-.inf", "config key 'train.momentum' must be a finite number, got -inf"),
    ("data.scale=[0.5, .nan]", "config key 'data.scale[1]' must be a finite number, got nan"),
    ("search.max_macs=.inf", "config key 'search.max_macs' must be a finite number, got inf"),
    ("train.lr=[1,", "override 'train.lr=[1,': the value of 'train.lr' is not valid YAML: "),
    ("train.nonfinite=ignore", "config key 'train.nonfinite' must be one of ['stop', 'skip_step']"),
])
def test_bad_override_is_one_line_naming_the_key(override, message):
    with pytest.raises(ValueError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_exponent_without_a_dot_is_a_number():
    cfg = load_config(None, ["train.lr=1e-3", "search.max_macs=2e6", "train.epochs=1e2"])
    assert cfg.train.lr == 1e-3 and cfg.search.max_macs == 2e6 and cfg.train.epochs == 100


@pytest.mark.parametrize("text, message", [
    ("train:\n  lr: 0.1\n epochs: [3\n", "YAML syntax error at line 3, column 2: "),
    ("train: {lr: .inf}\n", "config key 'train.lr' must be a finite number, got inf"),
    ("train:\n  lr: nan\n", "config key 'train.lr' must be a finite number, got nan"),
])
def test_bad_config_file_is_one_line_naming_file_and_line(tmp_path, capsys, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    if "syntax" in message:
        assert repr(str(path)) in err


# --------------------------------------------------------------------------- unreadable images


def _image_tree(root, classes=10, per_class=4, size=40):
    """`root/{train,val}/<c>/<i>.jpg`; returns the path of a training image cut short
    after its (valid) header."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = os.path.join(root, split, f"c{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    bad = os.path.join(root, "train", "c3", "1.jpg")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) * 2 // 3])
    with Image.open(bad) as im:  # the header still reads
        assert im.size == (size, size)
    return bad


def test_verify_decodes_every_image(tmp_path):
    from bsnas.data import scan_image_folder
    bad = _image_tree(str(tmp_path))
    with pytest.raises(ValueError) as e:
        scan_image_folder(str(tmp_path / "train"))
    assert f"1 unreadable image(s) under {str(tmp_path / 'train')!r}: {bad} (" in str(e.value)
    assert "\n" not in str(e.value)


def test_skip_unreadable_at_the_scan_leaves_them_out_with_a_count(tmp_path, caplog):
    from bsnas.data import scan_image_folder
    bad = _image_tree(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        images = scan_image_folder(str(tmp_path / "train"), skip_unreadable=True)
    assert len(images) == 39 and bad not in images.files and images.skip_unreadable
    assert any("left out 1 unreadable image(s) of 40" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_names_an_unreadable_image_without_verify(tmp_path, workers):
    from bsnas.data import Augment, TorchLoader, scan_image_folder
    bad = _image_tree(str(tmp_path))
    images = scan_image_folder(str(tmp_path / "train"), verify=False)
    loader = TorchLoader(images, 8, Augment(32), False, workers=workers)
    with pytest.raises(ValueError) as e:
        for _ in loader:
            pass
    assert str(e.value).startswith(f"image {bad} cannot be decoded (") and "\n" not in str(e.value)


def test_loader_skips_unreadable_images_when_asked(tmp_path, caplog):
    from bsnas.data import Augment, TorchLoader, scan_image_folder
    bad = _image_tree(str(tmp_path))
    images = scan_image_folder(str(tmp_path / "train"), verify=False, skip_unreadable=True)
    loader = TorchLoader(images, 8, Augment(32), False, workers=0)
    with caplog.at_level(logging.WARNING):
        sizes = [len(y) for _, y in loader]
    assert sum(sizes) == 39 and loader.skipped == 1
    assert any("left 1 unreadable image(s) out of a batch" in r.getMessage() and bad in r.getMessage()
               for r in caplog.records)


def test_build_data_passes_skip_unreadable(tmp_path):
    from bsnas.space import load_space
    from bsnas.train.runtime import Dist, build_data
    bad = _image_tree(str(tmp_path))
    base = [f"data.root={tmp_path}", "data.dataset=folder", "data.holdout=5", "data.batch_size=8",
            "data.workers=0", "data.loader=torch", "data.calib_batches=1"]
    with pytest.raises(ValueError, match=f"unreadable image.*{bad}"):
        build_data(load_config(None, base), load_space("tiny"), "cpu", Dist())
    data = build_data(load_config(None, base + ["data.skip_unreadable=true"]), load_space("tiny"),
                      "cpu", Dist())
    assert len(data.train.dataset) + len(data.holdout.dataset) == 39
