"""BN in training mode + activation + depthwise + statistics as one op
(`bsnas::bn_train_act_dwconv2d`) against plain PyTorch."""
import random

import pytest
import torch
import torch.nn.functional as F

import bsnas
from bsnas.ops import bn_train_act_dwconv2d
from reference import ACTS, FORMATS, assert_matches_float64, random_depthwise_shape


def _inputs(rng, dtype, fmt):
    k, stride, c_max, width, n, h, w = random_depthwise_shape(rng, 20, 11)
    z = (2 * torch.randn(n, width, h, w, dtype=dtype) + 0.5).to(memory_format=fmt)
    gamma = torch.rand(c_max, dtype=dtype) + 0.5
    beta = torch.randn(c_max, dtype=dtype)
    weight = torch.randn(c_max, 1, k, k, dtype=dtype)
    for t in (z, gamma, beta, weight):
        t.requires_grad_(True)
    return z, gamma, beta, weight, width, stride, k // 2


def _reference(z, gamma, beta, weight, width, stride, pad, act, eps):
    u = F.batch_norm(z, None, None, gamma[:width], beta[:width], True, 0.0, eps)
    y = F.conv2d(ACTS[act](u), weight[:width], None, stride, pad, 1, width)
    return (y, y.sum((0, 2, 3)), (y * y).sum((0, 2, 3)), z.sum((0, 2, 3)),
            (z * z).sum((0, 2, 3)))


@pytest.mark.parametrize("act", sorted(ACTS))
@FORMATS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(dtype, fmt, act):
    rng = random.Random(7)
    for _ in range(8):
        z, gamma, beta, weight, width, stride, pad = _inputs(rng, dtype, fmt)
        eps = rng.choice([1e-5, 1e-3])
        got = bn_train_act_dwconv2d(z, gamma, beta, weight, width, stride, pad, 1, act, eps)
        ref_in = [t.detach().double().requires_grad_(True) for t in (z, gamma, beta, weight)]
        want = _reference(*ref_in, width, stride, pad, act, eps)
        # Upstream gradients on y and its two sums (the next BN's), none on z's sums.
        d_got = assert_matches_float64(got, want, (z, gamma, beta, weight), ref_in, dtype,
                                       upstream=3)
        assert got[0].is_contiguous(memory_format=fmt)
        assert all(t.dtype == torch.float64 for t in got[1:])
        assert not got[3].requires_grad and not got[4].requires_grad
        for g in d_got[1:]:
            assert not g[width:].any()  # zero past the active width


@FORMATS
@pytest.mark.parametrize("act", ["relu6", "identity"])
def test_gradcheck(act, fmt):
    rng = random.Random(3)
    z, gamma, beta, weight, width, stride, pad = _inputs(rng, torch.float64, fmt)
    assert torch.autograd.gradcheck(
        lambda *t: bn_train_act_dwconv2d(*t, width, stride, pad, 1, act)[:3],
        (z, gamma, beta, weight))


@FORMATS
def test_opcheck(fmt):
    rng = random.Random(4)
    z, gamma, beta, weight, width, stride, pad = _inputs(rng, torch.float32, fmt)
    torch.library.opcheck(torch.ops.bsnas.bn_train_act_dwconv2d.default,
                          (z, gamma, beta, 1e-5, weight, width, stride, pad, 1, 2))


def test_compiles_without_recompiling_per_width():
    torch._dynamo.reset()
    weight = torch.randn(16, 1, 3, 3, requires_grad=True)
    gamma, beta = torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True)

    def f(z):
        y, ys, yq, _, _ = bn_train_act_dwconv2d(z, gamma, beta, weight, z.shape[1])
        return y.sum() + ys.sum() + yq.sum()

    counter = torch._dynamo.testing.CompileCounter()
    g = torch.compile(f, backend=counter, fullgraph=True)
    for width in (4, 7, 9, 12, 16):
        z = torch.randn(2, width, 6, 6, requires_grad=True)
        got = torch.autograd.grad(g(z), (z, gamma, weight))
        want = torch.autograd.grad(f(z), (z, gamma, weight))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    assert counter.frame_count <= 2


def test_bad_input():
    z, w = torch.randn(2, 4, 6, 6), torch.randn(8, 1, 3, 3)
    g, b = torch.ones(8), torch.zeros(8)
    op = torch.ops.bsnas.bn_train_act_dwconv2d
    with pytest.raises(RuntimeError, match="z has 4 channels, the width is 5"):
        op(z, g, b, 1e-5, w, 5, 1, 1, 1, 2)
    with pytest.raises(RuntimeError, match="must be 4-D"):
        op(z[0], g, b, 1e-5, w, 4, 1, 1, 1, 2)
    with pytest.raises(RuntimeError, match="z is empty"):
        op(z[:0], g, b, 1e-5, w, 4, 1, 1, 1, 2)
    with pytest.raises(RuntimeError, match="weight"):
        op(z, g[:3], b, 1e-5, w, 4, 1, 1, 1, 2)
    with pytest.raises(RuntimeError, match="width must be in"):
        op(z, g, b, 1e-5, w[:3], 4, 1, 1, 1, 2)
    with pytest.raises(ValueError, match="activation must be one of"):
        bn_train_act_dwconv2d(z, g, b, w, activation="gelu")


@pytest.mark.skipif(not (torch.cuda.is_available() and bsnas.cuda_compiled()),
                    reason="needs a GPU and the CUDA kernels")
@FORMATS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype, fmt):
    """On the GPU: float32 against the float64 reference; bfloat16 under autocast (z in
    bfloat16, BN parameters float32) within bfloat16's resolution."""
    rng = random.Random(11)
    for _ in range(4):
        z, gamma, beta, weight, width, stride, pad = _inputs(rng, torch.float32, fmt)
        dev = [t.detach().cuda().requires_grad_(True) for t in (z, gamma, beta, weight)]
        with torch.autocast("cuda", torch.bfloat16, enabled=dtype == torch.bfloat16):
            got = bn_train_act_dwconv2d(*dev, width, stride, pad, 1, "relu6")
        ref_in = [t.detach().double().requires_grad_(True) for t in (z, gamma, beta, weight)]
        want = _reference(*ref_in, width, stride, pad, "relu6", 1e-5)
        grads = [torch.randn_like(t) for t in want[:3]]
        loss = sum((g.cuda().to(t.dtype) * t).sum() for g, t in zip(grads, got))
        d_got = torch.autograd.grad(loss, dev)
        d_want = torch.autograd.grad(sum((g * t).sum() for g, t in zip(grads, want)), ref_in)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        for a, b in zip([*got, *d_got], [*want, *d_want]):
            err = ((a.cpu().double() - b).norm() / b.norm().clamp_min(1e-12)).item()
            assert err < tol, err
        assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=fmt)
