"""Evolutionary architecture search over the enabled (shrunk) space, SPOS-style.

`Evolution` is the algorithm and knows nothing of networks: it takes the enabled space,
a `fitness(arch) -> float` callable (higher is better) and `Constraints`.

- Generation 0: `population` random architectures of the enabled space.
- Generation g > 0: `mutants` children of random parents among the `top_k` best
  architectures evaluated so far, each layer re-drawn with probability
  `mutation_prob`; `crossovers` children taking each layer from one of two random
  parents; random architectures for the rest of the population.
- Every candidate satisfies the constraints (MACs, parameters, latency-table sum, in
  any combination); an infeasible draw is replaced by another, up to `max_tries`
  draws. A constraint that no architecture of the enabled space can meet is reported
  at once (costs are sums over layers, so the minimum is exact); when `max_tries`
  draws admit nothing before any candidate was found, a ValueError says so.
- A generation holds distinct architectures never evaluated before (as SPOS); when a
  small space runs out of new ones, the population is simply smaller.
- Fitness values are cached by architecture. After every generation the whole state
  (every evaluated candidate and population) is written atomically as JSON; a resumed
  search reproduces an uninterrupted one exactly, because generation g draws from a
  random generator seeded by (seed, g) and the evaluated candidates are restored.

`search_supernet` / `search_checkpoint` run it with the held-out top-1 of a supernet
path after BN recalibration as the fitness (`bsnas.evaluator.PathEvaluator`), and
`write_outputs` writes the results:

    best_arch.json      the best architecture (`bsnas.space.arch` JSON; `bsnas export --arch`)
    search_result.json  its costs and top-1, the settings, counts
    candidates.csv      every evaluated candidate: arch (JSON), macs, params,
                        latency_ms, top1, generation
    pareto.csv          the accuracy-MACs Pareto front
    pareto.png          its plot, drawn by the `plot` the caller passes
                        (`bsnas.pipeline.plots.plot_pareto`)
    search_state.json   the resumable state
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from bsnas.evaluator import PathEvaluator
from bsnas.profiler import cost
from bsnas.space import SKIP, Arch, EnabledSpace, LayerChoice
from bsnas.supernet import Supernet
from bsnas.train.checkpoint import load_checkpoint, remove_temporaries, save_json_atomic
from bsnas.train.runtime import Dist, build_data, pick_device

__all__ = ["Candidate", "Constraints", "Evolution", "EvolutionParams", "SearchResult",
           "pareto_front", "search_checkpoint", "search_supernet", "write_outputs"]

log = logging.getLogger(__name__)

STATE_NAME = "search_state.json"
STATE_FORMAT = "bsnas-search-state/1"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Constraints:
    """Upper bounds on an architecture's cost; None = unconstrained. `max_macs`
    multiply-accumulates per image at the space's resolution (`bsnas.profiler.cost.flops`),
    `max_params` parameters, `max_latency_ms` the sum of `latency_table` (a loaded
    `bsnas.profiler.latency` table, `bsnas.profiler.cost.latency`). A table without a latency bound only
    adds the predicted latency to the outputs."""
    max_macs: float | None = None
    max_params: float | None = None
    max_latency_ms: float | None = None
    latency_table: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        for name in ("max_macs", "max_params", "max_latency_ms"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ValueError(f"search.{name} must be a positive number or null, got {v!r}")
        if self.max_latency_ms is not None and self.latency_table is None:
            raise ValueError("search.max_latency_ms needs search.latency_table (a JSON table from "
                             "`bsnas latency-table`)")
        if self.latency_table is not None:
            cost.load_latency_table(self.latency_table)  # checks its keys

    @classmethod
    def from_config(cls, search) -> "Constraints":
        """From the `search` section of a run config (loads `latency_table`)."""
        table = None
        if search.latency_table:
            if not os.path.isfile(search.latency_table):
                raise ValueError(f"search.latency_table {search.latency_table!r} does not exist")
            table = cost.load_latency_table(search.latency_table)
        return cls(search.max_macs, search.max_params, search.max_latency_ms, table)

    def costs(self, space, arch: Arch) -> dict[str, Any]:
        """`{"macs", "params", "latency_ms"}` of `arch` (latency None without a table)."""
        lat = None if self.latency_table is None else cost.latency(self.latency_table, arch)
        return {"macs": cost.flops(space, arch), "params": cost.params(space, arch), "latency_ms": lat}

    def violations(self, costs: dict[str, Any]) -> list[str]:
        """The bounds that `costs` break, as text (empty when feasible)."""
        out = []
        for key, bound in (("macs", self.max_macs), ("params", self.max_params),
                           ("latency_ms", self.max_latency_ms)):
            if bound is not None and costs[key] > bound:
                out.append(f"{key} {costs[key]:.6g} > {bound:.6g}")
        return out

    def describe(self) -> str:
        parts = [f"{k} <= {v:.6g}" for k, v in (("MACs", self.max_macs), ("params", self.max_params),
                                                 ("latency ms", self.max_latency_ms)) if v is not None]
        return ", ".join(parts) or "none"

    def to_dict(self) -> dict[str, Any]:
        table = None
        if self.latency_table is not None:
            text = json.dumps(self.latency_table, sort_keys=True)
            table = hashlib.sha256(text.encode()).hexdigest()[:16]
        return {"max_macs": self.max_macs, "max_params": self.max_params,
                "max_latency_ms": self.max_latency_ms, "latency_table_sha256": table}


@dataclass(frozen=True)
class EvolutionParams:
    """SPOS defaults (see `bsnas.config.DEFAULTS["search"]`)."""
    population: int = 50
    generations: int = 20
    top_k: int = 10
    mutants: int = 25
    mutation_prob: float = 0.1
    crossovers: int = 25
    max_tries: int = 10000

    def __post_init__(self):
        for name in ("population", "generations", "top_k", "max_tries"):
            if getattr(self, name) < 1:
                raise ValueError(f"search.{name} must be >= 1, got {getattr(self, name)}")
        if self.mutants < 0 or self.crossovers < 0:
            raise ValueError(f"search.mutants and search.crossovers must be >= 0, "
                             f"got {self.mutants} and {self.crossovers}")
        if self.mutants + self.crossovers > self.population:
            raise ValueError(f"search.mutants + search.crossovers ({self.mutants} + {self.crossovers}) "
                             f"must not exceed search.population ({self.population})")
        if self.top_k > self.population:
            raise ValueError(f"search.top_k ({self.top_k}) must not exceed search.population "
                             f"({self.population})")
        if not 0 <= self.mutation_prob <= 1:
            raise ValueError(f"search.mutation_prob must be in [0, 1], got {self.mutation_prob}")

    @classmethod
    def from_config(cls, search) -> "EvolutionParams":
        return cls(search.population, search.generations, search.top_k, search.mutants,
                   search.mutation_prob, search.crossovers, search.max_tries)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Candidate:
    """An evaluated architecture: its fitness `top1`, its costs, and the generation
    that first evaluated it."""
    arch: Arch
    top1: float
    macs: int
    params: int
    latency_ms: float | None
    generation: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["arch"] = self.arch.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidate":
        return cls(Arch.from_dict(d["arch"]), d["top1"], d["macs"], d["params"], d["latency_ms"],
                   d["generation"])

    def row(self) -> dict[str, Any]:
        """A CSV row (the arch as compact JSON)."""
        return {"arch": self.arch.to_json(), "macs": self.macs, "params": self.params,
                "latency_ms": "" if self.latency_ms is None else self.latency_ms,
                "top1": self.top1, "generation": self.generation}


def _rank_key(c: Candidate):
    # best first: higher fitness, then fewer MACs, then a fixed order
    return (-c.top1, c.macs, str(c.arch))


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other candidate beats on both top-1 (higher) and MACs (lower,
    or equal with a higher top-1), by increasing MACs."""
    front, best = [], -math.inf
    for c in sorted(candidates, key=lambda c: (c.macs, -c.top1, str(c.arch))):
        if c.top1 > best:
            front.append(c)
            best = c.top1
    return front


