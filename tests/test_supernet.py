"""Supernet: structure, single-path activation, gradients, checkpoints."""
import random

import pytest
import torch
from torch import nn

import bsnas
from bsnas import Arch, EnabledSpace, LayerChoice, Supernet, load_space
from bsnas.nn import SpringBlock


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Supernet("tiny")


def test_structure(tiny):
    space = tiny.space
    assert len(tiny.layers) == space.num_layers
    for layer, spec in zip(tiny.layers, space.layers):
        assert list(layer.blocks) == list(spec.kernel_ops)
        for op, block in layer.blocks.items():
            assert isinstance(block, SpringBlock)
            got = (block.in_channels, block.out_channels, block.max_width, block.kernel_size, block.stride)
            assert got == (spec.in_channels, spec.out_channels, spec.max_width, int(op[1:]), spec.stride)
            assert block.expand.weight.shape == (spec.max_width, spec.in_channels, 1, 1)
    assert tiny.first_block is None
    assert tiny.classifier.out_features == 10 and tiny.stem[0].out_channels == 16


def test_fixed_parts_of_proxyless_like_space():
    d = load_space("tiny").to_dict()
    d.update(name="withfirst", first_block={"channels": 8, "kernel": 5}, activation="hswish")
    net = Supernet(d)
    fb = net.first_block
    assert fb.depthwise[0].weight.shape == (16, 1, 5, 5) and fb.project.weight.shape == (8, 16, 1, 1)
    assert not fb.residual
    assert isinstance(net.stem[2], nn.Hardswish) and isinstance(net.head[2], nn.Hardswish)
    assert all(b.activation == "hswish" for l in net.layers for b in l.blocks.values())
    assert net.space.layers[0].in_channels == 8
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_default_active_is_largest(tiny):
    net = Supernet("tiny")
    assert net.active == net.space.largest()
    for layer in net.layers:
        assert layer.choice.op == "k7" and layer.blocks["k7"].width == layer.spec.max_width


def test_activate_sets_path(tiny):
    arch = Arch("tiny", [("k3", 32), ("skip",), ("k5", 16), ("k7", 144), ("k3", 48), ("skip",)])
    tiny.activate(arch)
    assert tiny.active == arch
    assert tiny.layers[0].blocks["k3"].width == 32 and tiny.layers[3].blocks["k7"].width == 144
    assert tiny.layers[1].active_block() is None
    assert tiny.layers[2].active_block() is tiny.layers[2].blocks["k5"]


def test_activate_rejects_bad_arch_and_keeps_state(tiny):
    good = tiny.space.sample(1)
    tiny.activate(good)
    with pytest.raises(ValueError, match=r"layer 2 .*op 'skip' not allowed \(stride 2\)"):
        tiny.activate(good.replace(2, LayerChoice("skip")))
    with pytest.raises(ValueError, match=r"layer 4 .*width 30 not in the width grid"):
        tiny.activate(good.replace(4, LayerChoice("k3", 30)))
    assert tiny.active == good
    assert all(l.choice == c for l, c in zip(tiny.layers, good.layers))


