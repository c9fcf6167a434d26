"""The broadening schedule of BS-NAS: warm up every spring block at its largest width,
then let the allowed width range grow linearly from [max] down to [min, max]."""
from __future__ import annotations

import math

from bsnas.space import EnabledSpace


class BroadeningSchedule:
    """For each layer with width grid w_1 < ... < w_n: during the first `warmup_epochs`
    only w_n is allowed; over the next `broaden_epochs` the number of allowed widths,
    counted from the top, grows linearly from 1 to n; afterwards all are allowed. The
    allowed set is always intersected with the enabled widths (shrinking may have
    removed some), falling back to the largest enabled width.

    `stage(layer, epoch)` is the number of allowed grid widths; a change of stage is a
    step of the schedule, at which the trainer re-orders the layer's channels.
    """

    def __init__(self, enabled: EnabledSpace, warmup_epochs: float, broaden_epochs: float):
        self.enabled = enabled
        self.warmup, self.broaden = float(warmup_epochs), float(broaden_epochs)
        self.grids = [tuple(layer.widths) for layer in enabled.space.layers]

    def progress(self, epoch: float) -> float:
        """0 during warm-up, then linear to 1 at the end of broadening."""
        if epoch < self.warmup:
            return 0.0
        if self.broaden <= 0:
            return 1.0
        return min(1.0, (epoch - self.warmup) / self.broaden)

    def stage(self, layer: int, epoch: float) -> int:
        n = len(self.grids[layer])
        return 1 + math.floor(self.progress(epoch) * (n - 1) + 1e-9)

    def allowed(self, layer: int, epoch: float) -> tuple[int, ...]:
        grid = self.grids[layer]
        top = set(grid[len(grid) - self.stage(layer, epoch):])
        enabled = self.enabled.widths(layer)
        widths = tuple(w for w in enabled if w in top)
        return widths or (max(enabled),)

    def stages(self, epoch: float) -> tuple[int, ...]:
        return tuple(self.stage(i, epoch) for i in range(len(self.grids)))
