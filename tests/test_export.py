"""Export: equivalence with the supernet path, plain-PyTorch output (loadable without
bsnas), torch.export, ONNX, the torchvision MobileNetV2 check and the CLI."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import bsnas
from bsnas import Arch, Supernet, cost, load_space
from bsnas.cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent


def randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics/affine and classifier weights, so that equivalence
    tests see every BN entry and sizeable logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
    return net


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomize(Supernet("tiny")).eval()


def builtin_only(model: nn.Module) -> bool:
    return all(type(m).__module__.startswith("torch.") for m in model.modules())


@pytest.mark.parametrize("seed", range(6))
def test_export_equals_supernet_path(tiny, seed):
    arch = tiny.space.sample(seed)
    tiny.activate(arch)
    model = bsnas.export(tiny, arch)
    assert isinstance(model, torch.fx.GraphModule) and not model.training
    assert builtin_only(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref, out = tiny(x), model(x)
    assert ref.abs().max() > 0.1  # a meaningful comparison
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert json.loads(model.bsnas_arch) == arch.to_dict()


def test_export_default_arch_is_active(tiny):
    arch = tiny.space.sample(11)
    tiny.activate(arch)
    assert bsnas.export(tiny).bsnas_arch == arch.to_json()


def test_export_proxyless_low_resolution():
    torch.manual_seed(0)
    net = randomize(Supernet("proxyless")).eval()
    arch = net.space.sample(3)
    net.activate(arch)
    model = bsnas.export(net, arch)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == cost.params(net.space, arch)


def test_export_train_mode_matches_supernet(tiny):
    """In train mode (BN on batch statistics) both give the same outputs and the same
    running-statistics update, so the exported model is ready to retrain."""
    torch.manual_seed(1)
    net = randomize(Supernet("tiny"), seed=1)
    arch = Arch("tiny", [("k5", 48), ("skip",), ("k3", 32), ("k7", 96), ("k5", 72), ("k3", 64)])
    net.activate(arch)
    model = bsnas.export(net, arch).train()
    net.train()
    for m in (net, model):  # dropout off, BN in training mode
        for d in m.modules():
            if isinstance(d, nn.Dropout):
                d.p = 0.0
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x), net(x), atol=1e-5, rtol=1e-5)
    block = net.layers[3].blocks["k7"]
    static_bn = dict(model.named_modules())["blocks.3.depthwise_bn"]
    torch.testing.assert_close(static_bn.running_mean, block.depthwise_bn.running_mean[:96])
    torch.testing.assert_close(static_bn.running_var, block.depthwise_bn.running_var[:96])


def test_export_copies_weights(tiny):
    arch = tiny.space.largest()
    model = bsnas.export(tiny, arch)
    before = tiny.layers[0].blocks["k7"].expand.weight.clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(tiny.layers[0].blocks["k7"].expand.weight, before)


def test_export_skip_layers_vanish(tiny):
    arch = Arch("tiny", [("skip",), ("skip",), ("k3", 16), ("skip",), ("k3", 24), ("skip",)])
    model = bsnas.export(tiny, arch)
    kept = {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("blocks.")}
    assert sorted(kept) == ["2", "4"]


def test_export_rejects_bad_arch(tiny):
    with pytest.raises(ValueError, match=r"layer 2 .*op 'skip' not allowed"):
        bsnas.export(tiny, tiny.space.sample(0).replace(2, bsnas.LayerChoice("skip")))


def test_saved_model_loads_without_bsnas(tiny, tmp_path):
    arch = tiny.space.sample(4)
    tiny.activate(arch)
    model = bsnas.export(tiny, arch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    torch.save(model, tmp_path / "model.pt")
    torch.save({"x": x, "y": y}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import os, sys
        repo = {str(REPO)!r}
        sys.path = [p for p in sys.path if os.path.realpath(p or ".") != repo]

        class NoBsnas:  # bsnas must not be needed, even if installed
            def find_spec(self, name, path=None, target=None):
                if name == "bsnas" or name.startswith("bsnas."):
                    raise ImportError("bsnas is blocked in this process")
        sys.meta_path.insert(0, NoBsnas())

        import torch
        model = torch.load("model.pt", weights_only=False)
        io = torch.load("io.pt")
        with torch.no_grad():
            torch.testing.assert_close(model(io["x"]), io["y"], atol=1e-6, rtol=1e-6)
        assert "bsnas" not in sys.modules
        assert all(type(m).__module__.startswith("torch.") for m in model.modules())
        print("ok", model.bsnas_arch)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok ") and Arch.from_json(res.stdout[3:]) == arch


def test_torch_export(tiny):
    arch = tiny.space.sample(5)
    tiny.activate(arch)
    model = bsnas.export(tiny, arch)
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), tiny(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
                    reason="onnx, onnxscript and onnxruntime are needed")
def test_onnx_export(tiny, tmp_path):
    import onnxruntime

    arch = tiny.space.sample(6)
    tiny.activate(arch)
    model = bsnas.export(tiny, arch)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["image"], output_names=["logits"], dynamo=True,
                      verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(["logits"], {"image": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), tiny(x), atol=1e-4, rtol=1e-4)


def test_mobilenetv2_is_torchvision():
    """k3 at 6x input everywhere exports torchvision's MobileNetV2: same parameter
    count, same tensors in the same order, and with torchvision's weights loaded, the
    same function."""
    space = load_space("mobilenetv2")
    arch = space.uniform("k3", 6.0)
    model = bsnas.export(Supernet(space), arch)
    torch.manual_seed(0)
    tv = randomize(torchvision.models.mobilenet_v2(), seed=2).eval()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tv.parameters()) == 3_504_872
    ours, theirs = model.state_dict(), tv.state_dict()
    assert [t.shape for t in ours.values()] == [t.shape for t in theirs.values()]
    model.load_state_dict(dict(zip(ours, theirs.values())))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- CLI


def test_cli_export(tiny, tmp_path, capsys):
    arch = tiny.space.sample(7)
    torch.save(tiny.checkpoint(), tmp_path / "supernet.pt")
    arch.save(tmp_path / "arch.json")
    out = tmp_path / "out" / "model.pt"
    rc = cli_main(["export", "--checkpoint", str(tmp_path / "supernet.pt"),
                   "--arch", str(tmp_path / "arch.json"), "--out", str(out)])
    assert rc == 0
    assert f"{cost.params(tiny.space, arch):,} parameters" in capsys.readouterr().out
    model = torch.load(out, weights_only=False)
    tiny.activate(arch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny(x), atol=1e-5, rtol=1e-5)


def test_cli_export_errors(tiny, tmp_path, capsys):
    torch.save(tiny.checkpoint(), tmp_path / "supernet.pt")
    load_space("proxyless").sample(0).save(tmp_path / "arch.json")
    rc = cli_main(["export", "--checkpoint", str(tmp_path / "supernet.pt"),
                   "--arch", str(tmp_path / "arch.json"), "--out", str(tmp_path / "m.pt")])
    assert rc == 2
    assert "bsnas export: error: arch is for space 'proxyless', not 'tiny'" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()
    with pytest.raises(SystemExit):
        cli_main(["export", "--checkpoint", "x.pt"])  # missing --arch/--out
