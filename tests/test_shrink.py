"""Shrinking: scoring and the evidence rule on synthetic path results (a planted bad op
goes first, z-values against a hand computation, per-kind budgets, the threshold,
floors and candidates without a standard error respected), the random control, the
cost-aware options, the schedule (no decision after the last epoch), a real supernet
with a planted op that destroys its input, the trainer hook's log and state, and two
DDP processes that shard the evaluation and reach the same decision."""
import json
import os
import random
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from bsnas.space import SKIP, EnabledSpace, load_space
from bsnas.config import load_config
from bsnas.profiler import cost
from bsnas.space import Arch, LayerChoice
from bsnas.strategy.shrinking import (LOG_NAME, CandidateScore, PathResult, Shrinker, apply_drops,
                                      candidate_macs, cheapest_arch, choose_drops,
                                      choose_random_drops, describe, protected_candidates,
                                      score_candidates)
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
    assert bad.z > 20  # 30 points against noise of +-2 points: overwhelming evidence
    for s in scores:  # every enabled candidate is scored exactly once
        assert s.score is not None and s.gap >= 0 and s.se > 0 and s.z >= 0
    assert len(scores) == sum(len(enabled.ops(i)) + len(enabled.widths(i)) for i in range(space.num_layers))
    drops = choose_drops(enabled, scores, threshold=2.0, max_op_drops=3, max_width_drops=0)
    assert (drops[0].layer, drops[0].kind, drops[0].name) == (2, "op", "k5")
    assert [d.z for d in drops] == sorted((d.z for d in drops), reverse=True)
    assert all(d.kind == "op" and d.z > 2.0 for d in drops)
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
    drops = choose_drops(enabled, list(scores.values()), max_op_drops=0, max_width_drops=1)
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
    assert k7.score is None and k7.gap is None and k7.count == 0 and k7.z is None
    drops = choose_drops(enabled, scores, threshold=0.0, max_op_drops=1000, max_width_drops=1000,
                         min_ops=1, min_widths=1)
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
        drops = choose_drops(enabled, score_candidates(enabled, results), threshold=0.0,
                             max_op_drops=1000, max_width_drops=1000,
                             min_ops=min_ops, min_widths=min_widths)
        apply_drops(enabled, drops)
        for i, layer in enumerate(space.layers):
            assert len(enabled.ops(i)) == min(min_ops, len(layer.ops))
            assert len(enabled.widths(i)) == min(min_widths, len(layer.widths))


def test_ties_and_bad_settings():
    space = load_space("tiny")
    enabled = EnabledSpace(space)
    n = sum(len(enabled.ops(i)) + len(enabled.widths(i)) for i in range(space.num_layers))
    assert n == 58  # 22 ops + 36 widths
    # all paths equally good: every gap and z is 0, nothing is dropped whatever the budget
    results = _results(space, enabled, 50, lambda a, r: 0.5)
    scores = score_candidates(enabled, results)
    assert all(s.z == 0.0 for s in scores if s.z is not None)
    assert choose_drops(enabled, scores, threshold=0.0, max_op_drops=10, max_width_drops=10) == []
    with pytest.raises(ValueError, match="metric"):
        score_candidates(enabled, results, "f1")
    with pytest.raises(ValueError, match="threshold"):
        Shrinker(1, 1, 10, threshold=-1.0)
    with pytest.raises(ValueError, match="max_op_drops"):
        Shrinker(1, 1, 10, max_op_drops=-1)
    with pytest.raises(ValueError, match="only used with mode 'random'"):
        Shrinker(1, 1, 10, random_drops=[[1, 1]])
    with pytest.raises(ValueError, match="per_macs needs score 'accuracy'"):
        Shrinker(1, 1, 10, metric="loss", cost_aware="per_macs")
    with pytest.raises(ValueError, match="cost_aware must be one of"):
        Shrinker(1, 1, 10, cost_aware="cheap")


