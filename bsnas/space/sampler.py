"""Single-path sampling over the enabled space, deterministic in (seed, step) so that
every DDP rank draws the same path without communicating, and a resumed run draws the
same paths as an uninterrupted one."""
from __future__ import annotations

import random

from bsnas.space.arch import SKIP, Arch, LayerChoice
from bsnas.space.enabled import EnabledSpace


class PathSampler:
    """Draws paths: per layer an op uniformly among the enabled ops and, for a kernel op,
    a width uniformly among the widths allowed now (`allowed(layer)`, e.g. the
    broadening schedule's range intersected with the enabled widths)."""

    def __init__(self, enabled: EnabledSpace, seed: int):
        self.enabled, self.seed = enabled, seed

    def _rng(self, step: int, k: int = 0) -> random.Random:
        return random.Random(f"{self.seed}:{step}:{k}")

    def uniform(self, step: int, allowed) -> Arch:
        """One path for `step`; `allowed(layer) -> tuple of widths`."""
        rng = self._rng(step)
        layers = []
        for i in range(self.enabled.num_layers):
            ops = self.enabled.ops(i)
            op = ops[rng.randrange(len(ops))]
            if op == SKIP:
                layers.append(LayerChoice(SKIP))
            else:
                widths = allowed(i)
                layers.append(LayerChoice(op, widths[rng.randrange(len(widths))]))
        return Arch(self.enabled.space.name, layers)

    def fair(self, step: int, allowed) -> list[Arch]:
        """Strict fairness (FairNAS): m paths, m = the most enabled ops of any layer;
        in every layer each enabled op appears in exactly one of them (a random
        permutation per layer). Layers with fewer ops fill the remaining paths with ops
        drawn uniformly, so those ops are trained once or twice in the step."""
        rng = self._rng(step, 1)
        m = max(len(self.enabled.ops(i)) for i in range(self.enabled.num_layers))
        columns = []
        for i in range(self.enabled.num_layers):
            ops = list(self.enabled.ops(i))
            rng.shuffle(ops)
            ops += [ops[rng.randrange(len(ops))] for _ in range(m - len(ops))]
            widths = allowed(i)
            columns.append([LayerChoice(SKIP) if op == SKIP else
                            LayerChoice(op, widths[rng.randrange(len(widths))]) for op in ops])
        return [Arch(self.enabled.space.name, [col[j] for col in columns]) for j in range(m)]
