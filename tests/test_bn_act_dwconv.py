"""The fused BN + activation + depthwise + statistics op against plain PyTorch."""
import random

import pytest
import torch
import torch.nn.functional as F

from bsnas.ops import bn_act_dwconv2d

ACTS = {"relu6": F.relu6, "relu": F.relu, "identity": lambda t: t}


def _inputs(rng, dtype, fmt, grad=True):
    k, stride = rng.choice([3, 5, 7]), rng.choice([1, 2])
    c_max = rng.randint(1, 24)
    width = rng.randint(1, c_max)
    n, h, w = rng.randint(1, 3), rng.randint(k // 2 + 1, 12), rng.randint(k // 2 + 1, 12)
    z = (3 * torch.randn(n, width, h, w, dtype=dtype)).to(memory_format=fmt)
    scale = torch.rand(width, dtype=dtype) + 0.5
    shift = torch.randn(width, dtype=dtype)
    weight = torch.randn(c_max, 1, k, k, dtype=dtype)
    for t in (z, scale, shift, weight):
        t.requires_grad_(grad)
    return z, scale, shift, weight, width, stride, k // 2


def _reference(z, scale, shift, weight, width, stride, pad, act):
    a = ACTS[act](z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    y = F.conv2d(a, weight[:width], None, stride, pad, 1, width)
    return y, y.sum((0, 2, 3)), (y * y).sum((0, 2, 3))


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(dtype, fmt, act):
    rng = random.Random(5)
    for _ in range(10):
        z, scale, shift, weight, width, stride, pad = _inputs(rng, dtype, fmt)
        got = bn_act_dwconv2d(z, scale, shift, weight, width, stride, pad, 1, act)
        want = _reference(z, scale, shift, weight, width, stride, pad, act)
        # Upstream gradients on all three outputs, as the spring block's BN produces.
        grads = [torch.randn_like(t) for t in want]
        loss_got = sum((g * t).sum() for g, t in zip(grads, got))
        loss_want = sum((g * t).sum() for g, t in zip(grads, want))
        d_got = torch.autograd.grad(loss_got, (z, scale, shift, weight))
        d_want = torch.autograd.grad(loss_want, (z, scale, shift, weight))
        for a, b in zip([*got, *d_got], [*want, *d_want]):
            if dtype == torch.float64:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9)
            else:
                err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
                assert err < 1e-5, err
        assert got[0].is_contiguous(memory_format=fmt)
        assert not d_got[3][width:].any()


@pytest.mark.parametrize("act", sorted(ACTS))
def test_gradcheck(act):
    rng = random.Random(1)
    z, scale, shift, weight, width, stride, pad = _inputs(rng, torch.float64,
                                                          torch.contiguous_format)
    assert torch.autograd.gradcheck(
        lambda *t: bn_act_dwconv2d(*t, width, stride, pad, 1, act), (z, scale, shift, weight))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_opcheck(fmt):
    rng = random.Random(2)
    z, scale, shift, weight, width, stride, pad = _inputs(rng, torch.float32, fmt)
    torch.library.opcheck(torch.ops.bsnas.bn_act_dwconv2d.default,
                          (z, scale, shift, weight, width, stride, pad, 1, 2))


def test_deterministic_across_thread_counts():
    rng = random.Random(3)
    z, scale, shift, weight, width, stride, pad = _inputs(rng, torch.float32,
                                                          torch.channels_last, grad=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bn_act_dwconv2d(z, scale, shift, weight, width, stride, pad)
        torch.set_num_threads(max(2, threads))
        many = bn_act_dwconv2d(z, scale, shift, weight, width, stride, pad)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_bad_input():
    z, w = torch.randn(1, 4, 6, 6), torch.randn(8, 1, 3, 3)
    s, b = torch.ones(4), torch.zeros(4)
    op = torch.ops.bsnas.bn_act_dwconv2d
    with pytest.raises(RuntimeError, match="scale must be 1-D of the active width 4"):
        op(z, torch.ones(5), b, w, 4, 1, 1, 1, 2)
    with pytest.raises(RuntimeError, match="shift is"):
        op(z, s, b.double(), w, 4, 1, 1, 1, 2)
    with pytest.raises(RuntimeError, match="activation code must be"):
        op(z, s, b, w, 4, 1, 1, 1, 7)
    with pytest.raises(RuntimeError, match="width must be in"):
        op(z, s, b, w, 9, 1, 1, 1, 2)
    with pytest.raises(ValueError, match="activation must be one of"):
        bn_act_dwconv2d(z, s, b, w, activation="gelu")
