"""Shrinking: scoring and the decision rule on synthetic path results (a planted bad op
goes first, floors and unscored candidates respected), a real supernet with a planted
op that destroys its input, the trainer hook's log and state, and two DDP processes
that shard the evaluation and reach the same decision."""
import json
import os
import random
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from bsnas.space import SKIP, EnabledSpace, load_space
from bsnas.strategy.shrinking import (LOG_NAME, PathResult, Shrinker, apply_drops, choose_drops,
                                      drop_target, score_candidates)
from bsnas.supernet import Supernet


@pytest.fixture(scope="module")
def space():
    return load_space("tiny")


def _results(space, enabled, n, value, seed=0):
    """n uniformly sampled paths with top1 = value(arch, rng) and loss = 1 - top1."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        arch = space.sample(rng, enabled)
        top1 = value(arch, rng)
        out.append(PathResult(arch, top1, 1.0 - top1))
    return out


def _planted(arch, rng):
    # k5 in layer 2 costs 30 points; everything else is noise of +-2 points
    return 0.8 - 0.3 * (arch[2].op == "k5") + rng.uniform(-0.02, 0.02)


@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_planted_bad_op_is_turned_off_first(space, metric):
    enabled = EnabledSpace(space)
    results = _results(space, enabled, 300, _planted)
    scores = score_candidates(enabled, results, metric)
    by_key = {(s.layer, s.kind, s.name): s for s in scores}
    bad = by_key[(2, "op", "k5")]
    assert bad.gap == pytest.approx(0.3, abs=0.03) and bad.count > 50
    for s in scores:  # every enabled candidate is scored exactly once
        assert s.score is not None and s.gap >= 0
    assert len(scores) == sum(len(enabled.ops(i)) + len(enabled.widths(i)) for i in range(space.num_layers))
    drops = choose_drops(enabled, scores, target=3)
    assert (drops[0].layer, drops[0].kind, drops[0].name) == (2, "op", "k5")
    assert [d.gap for d in drops] == sorted((d.gap for d in drops), reverse=True)
    apply_drops(enabled, drops)
    assert enabled.ops(2) == ("k3", "k7")


def test_widths_are_shared_by_the_kernel_ops_of_a_layer(space):
    enabled = EnabledSpace(space)
    # width 48 of layer 0 is bad whichever kernel op runs it; skip paths carry no width
    results = _results(space, enabled, 400, lambda a, r: 0.9 - 0.4 * (a[0].width == 48))
    scores = {(s.layer, s.kind, s.name): s for s in score_candidates(enabled, results)}
    w48 = scores[(0, "width", 48)]
    used = [r for r in results if r.arch[0].op != SKIP and r.arch[0].width == 48]
    assert w48.count == len(used) and {r.arch[0].op for r in used} == {"k3", "k5", "k7"}
    assert w48.gap == pytest.approx(0.4)
    assert sum(scores[(0, "width", w)].count for w in enabled.widths(0)) == \
        sum(r.arch[0].op != SKIP for r in results)
    drops = choose_drops(enabled, list(scores.values()), target=1)
    assert [(d.layer, d.kind, d.name) for d in drops] == [(0, "width", 48)]


def test_unscored_candidates_are_never_dropped(space):
    enabled = EnabledSpace(space)
    rng = random.Random(1)
    # no path uses k7 in layer 0; all others are bad but scored
    results = []
    while len(results) < 100:
        a = space.sample(rng, enabled)
        if a[0].op != "k7":
            results.append(PathResult(a, 0.1 + 0.5 * (a[0].op == "k3"), 1.0))
    scores = score_candidates(enabled, results)
    k7 = next(s for s in scores if (s.layer, s.kind, s.name) == (0, "op", "k7"))
    assert k7.score is None and k7.gap is None and k7.count == 0
    drops = choose_drops(enabled, scores, target=1000, min_ops=1, min_widths=1)
    assert (0, "op", "k7") not in {(d.layer, d.kind, d.name) for d in drops}
    assert {(d.layer, d.name) for d in drops if d.kind == "op" and d.layer == 0} == {(0, "k5"), (0, SKIP)}


@pytest.mark.parametrize("min_ops,min_widths", [(1, 2), (2, 3), (3, 5)])
def test_floors_per_layer_are_kept(space, min_ops, min_widths):
    enabled = EnabledSpace(space)
    # a strictly ranked, tie-free score for every candidate, so everything is droppable
    ops_rank = {"k3": 0.0, "k5": 0.01, "k7": 0.02, SKIP: 0.03}

    def value(a, rng):
        return sum(ops_rank[c.op] + (c.width or 0) * 1e-4 for c in a.layers) + rng.uniform(0, 1e-6)

    for decision in range(4):  # repeated decisions never break the floors
        results = _results(space, enabled, 400, value, seed=decision)
        drops = choose_drops(enabled, score_candidates(enabled, results), target=1000,
                             min_ops=min_ops, min_widths=min_widths)
        apply_drops(enabled, drops)
        for i, layer in enumerate(space.layers):
            assert len(enabled.ops(i)) == min(min_ops, len(layer.ops))
            assert len(enabled.widths(i)) == min(min_widths, len(layer.widths))


def test_drop_target_and_ties():
    space = load_space("tiny")
    enabled = EnabledSpace(space)
    n = sum(len(enabled.ops(i)) + len(enabled.widths(i)) for i in range(space.num_layers))
    assert n == 58  # 22 ops + 36 widths
    assert drop_target(enabled, 0.0) == 0
    assert drop_target(enabled, 0.1) == 6  # 5.8 rounds to 6
    assert drop_target(enabled, 0.05) == 3  # 2.9 rounds to 3
    assert drop_target(enabled, 0.25) == 15  # 14.5 rounds half up
    # all paths equally good: every gap is 0, nothing is dropped whatever the target
    results = _results(space, enabled, 50, lambda a, r: 0.5)
    assert choose_drops(enabled, score_candidates(enabled, results), target=10) == []
    with pytest.raises(ValueError, match="metric"):
        score_candidates(enabled, results, "f1")
    with pytest.raises(ValueError, match="drop_fraction"):
        Shrinker(1, 1, 10, 1.5)


def test_schedule_and_path_sampling_depend_only_on_seed_and_epoch(space):
    s = Shrinker(start=6, interval=3, samples=10, drop_fraction=0.1, seed=7)
    assert [e for e in range(1, 16) if s.due(e)] == [6, 9, 12, 15]
    enabled = EnabledSpace(space)
    assert s.sample_paths(enabled, 6) == s.sample_paths(enabled.copy(), 6)
    assert s.sample_paths(enabled, 6) != s.sample_paths(enabled, 9)
    assert s.sample_paths(enabled, 6) != Shrinker(6, 3, 10, 0.1, seed=8).sample_paths(enabled, 6)
    enabled.disable_op(0, "k3")
    assert all(a[0].op != "k3" for a in s.sample_paths(enabled, 6))


def test_measure_evaluates_each_distinct_path_once(space):
    a, b = space.sample(1), space.sample(2)
    calls = []

    def evaluate(arch):
        calls.append(arch)
        return {"top1": 0.5 if arch == a else 0.25, "loss": 1.0}

    out = Shrinker.measure([a, b, a, a], evaluate)
    assert calls == [a, b]
    assert [r.top1 for r in out] == [0.5, 0.25, 0.5, 0.5] and [r.arch for r in out] == [a, b, a, a]


# --------------------------------------------------------------------------- real supernet

SMALL = {"name": "small", "resolution": 8, "classes": 4, "stem": {"channels": 8, "stride": 1},
         "ops": ["k3", "k5", "skip"], "width": {"min_ratio": 1, "max_ratio": 3, "step": 1},
         "stages": [{"channels": 8, "layers": 3, "stride": 1}], "head": {"channels": 16}}


def _synthetic_batches(n_batches, seed, templates):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, len(templates), (32,), generator=g)
        x = templates[y] + 0.3 * torch.randn(32, *templates.shape[1:], generator=g)
        out.append((x, y))
    return out


def test_real_supernet_planted_op_is_turned_off(tmp_path):
    """Every spring block is made an identity (so all paths compute the same trained
    function) except k5 of layer 1, whose output is replaced by noise: the shrinker,
    run as a trainer epoch hook with real BN recalibration and evaluation, must turn it
    off first."""
    torch.manual_seed(0)
    net = Supernet(SMALL)
    for i, layer in enumerate(net.layers):
        for op, block in layer.blocks.items():
            if (i, op) == (1, "k5"):
                block.register_forward_hook(lambda m, inp, out: 5 * torch.randn_like(out))
            else:
                block.register_forward_hook(lambda m, inp, out: inp[0])
    templates = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    train = _synthetic_batches(60, 2, templates)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.activate(net.space.uniform(SKIP))  # the function every path computes, trained cheaply
    net.train()
    for x, y in train:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    trainer = SimpleNamespace(
        supernet=net, enabled=EnabledSpace(net.space), extra_state={}, out_dir=str(tmp_path),
        dist=SimpleNamespace(rank=0, world_size=1),
        data=SimpleNamespace(calib=_synthetic_batches(1, 3, templates),
                             holdout=_synthetic_batches(2, 4, templates)))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    shrinker = Shrinker(start=2, interval=2, samples=60, drop_fraction=0.2, min_ops=1, min_widths=1)
    assert shrinker(trainer, 1) is None  # not due yet
    record = shrinker(trainer, 2)
    good = [p["top1"] for p in record["paths"] if p["arch"]["layers"][1]["op"] != "k5"]
    bad = [p["top1"] for p in record["paths"] if p["arch"]["layers"][1]["op"] == "k5"]
    assert min(good) > 0.9 and max(bad) < 0.6 and len(set(good)) == 1
    # k5 of layer 1 goes first (largest gap); other candidates only differ by how many
    # k5 paths they happened to share
    first = record["dropped"][0]
    assert (first["layer"], first["kind"], first["name"]) == (1, "op", "k5")
    assert first["gap"] > 0.3
    assert not trainer.enabled.is_enabled(1, "k5") and trainer.enabled.ops(1) == ("k3", "skip")
    # evaluation left the weights and BN statistics alone
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the decision is in the checkpointed state and the JSON log; not repeated on a rerun
    assert trainer.extra_state["shrink"]["decisions"] == [record]
    assert shrinker(trainer, 2) is None
    with open(tmp_path / LOG_NAME) as f:
        saved = json.load(f)
    assert saved["settings"]["samples"] == 60
    assert saved["decisions"][0]["dropped"] == record["dropped"]
    assert saved["decisions"][0]["enabled"] == trainer.enabled.state_dict()


# --------------------------------------------------------------------------- DDP


def _ddp_worker(rank, world, store, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        space = load_space("tiny")
        enabled = EnabledSpace(space)
        shrinker = Shrinker(start=1, interval=1, samples=41, drop_fraction=0.1, seed=5)
        evaluated = []

        def evaluate(arch):
            evaluated.append(arch.to_dict())
            # deterministic per arch, so any rank computes the same value
            h = random.Random(str(arch)).random()
            return {"top1": 0.5 + 0.3 * (arch[3].op == "k7") + 0.1 * h, "loss": h}

        paths = shrinker.sample_paths(enabled, 1)
        results = shrinker.measure(paths, evaluate, rank, world)
        record = shrinker.decide(enabled, results, 1)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"evaluated": evaluated, "record": record}, f)
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_shard_evaluation_and_agree(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert r0["record"] == r1["record"]
    assert r0["record"]["dropped"]
    e0 = {json.dumps(a, sort_keys=True) for a in r0["evaluated"]}
    e1 = {json.dumps(a, sort_keys=True) for a in r1["evaluated"]}
    distinct = {json.dumps(p["arch"], sort_keys=True) for p in r0["record"]["paths"]}
    assert not e0 & e1 and e0 | e1 == distinct  # each distinct path measured by exactly one rank
    assert abs(len(e0) - len(e1)) <= 1
    # the gathered results equal a single-process run
    enabled = EnabledSpace(load_space("tiny"))
    shrinker = Shrinker(start=1, interval=1, samples=41, drop_fraction=0.1, seed=5)

    def evaluate(arch):
        h = random.Random(str(arch)).random()
        return {"top1": 0.5 + 0.3 * (arch[3].op == "k7") + 0.1 * h, "loss": h}

    single = shrinker.decide(enabled, shrinker.measure(shrinker.sample_paths(enabled, 1), evaluate), 1)
    assert json.loads(json.dumps(single)) == r0["record"]