@dataclass
class SearchResult:
    """`candidates` in evaluation order; `populations[g]` the architectures of
    generation g; `best` the fittest candidate (ties: fewer MACs)."""
    candidates: list[Candidate]
    populations: list[list[Arch]]
    params: EvolutionParams
    constraints: Constraints
    seconds: float = 0.0

    @property
    def best(self) -> Candidate:
        return min(self.candidates, key=_rank_key)

    @property
    def pareto(self) -> list[Candidate]:
        return pareto_front(self.candidates)


# --------------------------------------------------------------------------- evolution


class Evolution:
    """The search (see the module doc). `fitness(arch)` is called once per distinct
    feasible architecture and must return a finite float; `state_path` (optional) is
    where the state is saved after every generation; `tag` is any JSON-serialisable
    description of the fitness (e.g. the checkpoint) that a resumed search must match."""

    def __init__(self, enabled: EnabledSpace, fitness: Callable[[Arch], float],
                 params: EvolutionParams = EvolutionParams(), constraints: Constraints = Constraints(),
                 seed: int = 0, state_path: str | None = None, tag: Any = None):
        self.enabled, self.space = enabled, enabled.space
        self.fitness, self.params, self.constraints = fitness, params, constraints
        self.seed, self.state_path, self.tag = seed, state_path, tag
        self.cache: dict[Arch, Candidate] = {}
        self.populations: list[list[Arch]] = []
        self._costs: dict[Arch, dict] = {}
        self._check_attainable()

    # ------------------------------------------------------------------ costs
    def _cost(self, arch: Arch) -> dict:
        c = self._costs.get(arch)
        if c is None:
            c = self._costs[arch] = self.constraints.costs(self.space, arch)
        return c

    def feasible(self, arch: Arch) -> bool:
        return not self.constraints.violations(self._cost(arch))

    def _layer_choices(self, i: int) -> list[LayerChoice]:
        e = self.enabled
        out = [LayerChoice(op, w) for op in e.kernel_ops(i) for w in e.widths(i)]
        return out + ([LayerChoice(SKIP)] if SKIP in e.ops(i) else [])

    def _check_attainable(self) -> None:
        """Each cost is a sum over layers, so the cheapest architecture of the enabled
        space takes each layer's cheapest choice: a bound below that is unattainable."""
        c = self.constraints
        bounds = [("macs", c.max_macs, "search.max_macs"), ("params", c.max_params, "search.max_params"),
                  ("latency_ms", c.max_latency_ms, "search.max_latency_ms")]
        base = self.enabled.sample(random.Random(0))
        for key, bound, name in bounds:
            if bound is None:
                continue
            layers = list(base.layers)
            for i in range(len(layers)):
                layers[i] = min(self._layer_choices(i),
                                key=lambda ch: self.constraints.costs(
                                    self.space, Arch(self.space.name, layers[:i] + [ch] + layers[i + 1:]))[key])
            lowest = self.constraints.costs(self.space, Arch(self.space.name, layers))[key]
            if lowest > bound:
                raise ValueError(f"{name}={bound:.6g} admits no architecture of the enabled space: "
                                 f"the cheapest has {key} {lowest:.6g}")

    # ------------------------------------------------------------------ operators
    def _random_arch(self, rng: random.Random) -> Arch:
        return self.enabled.sample(rng)

    def _random_choice(self, rng: random.Random, i: int) -> LayerChoice:
        ops, widths = self.enabled.ops(i), self.enabled.widths(i)
        op = ops[rng.randrange(len(ops))]
        return LayerChoice(SKIP) if op == SKIP else LayerChoice(op, widths[rng.randrange(len(widths))])

    def _mutate(self, rng: random.Random, parent: Arch) -> Arch:
        p = self.params.mutation_prob
        return Arch(self.space.name, [self._random_choice(rng, i) if rng.random() < p else c
                                      for i, c in enumerate(parent.layers)])

    def _crossover(self, rng: random.Random, a: Arch, b: Arch) -> Arch:
        return Arch(self.space.name, [x if rng.random() < 0.5 else y for x, y in zip(a.layers, b.layers)])

    def _draw(self, make: Callable[[], Arch], taken: set) -> tuple[Arch | None, int]:
        """Up to `max_tries` calls of `make` for a feasible architecture that is neither
        in `taken` nor evaluated before; (arch or None, infeasible draws)."""
        infeasible = 0
        for _ in range(self.params.max_tries):
            arch = make()
            if arch in taken or arch in self.cache:
                continue
            if not self.feasible(arch):
                infeasible += 1
                continue
            return arch, infeasible
        return None, infeasible

    def _next_population(self, g: int) -> list[Arch]:
        rng = random.Random(f"{self.seed}:evolution:{g}")
        p = self.params
        pop: list[Arch] = []
        taken: set = set()
        parents = [c.arch for c in self.top_k()] if g > 0 else []
        parts = []
        if parents and p.mutation_prob > 0:
            parts.append(("mutants", p.mutants, lambda: self._mutate(rng, rng.choice(parents))))
        if len(parents) > 1:
            parts.append(("crossovers", p.crossovers,
                          lambda: self._crossover(rng, *rng.sample(parents, 2))))
        parts.append(("random", None, lambda: self._random_arch(rng)))
        for what, count, make in parts:
            goal = p.population if count is None else len(pop) + count
            while len(pop) < goal:
                arch, infeasible = self._draw(make, taken)
                if arch is None:
                    if not pop and not self.cache and infeasible == p.max_tries:
                        raise ValueError(
                            f"search.max_tries={p.max_tries} random draws from the enabled space "
                            f"found no architecture meeting the constraints ({self.constraints.describe()})")
                    log.info("generation %d: no new feasible %s after %d draws; %d of %d filled",
                             g, what, p.max_tries, len(pop), goal)
                    break
                pop.append(arch)
                taken.add(arch)
        return pop

    def top_k(self) -> list[Candidate]:
        """The `top_k` best candidates evaluated so far, best first."""
        return sorted(self.cache.values(), key=_rank_key)[:self.params.top_k]

    def _evaluate(self, arch: Arch, g: int) -> Candidate:
        c = self.cache.get(arch)
        if c is None:
            costs = self._cost(arch)
            if self.constraints.violations(costs):  # cannot happen: draws are checked
                raise RuntimeError(f"infeasible candidate reached evaluation: {arch}")
            value = float(self.fitness(arch))
            if not math.isfinite(value):
                raise ValueError(f"fitness of {arch} is {value}, not a finite number")
            c = self.cache[arch] = Candidate(arch, value, costs["macs"], costs["params"],
                                             costs["latency_ms"], g)
        return c

    # ------------------------------------------------------------------ state
    def fingerprint(self) -> dict[str, Any]:
        """What a resumed search must share with the saved one (everything that shapes
        the search except the number of generations, which may grow)."""
        params = asdict(self.params)
        params.pop("generations")
        return {"enabled": self.enabled.state_dict(), "seed": self.seed, "params": params,
                "constraints": self.constraints.to_dict(), "tag": self.tag}

    def state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "fingerprint": self.fingerprint(),
                "generation": len(self.populations),
                "candidates": [c.to_dict() for c in self.cache.values()],
                "populations": [[a.to_dict() for a in pop] for pop in self.populations]}

    def save(self) -> None:
        if self.state_path:
            save_json_atomic(self.state(), self.state_path)

    def load(self, path: str) -> None:
        """Restore the state saved at `path`; ValueError when it belongs to another search."""
        try:
            with open(path) as f:
                state = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a search state ({e})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: not a {STATE_FORMAT} file")
        mine = json.loads(json.dumps(self.fingerprint()))
        if state["fingerprint"] != mine:
            diff = sorted(k for k in mine if state["fingerprint"].get(k) != mine[k])
            raise ValueError(f"{path}: the saved search differs in {diff} from this one; "
                             f"start a fresh search (without --resume) or restore its settings")
        self.cache = {}
        for d in state["candidates"]:
            c = Candidate.from_dict(d)
            self.cache[c.arch] = c
        self.populations = [[Arch.from_dict(a) for a in pop] for pop in state["populations"]]

    # ------------------------------------------------------------------ run
    def run(self, resume: bool = False, progress: Callable[[str], None] | None = None) -> SearchResult:
        """Run (or, with `resume` and a saved state, continue) up to `generations`."""
        tic = time.perf_counter()
        if resume and self.state_path and os.path.exists(self.state_path):
            self.load(self.state_path)
            log.info("search resumed from %s at generation %d (%d candidates)", self.state_path,
                     len(self.populations), len(self.cache))
        for g in range(len(self.populations), self.params.generations):
            pop = self._next_population(g)
            if not pop:
                log.info("generation %d: the enabled space has no new feasible architecture; stopping", g)
                break
            for arch in pop:
                self._evaluate(arch, g)
            self.populations.append(pop)
            self.save()
            best = self.top_k()[0]
            line = (f"generation {g + 1}/{self.params.generations}: {len(pop)} candidates, "
                    f"{len(self.cache)} evaluated; best top-1 {best.top1:.4f} at {best.macs / 1e6:.2f}M MACs")
            log.info(line)
            if progress is not None:
                progress(line)
        if not self.cache:
            raise ValueError("the search evaluated no architecture")
        return SearchResult(list(self.cache.values()), [list(p) for p in self.populations], self.params,
                            self.constraints, time.perf_counter() - tic)