def test_schedule_and_path_sampling_depend_only_on_seed_and_epoch(space):
    s = Shrinker(start=6, interval=3, samples=10, seed=7)
    assert [e for e in range(1, 16) if s.due(e)] == [6, 9, 12, 15]
    enabled = EnabledSpace(space)
    assert s.sample_paths(enabled, 6) == s.sample_paths(enabled.copy(), 6)
    assert s.sample_paths(enabled, 6) != s.sample_paths(enabled, 9)
    assert s.sample_paths(enabled, 6) != Shrinker(6, 3, 10, seed=8).sample_paths(enabled, 6)
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


def _arch(space, *layers):
    return Arch(space.name, [LayerChoice(op) if op == SKIP else LayerChoice(op, w) for op, w in layers])


def test_z_values_match_a_hand_computation():
    import statistics
    space = load_space(SMALL)  # 3 layers, ops k3, k5, skip, widths 8, 16, 24
    enabled = EnabledSpace(space)
    rest = [("k3", 8), ("k3", 8)]
    k3 = [0.80, 0.82, 0.78, 0.84]
    k5 = [0.70, 0.75, 0.72]
    results = ([PathResult(_arch(space, ("k3", 16), *rest), v, 1 - v) for v in k3]
               + [PathResult(_arch(space, ("k5", 24), *rest), v, 1 - v) for v in k5]
               + [PathResult(_arch(space, (SKIP, None), *rest), 0.95, 0.05)])
    by = {(s.layer, s.kind, s.name): s for s in score_candidates(enabled, results)}

    def mean_se(v):
        return statistics.mean(v), statistics.stdev(v) / len(v) ** 0.5

    (m3, se3), (m5, se5) = mean_se(k3), mean_se(k5)
    s3, s5, skip = by[(0, "op", "k3")], by[(0, "op", "k5")], by[(0, "op", SKIP)]
    assert (s3.count, s5.count, skip.count) == (4, 3, 1)
    assert s3.score == pytest.approx(m3) and s3.se == pytest.approx(se3)
    assert s5.score == pytest.approx(m5) and s5.se == pytest.approx(se5)
    # the layer's best is k3: skip scores higher but on one path, so it has no SE
    assert s3.gap == 0 and s3.z == 0
    assert s5.gap == pytest.approx(m3 - m5)
    assert s5.z == pytest.approx((m3 - m5) / (se3 ** 2 + se5 ** 2) ** 0.5)
    assert skip.se is None and skip.z is None and skip.gap == pytest.approx(m3 - 0.95)
    # widths: 16 is used by the k3 paths, 24 by the k5 paths, 8 by none in layer 0
    w16, w24, w8 = by[(0, "width", 16)], by[(0, "width", 24)], by[(0, "width", 8)]
    assert (w16.z, w24.z) == (0.0, pytest.approx(s5.z)) and w8.count == 0 and w8.z is None
    # layer 1 runs k3 at width 8 in every path: 8 paths, its one op and width
    assert by[(1, "op", "k3")].count == 8 and by[(1, "op", "k5")].count == 0
    # loss: lower is better, the same z
    loss = {(s.layer, s.kind, s.name): s for s in score_candidates(enabled, results, "loss")}
    assert loss[(0, "op", "k5")].z == pytest.approx(s5.z)
    # one-path candidates are never dropped, however bad
    drops = choose_drops(enabled, list(by.values()), threshold=2.0, min_widths=1)
    assert [(d.layer, d.kind, d.name) for d in drops] == [(0, "op", "k5"), (0, "width", 24)]
    results.append(PathResult(_arch(space, ("k5", 8), *rest), 0.0, 1.0))  # w8: one bad path
    by = {(s.layer, s.kind, s.name): s for s in score_candidates(enabled, results)}
    assert by[(0, "width", 8)].z is None
    assert (0, "width", 8) not in {(d.layer, d.kind, d.name) for d in
                                   choose_drops(enabled, list(by.values()), threshold=0.0,
                                                max_width_drops=5, min_widths=1)}


def _cand(layer, kind, name, z, gap=0.1, count=10):
    return CandidateScore(layer, kind, name, 0.5, count, None if z is None else 0.01, gap, z)


