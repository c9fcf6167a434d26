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
    # huge finite values are finite (an overflowing norm is checked element-wise)
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


# --------------------------------------------------------------------------- damaged checkpoints

DAMAGED = "is damaged (truncated or not a bsnas checkpoint)"


def _damage(path, how):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write({"empty": b"", "truncated": data[:len(data) // 2], "tail": data[:-10],
                 "junk": b"not a checkpoint " * 20}[how])


@pytest.mark.parametrize("how", ["empty", "truncated", "tail", "junk"])
def test_load_checkpoint_names_a_damaged_file(tmp_path, how):
    from bsnas.train.checkpoint import CheckpointError
    path = str(tmp_path / "ckpt-000000004.pt")
    torch.save({"model": {"w": torch.zeros(100)}}, path)
    _damage(path, how)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert isinstance(e.value, ValueError)
    assert str(e.value).startswith(f"checkpoint {path} {DAMAGED}: ") and "\n" not in str(e.value)
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="it holds a list"):
        load_checkpoint(path)


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    """A finished 1-epoch run with a checkpoint every 2 steps (all kept)."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    trainer = _trainer(cache, out, **{"train.checkpoint_every": 2, "train.keep_checkpoints": 50})
    trainer.fit()
    return out, trainer.steps_per_epoch


def _one_line_error(capsys, command):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"bsnas {command}: error: "), err
    return err


def test_commands_name_a_damaged_checkpoint(cache, trained, tmp_path, capsys):
    out, _ = trained
    bad = str(tmp_path / "ckpt-000000002.pt")
    with open(list_checkpoints(out)[0], "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 3])
    arch = str(tmp_path / "arch.json")
    from bsnas.space import load_space
    load_space("tiny").sample(0).save(arch)
    run_dir = str(tmp_path / "other")
    commands = {
        "export": ["export", "--checkpoint", bad, "--arch", arch, "--out", str(tmp_path / "m.pt")],
        "search": ["search", "--checkpoint", bad, *_overrides(cache, run_dir)],
        "retrain": ["retrain", "--arch", arch, "--checkpoint", bad, *_overrides(cache, run_dir)],
    }
    for command, argv in commands.items():
        assert main(argv) == 2, command
        assert f"checkpoint {bad} {DAMAGED}: " in _one_line_error(capsys, command)
    assert not (tmp_path / "m.pt").exists()
    # train --resume in a folder whose only checkpoint is damaged
    os.makedirs(run_dir)
    os.replace(bad, os.path.join(run_dir, "ckpt-000000002.pt"))
    assert main(["train", "--resume", *_overrides(cache, run_dir)]) == 2
    err = _one_line_error(capsys, "train")
    assert f"no readable checkpoint in {run_dir}: checkpoint {run_dir}/ckpt-000000002.pt {DAMAGED}" in err


def test_export_refuses_a_directory_as_out(trained, tmp_path, capsys):
    out, _ = trained
    arch = str(tmp_path / "arch.json")
    from bsnas.space import load_space
    load_space("tiny").sample(0).save(arch)
    assert main(["export", "--checkpoint", list_checkpoints(out)[-1], "--arch", arch,
                 "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a directory" in _one_line_error(capsys, "export")


def test_resume_falls_back_to_the_newest_good_checkpoint(cache, trained, tmp_path, caplog):
    ref, steps = trained
    out = str(tmp_path / "run")
    extra = {"train.checkpoint_every": 2, "train.keep_checkpoints": 50}
    victim = _trainer(cache, out, **extra)
    orig = victim.train_step

    class Killed(Exception):
        pass

    def train_step(x, y, ef):
        if victim.step == 5:
            raise Killed
        return orig(x, y, ef)
    victim.train_step = train_step
    with pytest.raises(Killed):
        victim.fit()
    newest = list_checkpoints(out)[-1]
    assert newest.endswith("ckpt-000000004.pt")
    _damage(newest, "truncated")
    # a temporary file of a write the kill cut short, and a user's file that looks alike
    for name in (".tmp-abcd_123.pt", ".tmp-notes.txt"):
        open(os.path.join(out, name), "wb").write(b"x")
    with caplog.at_level(logging.WARNING):
        resumed = Trainer(load_config(None, _overrides(cache, out, **extra)), resume=True)
    assert resumed.step == 2
    warned = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(warned) == 1 and newest in warned[0] and list_checkpoints(out)[-1] in warned[0], warned
    assert os.path.exists(newest + ".damaged") and not os.path.exists(newest)
    assert not os.path.exists(os.path.join(out, ".tmp-abcd_123.pt"))
    assert os.path.exists(os.path.join(out, ".tmp-notes.txt"))
    resumed.fit()
    # exact resume from the older checkpoint: the same weights as the uninterrupted run
    a, b = load_checkpoint(list_checkpoints(ref)[-1]), load_checkpoint(list_checkpoints(out)[-1])
    assert a["step"] == b["step"] == steps
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_resume_names_a_checkpoint_of_another_space_or_shape(cache, trained, tmp_path):
    from bsnas.train.checkpoint import CheckpointError
    out, _ = trained
    ckpt = load_checkpoint(list_checkpoints(out)[-1])
    trainer = _trainer(cache, str(tmp_path / "run"))
    other = copy.deepcopy(ckpt)
    other["space"]["name"] = "small"
    other["space"]["classes"] = 100
    path = str(tmp_path / "other.pt")
    torch.save(other, path)
    with pytest.raises(CheckpointError) as e:
        trainer.resume(path)
    assert str(e.value) == (f"checkpoint {path} was written for space 'small' (6 layers, 100 classes, "
                            f"resolution 32), this run uses 'tiny' (6 layers, 10 classes, resolution 32)")
    wrong = copy.deepcopy(ckpt)
    wrong["model"]["classifier.weight"] = torch.zeros(7, 3)
    torch.save(wrong, path)
    with pytest.raises(CheckpointError, match=r"'classifier.weight' has shape \[7, 3\] there, "
                                              r"\[10, \d+\] here"):
        trainer.resume(path)
    plain = {"space": ckpt["space"], "model": ckpt["model"]}
    torch.save(plain, path)
    with pytest.raises(CheckpointError, match="is not a training checkpoint"):
        trainer.resume(path)


def test_checkpoints_get_the_umask_mode(tmp_path):
    from bsnas.train.checkpoint import save_checkpoint, save_json_atomic
    old = os.umask(0o027)
    try:
        path = save_checkpoint({"model": {}}, str(tmp_path), 1, keep=2)
        save_json_atomic({"a": 1}, str(tmp_path / "s.json"))
        with open(tmp_path / "plain.txt", "w"):
            pass
    finally:
        os.umask(old)
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(path) == mode(tmp_path / "s.json") == mode(tmp_path / "plain.txt") == 0o640

def test_export_names_weights_that_do_not_fit_their_space(trained, tmp_path, capsys):
    out, _ = trained
    ckpt = load_checkpoint(list_checkpoints(out)[-1])
    ckpt["model"]["classifier.weight"] = torch.zeros(7, 3)
    path = str(tmp_path / "wrong.pt")
    torch.save(ckpt, path)
    arch = str(tmp_path / "arch.json")
    from bsnas.space import load_space
    load_space("tiny").sample(0).save(arch)
    assert main(["export", "--checkpoint", path, "--arch", arch, "--out", str(tmp_path / "m.pt")]) == 2
    err = _one_line_error(capsys, "export")
    assert f"checkpoint {path}: its weights do not fit its space: size mismatch for classifier.weight" in err


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


# --------------------------------------------------------------------------- reusing a run folder


def test_fresh_run_refuses_a_folder_holding_a_run(cache, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", *_overrides(cache, out)]
    assert main(args) == 0
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
    open(os.path.join(out, "notes.txt"), "w").write("mine")
    capsys.readouterr()
    assert main(args) == 2
    err = _one_line_error(capsys, "train")
    assert f"run folder {out} already holds a run (" in err and "--resume" in err and "--overwrite" in err
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in before} == before  # nothing touched
    # --overwrite: the old run's files go first (the user's file stays); one run in the logs
    open(os.path.join(out, "ckpt-000009999.pt"), "wb").write(b"old")
    assert main(args + ["--overwrite"]) == 0
    assert open(os.path.join(out, "notes.txt")).read() == "mine"
    assert not os.path.exists(os.path.join(out, "ckpt-000009999.pt"))
    assert [r["epoch"] for r in _read_csv(os.path.join(out, "epochs.csv"))] == ["1"]
    steps = [r["step"] for r in _read_csv(os.path.join(out, "train_log.csv"))]
    assert len(steps) == len(set(steps))
    # --resume and --overwrite exclude each other
    with pytest.raises(SystemExit):
        main(args + ["--overwrite", "--resume"])


def test_a_folder_without_a_run_is_fine(cache, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _trainer(cache, str(out)).fit()
    assert (out / "notes.txt").read_text() == "mine"


def _strip_rate(rows):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


def test_resume_logs_each_step_and_epoch_once(cache, tmp_path):
    extra = {"train.epochs": 2, "train.checkpoint_every": 3, "train.keep_checkpoints": 50,
             "broaden.warmup_epochs": 0.3, "broaden.broaden_epochs": 1.2}
    ref = str(tmp_path / "ref")
    _trainer(cache, ref, **extra).fit()
    out = str(tmp_path / "cut")
    victim = _trainer(cache, out, **extra)
    per_epoch = victim.steps_per_epoch
    crash_at = per_epoch + 5  # in epoch 2, two steps after the checkpoint of its step 3

    class Killed(Exception):
        pass
    orig = victim.train_step

    def train_step(x, y, ef):
        if victim.step == crash_at:
            raise Killed
        return orig(x, y, ef)
    victim.train_step = train_step
    with pytest.raises(Killed):
        victim.fit()
    logged = [int(r["step"]) for r in _read_csv(os.path.join(out, "train_log.csv"))]
    assert max(logged) == crash_at > load_checkpoint(list_checkpoints(out)[-1])["step"]
    # and a line a kill cut short
    with open(os.path.join(out, "train_log.csv"), "a") as f:
        f.write("99,1.9,2.")
    Trainer(load_config(None, _overrides(cache, out, **extra)), resume=True).fit()
    for name in ("train_log.csv", "epochs.csv", "broadening.csv"):
        a = _strip_rate(_read_csv(os.path.join(ref, name)))
        b = _strip_rate(_read_csv(os.path.join(out, name)))
        assert a == b, name  # every row once, the resumed epoch's mean loss over all of it
    assert len(_read_csv(os.path.join(ref, "epochs.csv"))) == 2


def test_resume_without_a_checkpoint_starts_the_logs_afresh(cache, tmp_path):
    out = str(tmp_path / "run")
    victim = _trainer(cache, out)

    class Killed(Exception):
        pass
    orig = victim.train_step

    def train_step(x, y, ef):
        if victim.step == 3:
            raise Killed
        return orig(x, y, ef)
    victim.train_step = train_step
    with pytest.raises(Killed):
        victim.fit()
    assert list_checkpoints(out) == [] and len(_read_csv(os.path.join(out, "train_log.csv"))) == 3
    trainer = Trainer(load_config(None, _overrides(cache, out)), resume=True)
    trainer.fit()
    steps = [int(r["step"]) for r in _read_csv(os.path.join(out, "train_log.csv"))]
    assert steps == list(range(1, trainer.steps_per_epoch + 1))

