"""Evolutionary search with synthetic fitness functions: it finds the optimum of a small
space, never evaluates an infeasible architecture, reports constraints that admit
nothing, resumes to exactly the uninterrupted result, and writes its outputs."""
import csv
import json
import os

import pytest

from bsnas import cost
from bsnas.pipeline.plots import plot_pareto
from bsnas.space import SKIP, Arch, EnabledSpace, LayerChoice, load_space
from bsnas.strategy.evolution import (Candidate, Constraints, Evolution, EvolutionParams, check_same_split,
                                      pareto_front, write_outputs)


@pytest.fixture(scope="module")
def space():
    return load_space("tiny")


def _small(space):
    """Per layer: ops k3 and k7 (and skip where allowed), 3 widths: 7 or 6 choices per
    layer, about 10^5 architectures."""
    e = EnabledSpace(space)
    for i, layer in enumerate(space.layers):
        e.disable_op(i, "k5")
        for w in layer.widths[3:]:
            e.disable_width(i, w)
    return e


def _target(space, enabled):
    """A fixed optimum inside the small space."""
    layers = []
    for i in range(space.num_layers):
        if i % 3 == 1 and SKIP in enabled.ops(i):
            layers.append(LayerChoice(SKIP))
        else:
            layers.append(LayerChoice("k7" if i % 2 else "k3", enabled.widths(i)[i % 3]))
    return Arch(space.name, layers)


def _match_fitness(target):
    """Layers equal to the target's count 1; a matching op with another width 0.5."""
    def fitness(arch):
        return sum(1.0 if a == t else 0.5 * (a.op == t.op) for a, t in zip(arch.layers, target.layers))
    return fitness


PARAMS = EvolutionParams(population=20, generations=12, top_k=5, mutants=8, mutation_prob=0.2,
                         crossovers=8, max_tries=2000)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_the_optimum_of_a_small_space(space, seed):
    enabled = _small(space)
    target = _target(space, enabled)
    assert enabled.contains(target) and enabled.size() > 50_000
    evaluated = []
    fitness = _match_fitness(target)

    def counting(arch):
        evaluated.append(arch)
        return fitness(arch)

    result = Evolution(enabled, counting, PARAMS, seed=seed).run()
    assert result.best.arch == target and result.best.top1 == space.num_layers
    # each architecture evaluated once, all from the enabled space, far fewer than the space
    assert len(evaluated) == len(set(evaluated)) == len(result.candidates) <= 20 * 12
    assert all(enabled.contains(a) for a in evaluated)
    # generations hold distinct, never re-evaluated architectures
    seen = set()
    for pop in result.populations:
        assert len(pop) == len(set(pop)) and not seen & set(pop)
        seen |= set(pop)


def test_random_search_alone_does_worse(space):
    """Mutation and crossover matter: with neither, the same budget misses the optimum."""
    enabled = _small(space)
    target = _target(space, enabled)
    params = EvolutionParams(population=20, generations=12, top_k=5, mutants=0, crossovers=0)
    result = Evolution(enabled, _match_fitness(target), params, seed=0).run()
    assert result.best.top1 < space.num_layers


def test_never_evaluates_an_infeasible_architecture(space):
    enabled = EnabledSpace(space)
    import random
    rng = random.Random(0)
    macs = sorted(cost.flops(space, space.sample(rng)) for _ in range(200))
    params_ = sorted(cost.params(space, space.sample(rng)) for _ in range(200))
    bound = Constraints(max_macs=macs[60], max_params=params_[100])

    def fitness(arch):  # rewards size, so the search pushes against the bounds
        assert cost.flops(space, arch) <= bound.max_macs, "infeasible arch evaluated (MACs)"
        assert cost.params(space, arch) <= bound.max_params, "infeasible arch evaluated (params)"
        return cost.flops(space, arch) / 1e6

    result = Evolution(enabled, fitness, PARAMS, bound, seed=3).run()
    assert all(c.macs <= bound.max_macs and c.params <= bound.max_params for c in result.candidates)
    assert result.best.macs <= bound.max_macs
    assert result.best.macs > macs[30]  # it went for the large feasible ones


def _latency_table(space):
    return {"space": space.name, "fixed_ms": {"stem": 0.1, "head": 0.1},
            "layers": [dict({op: {str(w): w * int(op[1:]) / 1000 for w in layer.widths}
                             for op in layer.kernel_ops}, **({SKIP: 0.0} if layer.allows_skip else {}))
                       for layer in space.layers]}


def test_latency_constraint(space):
    table = _latency_table(space)
    c = Constraints(max_latency_ms=1.0, latency_table=table)
    result = Evolution(EnabledSpace(space), lambda a: cost.latency(table, a), PARAMS, c, seed=0).run()
    assert all(x.latency_ms <= 1.0 for x in result.candidates)
    assert result.best.latency_ms == pytest.approx(cost.latency(table, result.best.arch))
    with pytest.raises(ValueError, match="latency_table"):
        Constraints(max_latency_ms=1.0)


