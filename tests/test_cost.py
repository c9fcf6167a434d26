"""Cost model: MACs and parameters against FlopCounterMode and the exported model,
the MobileNetV2 numbers, speed, and the latency-table sum."""
import json
import random
import time

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import bsnas
from bsnas import Arch, LayerChoice, cost, load_space

MOBILENETV2_PARAMS = 3_504_872
MOBILENETV2_MACS = 300_774_272  # 300.8M at 224x224


def counted_macs(model, resolution, in_channels=3):
    """MACs of one forward pass as FlopCounterMode counts them (FLOPs / 2)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_channels, resolution, resolution))
    total = counter.get_total_flops()
    assert total % 2 == 0
    return total // 2


def num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def supernets():
    torch.manual_seed(0)
    return {name: bsnas.Supernet(name).eval() for name in ("tiny", "mobilenetv2", "proxyless")}


@pytest.mark.parametrize("name,resolution,samples", [
    ("tiny", 32, 6), ("tiny", 37, 2), ("tiny", 8, 1),
    ("mobilenetv2", 64, 2), ("proxyless", 48, 2), ("proxyless", 33, 1),
])
def test_cost_matches_flop_counter_and_export(supernets, name, resolution, samples):
    net = supernets[name]
    space = net.space
    rng = random.Random(resolution)
    archs = [space.sample(rng) for _ in range(samples)]
    archs.append(space.largest())
    if any(l.allows_skip for l in space.layers):
        archs.append(Arch(space.name, [LayerChoice("skip") if l.allows_skip else LayerChoice("k3", l.widths[0])
                                       for l in space.layers]))
    for arch in archs:
        model = bsnas.export(net, arch)
        assert cost.flops(space, arch, resolution) == counted_macs(model, resolution), arch
        assert cost.params(space, arch) == num_params(model), arch


def test_resolution_matters():
    space = load_space("proxyless")
    arch = space.sample(0)
    assert cost.flops(space, arch) == cost.flops(space, arch, 224)
    assert cost.flops(space, arch, 112) < cost.flops(space, arch) < cost.flops(space, arch, 256)
    with pytest.raises(ValueError, match="resolution must be a positive int"):
        cost.flops(space, arch, 0)


def test_mobilenetv2_numbers():
    space = load_space("mobilenetv2")
    arch = space.uniform("k3", 6.0)
    assert cost.params(space, arch) == MOBILENETV2_PARAMS
    assert cost.flops(space, arch, 224) == MOBILENETV2_MACS
    tv = torchvision.models.mobilenet_v2().eval()
    assert num_params(tv) == MOBILENETV2_PARAMS
    assert counted_macs(tv, 224) == MOBILENETV2_MACS


def test_mobilenetv2_export_counts():
    space = load_space("mobilenetv2")
    arch = space.uniform("k3", 6.0)
    net = bsnas.Supernet(space).eval()
    model = bsnas.export(net, arch)
    assert num_params(model) == MOBILENETV2_PARAMS
    assert counted_macs(model, 224) == MOBILENETV2_MACS


def test_cost_is_fast():
    space = load_space("proxyless")
    rng = random.Random(0)
    archs = [space.sample(rng) for _ in range(3000)]
    cost.flops(space, archs[0])  # build the tables
    t0 = time.process_time()  # CPU time: robust to other processes sharing the machine
    for a in archs:
        cost.flops(space, a)
        cost.params(space, a)
    rate = len(archs) / max(time.process_time() - t0, 1e-9)
    assert rate > 2000, f"{rate:.0f} archs/s"


def test_cost_rejects_bad_archs():
    space = load_space("proxyless")
    arch = space.sample(0)
    with pytest.raises(ValueError, match=r"layer 0 .*op 'skip' not allowed"):
        cost.flops(space, arch.replace(0, LayerChoice("skip")))
    with pytest.raises(ValueError, match=r"layer 5 .*width 41 not in the width grid"):
        cost.params(space, arch.replace(5, LayerChoice("k3", 41)))
    with pytest.raises(ValueError, match="arch is for space 'tiny'"):
        cost.flops(space, load_space("tiny").sample(0))


def _table():
    space = load_space("tiny")
    layers = []
    for l in space.layers:
        entry = {op: {str(w): 0.001 * w + 0.1 * int(op[1:]) for w in l.widths} for op in l.kernel_ops}
        if l.allows_skip:
            entry["skip"] = 0.0
        layers.append(entry)
    return space, {"space": "tiny", "fixed_ms": {"stem": 0.5, "head": 0.25}, "layers": layers}


def test_latency_sum(tmp_path):
    space, table = _table()
    arch = Arch("tiny", [("k3", 16), ("skip",), ("k5", 32), ("k7", 48), ("k3", 24), ("skip",)])
    expected = 0.75 + (0.016 + 0.3) + 0 + (0.032 + 0.5) + (0.048 + 0.7) + (0.024 + 0.3) + 0
    assert cost.latency(table, arch) == pytest.approx(expected)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    assert cost.latency(str(path), arch) == pytest.approx(expected)


def test_latency_errors():
    space, table = _table()
    arch = space.sample(0)
    del table["layers"][2]["k5"]
    with pytest.raises(ValueError, match=r"layer 2 has no entry for k5/"):
        cost.latency(table, arch.replace(2, LayerChoice("k5", 32)))
    with pytest.raises(ValueError, match="arch is for space 'proxyless', the latency table for 'tiny'"):
        cost.latency(table, load_space("proxyless").sample(0))
    with pytest.raises(ValueError, match="missing key 'fixed_ms'"):
        cost.latency({"space": "tiny", "layers": []}, arch)