def test_threshold_budgets_per_kind_and_floors():
    space = load_space("tiny")
    enabled = EnabledSpace(space)
    scores = [_cand(0, "op", "k5", 1.9), _cand(1, "op", "k5", 2.1), _cand(2, "op", "k7", 9.0),
              _cand(3, "op", "k3", 5.0), _cand(4, "op", "k3", None, gap=0.9, count=1),
              _cand(0, "width", 16, 3.0), _cand(1, "width", 16, 8.0), _cand(2, "width", 32, 2.5),
              _cand(5, "width", 32, 2.0)]
    key = lambda ds: [(d.layer, d.kind, d.name) for d in ds]  # noqa: E731
    # the threshold: z strictly above it, most evident first; no z, no drop
    got = choose_drops(enabled, scores, threshold=2.0, max_op_drops=10, max_width_drops=10)
    assert key(got) == [(2, "op", "k7"), (1, "width", 16), (3, "op", "k3"), (0, "width", 16),
                        (2, "width", 32), (1, "op", "k5")]
    assert key(choose_drops(enabled, scores, threshold=8.5, max_op_drops=10,
                            max_width_drops=10)) == [(2, "op", "k7")]
    # separate budgets: the two most evident ops and the most evident width
    got = choose_drops(enabled, scores, threshold=2.0, max_op_drops=2, max_width_drops=1)
    assert key(got) == [(2, "op", "k7"), (1, "width", 16), (3, "op", "k3")]
    assert key(choose_drops(enabled, scores, max_op_drops=0, max_width_drops=0)) == []
    # floors: k7 is the last op of layer 2 (stride 2: no skip) once k3 and k5 are off
    enabled.disable_op(2, "k3")
    enabled.disable_op(2, "k5")
    got = choose_drops(enabled, scores, threshold=2.0, max_op_drops=10, max_width_drops=10)
    assert (2, "op", "k7") not in key(got) and (3, "op", "k3") in key(got)
    assert (0, "width", 16) in key(got)
    assert (0, "width", 16) not in key(choose_drops(enabled, scores, threshold=2.0,
                                                    max_width_drops=10, min_widths=6))
    got = choose_drops(enabled, scores, threshold=2.0, max_op_drops=10, max_width_drops=10,
                       protected={(1, "width", 16), (3, "op", "k3")})
    assert (1, "width", 16) not in key(got) and (3, "op", "k3") not in key(got)


def test_random_mode_drop_counts_and_legality(space):
    shrinker = Shrinker(start=2, interval=2, samples=30, min_ops=1, min_widths=2, seed=3, epochs=8,
                        mode="random", random_drops=[[2, 3], [0, 1], [100, 100]])
    assert shrinker.decision_epochs() == [2, 4, 6]
    enabled = EnabledSpace(space)
    assert shrinker.sample_paths(enabled, 2) == []  # the control measures nothing
    before = enabled.state_dict()
    record = shrinker.decide(enabled, [], 2)
    assert (record["n_op_drops"], record["n_width_drops"]) == (2, 3) and record["mode"] == "random"
    assert record["budget"] == {"ops": 2, "widths": 3} and record["samples"] == 0
    again = EnabledSpace(space)
    assert shrinker.decide(again, [], 2)["dropped"] == record["dropped"]  # seeded by (seed, epoch)
    assert again.state_dict() == enabled.state_dict() != before
    record = shrinker.decide(enabled, [], 4)
    assert (record["n_op_drops"], record["n_width_drops"]) == (0, 1)
    # asked for more than may go: everything legal goes, floors hold
    legal_ops = sum(len(enabled.ops(i)) - 1 for i in range(space.num_layers))
    legal_widths = sum(len(enabled.widths(i)) - 2 for i in range(space.num_layers))
    record = shrinker.decide(enabled, [], 6)
    assert (record["n_op_drops"], record["n_width_drops"]) == (legal_ops, legal_widths)
    for i in range(space.num_layers):
        assert len(enabled.ops(i)) == 1 and len(enabled.widths(i)) == 2
    # draws are uniform among legal candidates: every op of layer 0 goes first sometimes
    firsts = {choose_random_drops(EnabledSpace(space), 1, 0, random.Random(k))[0].name
              for k in range(200)}
    firsts0 = {d.name for k in range(400)
               for d in choose_random_drops(EnabledSpace(space), 1, 0, random.Random(k)) if d.layer == 0}
    assert len(firsts) > 3 and firsts0 == set(space.layers[0].ops)
    with pytest.raises(ValueError, match="random_drops has 2 entries but the schedule makes 3"):
        Shrinker(2, 2, 30, epochs=8, mode="random", random_drops=[[1, 1], [1, 1]])
    # without random_drops: the budgets, per decision
    plain = Shrinker(2, 2, 30, epochs=8, mode="random", max_op_drops=1, max_width_drops=2)
    r = plain.decide(EnabledSpace(space), [], 2)
    assert (r["n_op_drops"], r["n_width_drops"]) == (1, 2)