def test_constraint_that_admits_nothing_is_a_clear_error(space):
    enabled = EnabledSpace(space)
    with pytest.raises(ValueError, match=r"search.max_macs=1000 admits no architecture.*cheapest has macs"):
        Evolution(enabled, lambda a: 0.0, PARAMS, Constraints(max_macs=1000))
    with pytest.raises(ValueError, match=r"search.max_latency_ms=0.1 admits no"):
        Evolution(enabled, lambda a: 0.0, PARAMS,
                  Constraints(max_latency_ms=0.1, latency_table=_latency_table(space)))
    # Each bound alone is attainable (the cheapest arch meets it) but random draws
    # practically never hit that arch: max_tries draws admit nothing.
    cheapest = Arch(space.name, [min(layer.choices(), key=lambda ch: cost.flops(
        space, Arch(space.name, [ch if j == layer.index else space.largest()[j]
                                 for j in range(space.num_layers)]))) for layer in space.layers])
    tight = Constraints(max_macs=cost.flops(space, cheapest))
    params = EvolutionParams(population=4, generations=1, top_k=2, mutants=1, crossovers=1, max_tries=20)
    with pytest.raises(ValueError, match=r"search.max_tries=20 random draws .* found no architecture "
                                         r"meeting the constraints \(MACs <="):
        Evolution(enabled, lambda a: 0.0, params, tight, seed=0).run()
    with pytest.raises(ValueError, match="must not exceed search.population"):
        EvolutionParams(population=10, top_k=5, mutants=6, crossovers=6)


def test_exhausted_space_ends_early(space):
    enabled = EnabledSpace(space)
    for i, layer in enumerate(space.layers):  # k3 only; two widths in layer 0, one elsewhere
        for op in layer.ops[1:]:
            enabled.disable_op(i, op)
        for w in layer.widths[1:-1] if i == 0 else layer.widths[1:]:
            enabled.disable_width(i, w)
    assert enabled.size() == 2
    result = Evolution(enabled, lambda a: a[0].width, EvolutionParams(
        population=4, generations=5, top_k=2, mutants=1, crossovers=1, max_tries=50), seed=0).run()
    assert len(result.candidates) == 2 and result.best.arch[0].width == space.layers[0].widths[-1]


class Crash(Exception):
    pass


def _runner(space, enabled, state, fitness, generations=PARAMS.generations):
    params = EvolutionParams(**{**PARAMS.__dict__, "generations": generations})
    return Evolution(enabled, fitness, params, seed=4, state_path=str(state), tag={"ckpt": 7})


def test_resume_matches_uninterrupted_search(space, tmp_path):
    enabled = _small(space)
    fitness = _match_fitness(_target(space, enabled))
    whole = _runner(space, enabled, tmp_path / "whole.json", fitness).run()

    calls = []

    def crashing(arch):
        calls.append(arch)
        if len(calls) == 75:  # mid-generation
            raise Crash
        return fitness(arch)

    with pytest.raises(Crash):
        _runner(space, enabled, tmp_path / "cut.json", crashing).run()
    saved = json.load(open(tmp_path / "cut.json"))
    assert 0 < saved["generation"] < PARAMS.generations
    resumed = _runner(space, enabled, tmp_path / "cut.json", fitness).run(resume=True)
    assert resumed.candidates == whole.candidates
    assert resumed.populations == whole.populations
    assert resumed.best == whole.best

    # a finished search continues with more generations as if it had run them at once
    short = _runner(space, enabled, tmp_path / "grow.json", fitness, generations=4).run()
    longer = _runner(space, enabled, tmp_path / "grow.json", fitness).run(resume=True)
    assert len(short.populations) == 4 and longer.candidates == whole.candidates

    # a state from another search is refused
    other = Evolution(enabled, fitness, PARAMS, seed=5, state_path=str(tmp_path / "whole.json"), tag={"ckpt": 7})
    with pytest.raises(ValueError, match=r"differs in \['seed'\]"):
        other.run(resume=True)


def test_pareto_front_and_outputs(space, tmp_path):
    rng_archs = [space.sample(i) for i in range(5)]
    cands = [Candidate(a, top1, macs, 100, None, 0) for a, (top1, macs) in
             zip(rng_archs, [(0.5, 10), (0.6, 20), (0.55, 30), (0.7, 40), (0.7, 50)])]
    assert [c.macs for c in pareto_front(cands)] == [10, 20, 40]

    enabled = _small(space)
    result = Evolution(enabled, _match_fitness(_target(space, enabled)), EvolutionParams(
        population=8, generations=3, top_k=3, mutants=3, crossovers=3), seed=0).run()
    paths = write_outputs(result, str(tmp_path), plot=plot_pareto)
    for name in ("best_arch.json", "search_result.json", "candidates.csv", "pareto.csv", "pareto.png"):
        assert os.path.getsize(paths[name]) > 0
    assert Arch.load(paths["best_arch.json"]) == result.best.arch
    rows = list(csv.DictReader(open(paths["candidates.csv"])))
    assert list(rows[0]) == ["arch", "macs", "params", "latency_ms", "top1", "generation"]
    assert len(rows) == len(result.candidates)
    assert {Arch.from_json(r["arch"]) for r in rows} == {c.arch for c in result.candidates}
    for r in rows:
        a = Arch.from_json(r["arch"])
        assert int(r["macs"]) == cost.flops(space, a) and int(r["params"]) == cost.params(space, a)
    front = list(csv.DictReader(open(paths["pareto.csv"])))
    assert [int(r["macs"]) for r in front] == sorted(int(r["macs"]) for r in front)
    summary = json.load(open(paths["search_result.json"]))
    assert summary["evaluated"] == len(result.candidates) and summary["best"]["top1"] == result.best.top1


def test_search_config_must_hold_out_the_training_images():
    from bsnas.config import load_config
    cfg = load_config(None, ["seed=1"])
    trained = load_config(None, ["seed=1"]).to_dict()
    check_same_split(cfg, trained)
    check_same_split(cfg, None)  # old checkpoints without a config: nothing to compare
    trained["data"]["holdout"] = 100
    with pytest.raises(ValueError, match=r"data.holdout: 300 here, 100 in training"):
        check_same_split(cfg, trained)