@pytest.mark.parametrize("seed", range(4))
def test_forward_runs_exactly_the_active_path(tiny, seed):
    arch = tiny.space.sample(seed)
    tiny.activate(arch)
    called = []
    hooks = [block.register_forward_hook(lambda m, i, o, key=(li, op): called.append(key))
             for li, layer in enumerate(tiny.layers) for op, block in layer.blocks.items()]
    try:
        tiny.eval()
        out = tiny(torch.randn(2, 3, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (2, 10)
    assert called == [(i, c.op) for i, c in enumerate(arch.layers) if c.op != "skip"]


def test_skip_is_identity():
    torch.manual_seed(0)
    net = Supernet("tiny").eval()
    arch = Arch("tiny", [("skip",), ("skip",), ("k3", 16), ("skip",), ("k3", 24), ("skip",)])
    net.activate(arch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = net.stem(x)
        h = net.layers[2].blocks["k3"](h)
        h = net.layers[4].blocks["k3"](h)
        ref = net.classifier(torch.flatten(net.pool(net.head(h)), 1))
        assert torch.allclose(net(x), ref, atol=1e-6)


def test_gradients_only_reach_the_active_path():
    torch.manual_seed(0)
    net = Supernet("tiny").train()
    arch = Arch("tiny", [("k3", 32), ("skip",), ("k5", 48), ("k7", 72), ("k3", 48), ("skip",)])
    net.activate(arch)
    loss = nn.functional.cross_entropy(net(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for i, (layer, c) in enumerate(zip(net.layers, arch.layers)):
        for op, block in layer.blocks.items():
            g = block.expand.weight.grad
            if op != c.op:
                assert g is None or not g.any(), (i, op)
                continue
            assert g[:c.width].abs().sum() > 0, (i, op)
            assert not g[c.width:].any(), (i, op)  # inactive channels untouched
            pg = block.project.weight.grad
            assert not pg[:, c.width:].any() and pg[:, :c.width].abs().sum() > 0
    assert net.stem[0].weight.grad.abs().sum() > 0 and net.classifier.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("resolution", [32, 19, 64])
def test_forward_shapes(tiny, resolution):
    tiny.activate(tiny.space.sample(resolution))
    for mode in (True, False):
        tiny.train(mode)
        assert tiny(torch.randn(2, 3, resolution, resolution)).shape == (2, 10)


def test_sampled_paths_in_enabled_space(tiny):
    enabled = EnabledSpace(tiny.space)
    enabled.disable_op(0, "k7")
    rng = random.Random(0)
    for _ in range(5):
        arch = tiny.space.sample(rng, enabled)
        tiny.activate(arch)
        assert tiny.layers[0].choice.op != "k7"


def test_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = Supernet("tiny")
    with torch.no_grad():  # non-trivial BN statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    enabled = EnabledSpace(net.space)
    enabled.disable_op(3, "skip")
    enabled.disable_width(5, 32)
    ckpt = net.checkpoint(enabled, epoch=3)
    assert set(ckpt) == {"space", "model", "enabled", "epoch"}
    path = tmp_path / "supernet.pt"
    torch.save(ckpt, path)
    for source in (path, str(path), torch.load(path, weights_only=True)):
        net2, enabled2 = Supernet.from_checkpoint(source)
        assert net2.space == net.space and enabled2 == enabled
        arch = net.space.sample(5)
        net.activate(arch)
        net2.activate(arch)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(net.eval()(x), net2.eval()(x))


def test_checkpoint_by_preset_name_and_without_enabled(tmp_path):
    net = Supernet("tiny")
    torch.save({"space": "tiny", "model": net.state_dict()}, tmp_path / "c.pt")
    net2, enabled = Supernet.from_checkpoint(tmp_path / "c.pt")
    assert enabled == EnabledSpace(net.space)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))


def test_checkpoint_with_trainer_extras(tmp_path):
    """The trainer adds optimizer and RNG state (numpy arrays): read as a full pickle by
    default; weights_only=True refuses it with a clear error."""
    import numpy as np

    net = Supernet("tiny")
    torch.save(net.checkpoint(rng={"numpy": np.random.get_state()}, step=5), tmp_path / "c.pt")
    net2, _ = Supernet.from_checkpoint(tmp_path / "c.pt")
    assert torch.equal(net2.stem[0].weight, net.stem[0].weight)
    with pytest.raises(ValueError, match=r"c\.pt: cannot load the checkpoint \(weights_only=True\)"):
        Supernet.from_checkpoint(tmp_path / "c.pt", weights_only=True)


def test_checkpoint_errors(tmp_path):
    net = Supernet("tiny")
    with pytest.raises(ValueError, match=r"missing key\(s\) \['space'\]"):
        Supernet.from_checkpoint({"model": net.state_dict()})
    with pytest.raises(ValueError, match="clashes with a reserved key"):
        net.checkpoint(model=1)
    with pytest.raises(ValueError, match="enabled set is for space 'mobilenetv2'"):
        net.checkpoint(EnabledSpace(load_space("mobilenetv2")))
    with pytest.raises(ValueError, match="does not exist"):
        Supernet.from_checkpoint(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="a checkpoint must be a dict"):
        Supernet.from_checkpoint(tmp_path / "list.pt")
    with pytest.raises(RuntimeError, match="size mismatch|Missing key"):
        Supernet.from_checkpoint({"space": "mobilenetv2", "model": net.state_dict()})


def test_public_supernet_accepts_space_forms():
    space = load_space("tiny")
    for spec in ("tiny", space, space.to_dict()):
        assert bsnas.Supernet(spec).space == space