def test_no_decision_after_the_last_epoch(space, tmp_path):
    s = Shrinker(start=2, interval=2, samples=5, epochs=6)
    assert [e for e in range(1, 10) if s.due(e)] == [2, 4]
    assert s.decision_epochs() == [2, 4]
    trainer = SimpleNamespace(extra_state={})  # a due decision would need much more
    assert s(trainer, 6) is None and trainer.extra_state["shrink"]["decisions"] == []
    cfg = load_config(None, ["train.epochs=6", "shrink.start=2", "shrink.interval=2"])
    assert Shrinker.from_config(cfg).decision_epochs() == [2, 4]
    cfg = load_config(None, ["train.epochs=5", "shrink.start=5"])
    assert Shrinker.from_config(cfg).decision_epochs() == []


def test_cheapest_arch_and_its_protection():
    import itertools
    space = load_space(SMALL)
    enabled = EnabledSpace(space)
    # brute force over all 7^3 archs
    choices = [[LayerChoice(op, w) for op in layer.kernel_ops for w in layer.widths]
               + ([LayerChoice(SKIP)] if layer.allows_skip else []) for layer in space.layers]
    archs = [Arch(space.name, list(c)) for c in itertools.product(*choices)]
    best = min(archs, key=lambda a: cost.flops(space, a))
    assert cost.flops(space, cheapest_arch(enabled)) == cost.flops(space, best)
    table = candidate_macs(space)
    a, b = archs[5], archs[200]
    assert cost.flops(space, a) - cost.flops(space, b) == sum(
        table[i][(x.op, x.width)] - table[i][(y.op, y.width)]
        for i, (x, y) in enumerate(zip(a.layers, b.layers)))
    protected = protected_candidates(enabled)
    assert protected == {(i, kind, name) for i in range(3)
                         for kind, name in (("op", best[i].op), ("width", 8))}
    enabled.disable_op(1, SKIP)  # the cheapest of layer 1 is now a kernel op at width 8
    assert cheapest_arch(enabled)[1] == LayerChoice("k3", 8)
    assert (1, "op", "k3") in protected_candidates(enabled)


def _cheap_is_bad(arch, rng):
    # the cheapest candidates (skip, k3, the narrowest width) lose accuracy
    bad = sum(c.op in (SKIP, "k3") or c.width == 8 for c in arch.layers)
    return 0.9 - 0.1 * bad + rng.uniform(-0.01, 0.01)


def test_protect_cheapest_keeps_a_feasible_arch(tmp_path):
    space = load_space(SMALL)
    cheapest = cost.flops(space, cheapest_arch(EnabledSpace(space)))
    cap = cheapest + 1
    runs = {}
    for mode in ("none", "protect_cheapest"):
        shrinker = Shrinker(1, 1, 200, threshold=2.0, max_op_drops=10, max_width_drops=10,
                            min_widths=1, cost_aware=mode, macs_cap=cap, epochs=5)
        enabled = EnabledSpace(space)
        for epoch in (1, 2, 3):
            paths = shrinker.sample_paths(enabled, epoch)
            results = [PathResult(a, t, 1 - t) for a, t in
                       zip(paths, (_cheap_is_bad(a, random.Random(str(a) + str(epoch))) for a in paths))]
            record = shrinker.decide(enabled, results, epoch)
        runs[mode] = (enabled, record)
    unprotected, _ = runs["none"]
    protected, record = runs["protect_cheapest"]
    assert cost.flops(space, cheapest_arch(unprotected)) > cap  # the evidence alone prices it out
    assert cost.flops(space, cheapest_arch(protected)) == cheapest <= cap
    assert record["cheapest_macs"] == cheapest and record["macs_cap"] == cap
    assert {(p["layer"], p["kind"], p["name"]) for p in record["protected"]} == \
        protected_candidates(EnabledSpace(space))
    for i in range(3):  # the protection kept exactly what the cheapest arch needs
        assert 8 in protected.widths(i)
    json.dumps(record)  # the record goes into shrink_log.json
    assert ", protected)" in describe(record)  # evident but kept: the log says why


