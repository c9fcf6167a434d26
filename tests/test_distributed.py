"""DDP consistency of supernet training: two gloo processes (spawned, CPU, the `tiny`
space, deterministic) train with channel re-ordering and shrinking on, then every
rank holds the same parameters, optimizer state, BN buffers and enabled space; the
shrinking decision is taken on rank 0 only; the logged loss is the mean of the ranks'
losses. Also: `step_bn_stats` names exactly the BN entries a training step updates."""
import csv
import json
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from bsnas.config import load_config
from bsnas.data import prepare_digits
from bsnas.space import load_space
from bsnas.supernet import Supernet
from bsnas.train.rank_sync import step_bn_stats

WORLD = 2
EPOCHS = 2


def _overrides(cache, out_dir):
    o = {"out_dir": out_dir, "data.cache_dir": cache, "data.loader": "torch", "data.holdout": 900,
         "data.batch_size": 32, "data.eval_batch_size": 256, "data.workers": 0,
         "data.calib_batches": 1, "data.scale": "[0.5, 1.0]", "data.flip": "false",
         "data.verify": "false", "train.epochs": EPOCHS, "train.lr": 0.4, "train.eval_every": 0,
         "train.progress": "false", "train.log_every": 1, "broaden.warmup_epochs": 0.25,
         "broaden.broaden_epochs": 1, "broaden.reorder": "true", "shrink.enabled": "true",
         "shrink.start": 1, "shrink.interval": 1, "shrink.samples": 6, "deterministic": "true",
         "seed": 3}
    return [f"{k}={v}" for k, v in o.items()]


class _RecordingF:
    """torch.nn.functional with cross_entropy recording each loss (this rank's, before
    any averaging) into `losses`."""

    def __init__(self, losses):
        self.losses = losses

    def __getattr__(self, name):
        return getattr(F, name)

    def cross_entropy(self, *args, **kwargs):
        loss = F.cross_entropy(*args, **kwargs)
        self.losses.append(float(loss))
        return loss


def _worker(rank, store, cache, out_dir):
    import bsnas.train.trainer as trainer_module
    from bsnas.strategy.shrinking import Shrinker
    from bsnas.train.trainer import Trainer

    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        if rank != 0:  # the decision is rank 0's alone: the others only apply it
            def decide(self, *args, **kwargs):
                raise AssertionError("Shrinker.decide ran on a rank other than 0")
            Shrinker.decide = decide
        cfg = load_config(None, _overrides(cache, out_dir))
        trainer = Trainer(cfg)
        trainer.epoch_hooks.append(Shrinker.from_config(cfg))
        losses = []
        trainer_module.F = _RecordingF(losses)
        trainer.fit()
        opt = trainer.optimizer.state_dict()
        torch.save({
            "params": dict(trainer.supernet.named_parameters()),
            "buffers": dict(trainer.supernet.named_buffers()),
            "optimizer": opt["state"], "param_groups": opt["param_groups"],
            "enabled": trainer.enabled.state_dict(),
            "decisions": trainer.extra_state["shrink"]["decisions"],
            "losses": losses, "steps_per_epoch": trainer.steps_per_epoch,
        }, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_stay_identical_with_reordering_and_shrinking(tmp_path):
    cache = str(tmp_path / "cache")
    prepare_digits(cache)  # once, before the ranks start
    out = tmp_path / "run"
    out.mkdir()
    mp.spawn(_worker, args=(str(tmp_path / "store"), cache, str(out)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD))

    # the run did what the test is about: channels were re-ordered, shrinking decided
    with open(out / "broadening.csv") as f:
        assert any(row["reordered"] for row in csv.DictReader(f))
    # a decision after every epoch but the last (none after it: training would not follow)
    assert [d["epoch"] for d in r0["decisions"]] == list(range(1, EPOCHS))
    # every rank holds the same state, bit for bit
    for kind in ("params", "buffers"):
        assert r0[kind].keys() == r1[kind].keys()
        for name in r0[kind]:
            assert torch.equal(r0[kind][name], r1[kind][name]), f"{kind} {name} differs"
    assert r0["optimizer"].keys() == r1["optimizer"].keys() and r0["optimizer"]
    for i, state in r0["optimizer"].items():
        assert state.keys() == r1["optimizer"][i].keys()
        for k, v in state.items():
            assert torch.equal(v, r1["optimizer"][i][k]), f"optimizer state {i}.{k} differs"
    assert r0["param_groups"] == r1["param_groups"]
    assert r0["enabled"] == r1["enabled"]
    assert r0["decisions"] == r1["decisions"]
    with open(out / "shrink_log.json") as f:
        assert json.load(f)["decisions"][-1]["enabled"] == r0["enabled"]
    # the logged loss of every step is the mean of the ranks' losses, which differ
    # (each rank trains on its own shard)
    steps = EPOCHS * r0["steps_per_epoch"]
    assert len(r0["losses"]) == len(r1["losses"]) == steps
    assert any(a != b for a, b in zip(r0["losses"], r1["losses"]))
    with open(out / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    for row, a, b in zip(rows, r0["losses"], r1["losses"]):
        assert float(row["loss"]) == pytest.approx((a + b) / 2, rel=1e-6, abs=1e-7)
    with open(out / "epochs.csv") as f:
        epochs = list(csv.DictReader(f))
    n = r0["steps_per_epoch"]
    for e, row in enumerate(epochs):
        mean = sum(r0["losses"][e * n:(e + 1) * n] + r1["losses"][e * n:(e + 1) * n]) / (2 * n)
        assert float(row["train_loss"]) == pytest.approx(mean, rel=1e-5)


@pytest.mark.parametrize("fair", [False, True])
def test_step_bn_stats_names_exactly_the_updated_entries(fair):
    space = load_space("tiny")
    torch.manual_seed(0)
    net = Supernet(space).train()
    rng = random.Random(4)
    paths = [space.sample(rng) for _ in range(3 if fair else 1)]
    before = {n: b.clone() for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var"))}
    for arch in paths:
        net.activate(arch)
        net(torch.randn(4, space.in_channels, space.resolution, space.resolution))
    listed = {n: torch.zeros_like(b, dtype=torch.bool) for n, b in before.items()}
    names = {b.data_ptr(): n for n, b in net.named_buffers()}
    views = step_bn_stats(net, paths)
    assert all(v.dim() == 1 for v in views)
    for v in views:  # views start at their buffer's start: a prefix
        mask = listed[names[v.data_ptr()]]
        assert not mask[:v.numel()].any(), "an entry listed twice"
        mask[:v.numel()] = True
    buffers = dict(net.named_buffers())
    for name, old in before.items():
        changed = buffers[name] != old
        assert torch.equal(changed, listed[name]), name
