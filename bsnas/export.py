"""Export of a subnet: the static twin of a supernet path, as plain PyTorch.

`export(supernet, arch)` builds the static twin of `arch` (`bsnas.nn.static.static_twin`:
each active spring block becomes its `to_static()` block of nn.Conv2d/nn.BatchNorm2d at
the chosen width, skip layers vanish, the fixed stem/first block/head are copied) and
traces it with `torch.fx.symbolic_trace`. The result is a `torch.fx.GraphModule` whose submodules are
torch.nn built-ins only, so `torch.save(model)` can be loaded with
`torch.load(path, weights_only=False)` in a process where bsnas is not importable. It
also goes through `torch.export.export` and `torch.onnx.export`.

Weights and BN statistics are copies (inherited from the supernet, ready to retrain);
in eval mode the model computes the supernet's active path (`supernet.activate(arch)`)
within float rounding.
"""
from __future__ import annotations

import torch

from bsnas.nn.static import static_twin
from bsnas.space import Arch
from bsnas.supernet import Supernet

__all__ = ["export"]


def export(supernet: Supernet, arch: Arch | None = None) -> torch.fx.GraphModule:
    """Export `arch` (default: the supernet's active arch) as a plain-PyTorch
    `torch.fx.GraphModule` with the inherited weights and BN statistics, in eval mode
    (call `.train()` to retrain it). Input `[N, in_channels, H, W]`, output
    `[N, classes]`. The arch's JSON is kept in the string attribute `model.bsnas_arch`
    (saved by `torch.save`)."""
    arch = supernet.active if arch is None else arch
    twin = static_twin(supernet, arch)
    model = torch.fx.symbolic_trace(twin)
    model.bsnas_arch = arch.to_json()
    return model.eval()