# --------------------------------------------------------------------------- outputs


def _write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["arch", "macs", "params", "latency_ms", "top1", "generation"])
        w.writeheader()
        w.writerows(rows)


#: Draws a search result's PNG: `plot(result, path)` -> the path written, or None.
PlotFn = Callable[[SearchResult, str], "str | None"]


def write_outputs(result: SearchResult, out_dir: str, plot: PlotFn | None = None) -> dict[str, str]:
    """Write best_arch.json, search_result.json, candidates.csv, pareto.csv and, with
    `plot` (e.g. `bsnas.pipeline.plots.plot_pareto`), pareto.png into `out_dir`; returns
    their paths by name."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in
             ("best_arch.json", "search_result.json", "candidates.csv", "pareto.csv", "pareto.png")}
    best = result.best
    best.arch.save(paths["best_arch.json"])
    summary = {"best": best.to_dict(), "evaluated": len(result.candidates),
               "generations": len(result.populations), "seconds": round(result.seconds, 3),
               "params": asdict(result.params), "constraints": result.constraints.to_dict(),
               "pareto": [c.to_dict() for c in result.pareto]}
    save_json_atomic(summary, paths["search_result.json"])
    _write_csv(paths["candidates.csv"], [c.row() for c in result.candidates])
    _write_csv(paths["pareto.csv"], [c.row() for c in result.pareto])
    if plot is None or plot(result, paths["pareto.png"]) is None:
        del paths["pareto.png"]
    return paths


# --------------------------------------------------------------------------- on a supernet


def search_supernet(cfg, supernet, enabled: EnabledSpace, data, out_dir: str, resume: bool = False,
                    tag: Any = None, progress: Callable[[str], None] | None = None,
                    plot: PlotFn | None = None) -> SearchResult:
    """Search `enabled` with the held-out top-1 of `supernet` paths after BN
    recalibration on `data.calib` as the fitness (`data` as `bsnas.train.runtime.build_data`
    makes it), with the settings of `cfg.search` and seed `cfg.seed`; writes the
    outputs into `out_dir` (`write_outputs`, with `plot`) and returns the result."""
    params = EvolutionParams.from_config(cfg.search)
    constraints = Constraints.from_config(cfg.search)
    evaluator = PathEvaluator(supernet, data.calib, data.holdout)
    os.makedirs(out_dir, exist_ok=True)
    remove_temporaries(out_dir)  # of a state write that a kill cut short
    evo = Evolution(enabled, lambda arch: evaluator(arch)["top1"], params, constraints, cfg.seed,
                    os.path.join(out_dir, STATE_NAME), tag)
    log.info("search over %s: population %d, %d generations, constraints: %s", enabled,
             params.population, params.generations, constraints.describe())
    result = evo.run(resume, progress)
    write_outputs(result, out_dir, plot)
    b = result.best
    log.info("search done in %.1fs: %d candidates; best %s: held-out top-1 %.4f, %.2fM MACs, %d params",
             result.seconds, len(result.candidates), b.arch, b.top1, b.macs / 1e6, b.params)
    return result


#: Config keys that decide which training images are held out: a search must use the
#: training run's values, or its fitness would be measured on images it trained on.
SPLIT_KEYS = ("seed", "data.dataset", "data.holdout", "data.train_limit")


def check_same_split(cfg, trained: dict | None) -> None:
    """ValueError when `cfg` holds out other training images than the training run
    whose config (a plain dict, as stored in checkpoints) is `trained`."""
    if not trained:
        return
    differ = []
    for key in SPLIT_KEYS:
        a, b = cfg, trained
        for part in key.split("."):
            a, b = a[part], b.get(part) if isinstance(b, dict) else None
        if a != b:
            differ.append(f"{key}: {a!r} here, {b!r} in training")
    if differ:
        raise ValueError("this config holds out different training images than the training run did ("
                         + "; ".join(differ) + "); use the training run's values")


def search_checkpoint(cfg, checkpoint: str, out_dir: str | None = None, resume: bool = False,
                      progress: Callable[[str], None] | None = None,
                      plot: PlotFn | None = None) -> SearchResult:
    """`bsnas search`: load the supernet and the enabled space from a training
    checkpoint, build the data of `cfg` (same held-out split as training, checked) and
    run `search_supernet` (with `plot`); outputs go to `out_dir` (default
    `<cfg.out_dir>/search`)."""
    device = pick_device(cfg.device, Dist(), cfg.keep_freed_memory)
    ckpt = load_checkpoint(checkpoint, map_location=device)
    check_same_split(cfg, ckpt.get("config"))
    supernet, enabled = Supernet.from_checkpoint(ckpt, map_location=device)
    data = build_data(cfg, supernet.space, device, Dist())
    tag = {"checkpoint_step": ckpt.get("step"), "checkpoint_epoch": ckpt.get("epoch"),
           "space": supernet.space.name}
    return search_supernet(cfg, supernet, enabled, data, out_dir or os.path.join(cfg.out_dir, "search"),
                           resume, tag, progress, plot)