def test_per_macs_scores_accuracy_per_mmac():
    space = load_space(SMALL)
    enabled = EnabledSpace(space)
    rng = random.Random(0)
    results = []
    for _ in range(300):  # every path equally accurate: only the cost tells them apart
        a = enabled.sample(rng)
        results.append(PathResult(a, 0.8 + rng.uniform(-0.001, 0.001), 0.5, cost.flops(space, a)))
    plain = {(s.layer, s.kind, s.name): s for s in score_candidates(enabled, results)}
    per = {(s.layer, s.kind, s.name): s for s in score_candidates(enabled, results, "accuracy_per_mmac")}
    used = [r for r in results if r.arch[0].op == "k5"]
    want = sum(r.top1 / (r.macs / 1e6) for r in used) / len(used)
    assert per[(0, "op", "k5")].score == pytest.approx(want)
    assert max(s.z for s in plain.values() if s.z is not None) < 5  # accuracy: no evidence
    assert per[(0, "width", 24)].z > 5 and per[(0, "width", 8)].gap == 0  # per MMAC: width costs
    shrinker = Shrinker(1, 1, 10, cost_aware="per_macs", min_widths=1)
    record = shrinker.decide(EnabledSpace(space), [PathResult(r.arch, r.top1, r.loss) for r in results], 1)
    assert record["metric"] == "accuracy_per_mmac"
    assert record["paths"][0]["macs"] == cost.flops(space, results[0].arch)  # filled in
    assert all(d["kind"] != "width" or d["name"] != 8 for d in record["dropped"])
    assert record["dropped"] and "z " in describe(record)
    cfg = load_config(None, ["search.max_macs=5e6", "shrink.cost_aware=protect_cheapest"])
    assert Shrinker.from_config(cfg).macs_cap == 5e6
    cfg = load_config(None, ["search.max_macs=5e6", "shrink.macs_cap=1e6"])
    assert Shrinker.from_config(cfg).macs_cap == 1e6


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
    shrinker = Shrinker(start=2, interval=2, samples=60, min_ops=1, min_widths=1)
    assert shrinker(trainer, 1) is None  # not due yet
    record = shrinker(trainer, 2)
    good = [p["top1"] for p in record["paths"] if p["arch"]["layers"][1]["op"] != "k5"]
    bad = [p["top1"] for p in record["paths"] if p["arch"]["layers"][1]["op"] == "k5"]
    assert min(good) > 0.9 and max(bad) < 0.6 and len(set(good)) == 1
    # k5 of layer 1 goes first (largest gap); other candidates only differ by how many
    # k5 paths they happened to share
    first = record["dropped"][0]
    assert (first["layer"], first["kind"], first["name"]) == (1, "op", "k5")
    assert first["gap"] > 0.3 and first["z"] > 2.0 and record["n_op_drops"] >= 1
    assert all(s["z"] > 2.0 for s in record["dropped"])
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
        shrinker = Shrinker(start=1, interval=1, samples=41, seed=5)
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
    shrinker = Shrinker(start=1, interval=1, samples=41, seed=5)

    def evaluate(arch):
        h = random.Random(str(arch)).random()
        return {"top1": 0.5 + 0.3 * (arch[3].op == "k7") + 0.1 * h, "loss": h}

    single = shrinker.decide(enabled, shrinker.measure(shrinker.sample_paths(enabled, 1), evaluate), 1)
    assert json.loads(json.dumps(single)) == r0["record"]
