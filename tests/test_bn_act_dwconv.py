"""The fused BN + activation + depthwise + statistics op against plain PyTorch."""
import random

import pytest
import torch
import torch.nn.functional as F

from bsnas.ops import bn_act_dwconv2d
from reference import ACTS, assert_matches_float64, random_depthwise_shape


def _inputs(rng, dtype, fmt, grad=True):
    k, stride, c_max, width, n, h, w = random_depthwise_shape(rng, 24, 12)
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
        # The reference runs in float64 (a float32 PyTorch composite is itself off by
        # ~1e-5 on the sums of squares, more than the float64-accumulated statistics).
        ref_in = [t.detach().double().requires_grad_(True) for t in (z, scale, shift, weight)]
        want = _reference(*ref_in, width, stride, pad, act)
        # Upstream gradients on all three outputs, as the spring block's BN produces.
        d_got = assert_matches_float64(got, want, (z, scale, shift, weight), ref_in, dtype)
        assert got[0].is_contiguous(memory_format=fmt)
        assert got[1].dtype == got[2].dtype == torch.float64
        assert not d_got[3][width:].any()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("act", sorted(ACTS))
def test_gradcheck(act, fmt):
    rng = random.Random(1)
    z, scale, shift, weight, width, stride, pad = _inputs(rng, torch.float64, fmt)
    assert torch.autograd.gradcheck(
        lambda *t: bn_act_dwconv2d(*t, width, stride, pad, 1, act), (z, scale, shift, weight))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_opcheck(fmt):
    rng = random.Random(2)
    z, scale, shift, weight, width, stride, pad = _inputs(rng, torch.float32, fmt)
    torch.library.opcheck(torch.ops.bsnas.bn_act_dwconv2d.default,
                          (z, scale, shift, weight, width, stride, pad, 1, 2))
    y, ys, yq = torch.ops.bsnas.bn_act_dwconv2d(z, scale, shift, weight, width, stride, pad, 1, 2)
    torch.library.opcheck(torch.ops.bsnas._bn_act_dwconv2d_backward.default,
                          (torch.randn_like(y), torch.randn_like(ys), torch.randn_like(yq),
                           z.detach(), scale.detach(), shift.detach(), weight.detach(),
                           y.detach(), width, stride, pad, 1, 2))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_statistics_are_float64_and_do_not_cancel(fmt):
    """Near-constant channels (mean^2 / var ~ 1e8): the variance from the float64
    statistics matches a float64 two-pass variance of the same float32 output, where
    the same formula on float32 statistics is off by orders of magnitude."""
    torch.manual_seed(0)
    z = (3.0 + 1e-3 * torch.randn(4, 6, 9, 9)).contiguous(memory_format=fmt)
    scale, shift = torch.ones(6), torch.zeros(6)
    weight = torch.full((8, 1, 3, 3), 1.0 / 9)
    y, s, q = bn_act_dwconv2d(z, scale, shift, weight, 6, 1, 0, 1, "identity")
    assert s.dtype == q.dtype == torch.float64
    n = y.numel() // 6
    var = q / n - (s / n) ** 2
    ref = y.double().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(var, ref, rtol=1e-6, atol=0)
    var32 = (q.float() / n - (s.float() / n) ** 2).double()
    assert ((var32 - ref).abs() / ref).max() > 1e-2


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


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("dilation,stride,pad", [(2, 1, 2), (2, 2, 1), (1, 3, 0)])
def test_dilation_and_stride(fmt, dilation, stride, pad):
    """Dilation, stride 3 and unusual padding; upstream gradient on y only (no gradient
    through the statistics, so the kernels skip reading y)."""
    rng = random.Random(dilation * 10 + stride)
    for act in sorted(ACTS):
        z, scale, shift, weight, width, _, _ = _inputs(rng, torch.float64, fmt)
        k = weight.shape[-1]
        if z.shape[2] + 2 * pad < dilation * (k - 1) + 1 or z.shape[3] + 2 * pad < dilation * (k - 1) + 1:
            z = z.detach().repeat(1, 1, 3, 3).contiguous(memory_format=fmt).requires_grad_(True)
        got = bn_act_dwconv2d(z, scale, shift, weight, width, stride, pad, dilation, act)
        a = ACTS[act](z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
        want = F.conv2d(a, weight[:width], None, stride, pad, dilation, width)
        gy = torch.randn_like(want)
        d_got = torch.autograd.grad(got[0], (z, scale, shift, weight), gy)
        d_want = torch.autograd.grad(want, (z, scale, shift, weight), gy)
        torch.testing.assert_close(got[0], want, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(got[1], want.sum((0, 2, 3)), rtol=1e-10, atol=1e-9)
        for a_, b_ in zip(d_got, d_want):
            torch.testing.assert_close(a_, b_, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_activation_kinks(dtype, fmt):
    """u = z * scale + shift exactly 0 or 6 (exact in any rounding): the gradient there is
    0, as F.relu / F.relu6 autograd define it, and 1 for identity."""
    vals = torch.tensor([-1.0, 0.0, 0.5, 3.0, 6.0, 7.0, 3.0, 4.5], dtype=dtype)
    z = vals[torch.randperm(8, generator=torch.Generator().manual_seed(0))].repeat(2, 3, 6, 1)
    z = z.contiguous(memory_format=fmt).requires_grad_(True)  # [2, 3, 6, 8]
    scale = torch.tensor([1.0, 2.0, 0.5], dtype=dtype, requires_grad=True)
    shift = torch.tensor([0.0, -6.0, 1.5], dtype=dtype, requires_grad=True)  # u = 0 / 6 hit
    weight = torch.randn(4, 1, 3, 3, dtype=dtype, requires_grad=True)
    for act in sorted(ACTS):
        got = bn_act_dwconv2d(z, scale, shift, weight, 3, 1, 1, 1, act)
        want = _reference(z, scale, shift, weight, 3, 1, 1, act)
        grads = [torch.randn_like(t) for t in want]
        d_got = torch.autograd.grad(sum((g * t).sum() for g, t in zip(grads, got)),
                                    (z, scale, shift, weight))
        d_want = torch.autograd.grad(sum((g * t).sum() for g, t in zip(grads, want)),
                                     (z, scale, shift, weight))
        tol = dict(rtol=1e-10, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
        for a, b in zip([*got, *d_got], [*want, *d_want]):
            torch.testing.assert_close(a, b.to(a.dtype), **tol)  # statistics: float64
        # Exactly zero where the reference's act' is zero.
        u = z.detach() * scale.detach().view(1, -1, 1, 1) + shift.detach().view(1, -1, 1, 1)
        if act != "identity":
            dead = (u <= 0) | ((u >= 6) if act == "relu6" else torch.zeros_like(u, dtype=torch.bool))
            assert ((u == 0) | (u == 6)).any()
            assert (d_got[0][dead] == 0).all()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_backward_deterministic_across_thread_counts(fmt):
    rng = random.Random(4)
    z, scale, shift, weight, width, stride, pad = _inputs(rng, torch.float32, fmt, grad=False)
    z = z.repeat(4, 1, 2, 2).contiguous(memory_format=fmt)
    y, s, q = bn_act_dwconv2d(z, scale, shift, weight, width, stride, pad)
    gy = torch.randn_like(y)
    gs, gq = torch.randn_like(s), torch.randn_like(q)
    op = torch.ops.bsnas._bn_act_dwconv2d_backward
    args = (gy, gs, gq, z, scale, shift, weight, y, width, stride, pad, 1, 2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(*args)
        torch.set_num_threads(max(2, threads))
        many = op(*args)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_large_plane_across_strips_and_threads(k, stride):
    """channels_last planes large enough to be cut into several row strips: statistics
    and BN gradients summed over strips, identical for any thread count; at stride 1
    the weight gradient runs through the register window, several kernel rows at once
    (padded_window_wgrad: 3 + 0, 2 + 2 + 1 and 7 x 1 rows with AVX-512)."""
    torch.manual_seed(1)
    width, c_max = 45, 50
    z = (2 * torch.randn(2, width, 64, 60, dtype=torch.float64)).to(memory_format=torch.channels_last)
    scale = torch.rand(width, dtype=torch.float64) + 0.5
    shift = torch.randn(width, dtype=torch.float64)
    weight = torch.randn(c_max, 1, k, k, dtype=torch.float64)
    ins = [t.clone().requires_grad_(True) for t in (z, scale, shift, weight)]
    ref_ins = [t.clone().requires_grad_(True) for t in (z, scale, shift, weight)]
    got = bn_act_dwconv2d(*ins, width, stride, k // 2, 1, "relu6")
    want = _reference(*ref_ins, width, stride, k // 2, "relu6")
    ups = [torch.randn_like(t) for t in want]
    d_got = torch.autograd.grad(sum((u * t).sum() for u, t in zip(ups, got)), ins)
    d_want = torch.autograd.grad(sum((u * t).sum() for u, t in zip(ups, want)), ref_ins)
    for a, b in zip([*got, *d_got], [*want, *d_want]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-8)
    z32, s32, h32, w32 = (t.float() for t in (z, scale, shift, weight))
    y, s, q = bn_act_dwconv2d(z32, s32, h32, w32, width, stride, k // 2)
    args = (torch.randn_like(y), torch.randn_like(s), torch.randn_like(q), z32, s32, h32, w32,
            y, width, stride, k // 2, 1, 2)
    op = torch.ops.bsnas._bn_act_dwconv2d_backward
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (*bn_act_dwconv2d(z32, s32, h32, w32, width, stride, k // 2), *op(*args))
        torch.set_num_threads(max(2, threads))
        many = (*bn_act_dwconv2d(z32, s32, h32, w32, width, stride, k // 2), *op(*args))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_empty_batch():
    z = torch.randn(0, 3, 6, 6, requires_grad=True)
    scale = torch.ones(3, requires_grad=True)
    shift = torch.zeros(3, requires_grad=True)
    weight = torch.randn(5, 1, 3, 3, requires_grad=True)
    y, s, q = bn_act_dwconv2d(z, scale, shift, weight, 3)
    assert y.shape == (0, 3, 6, 6) and (s == 0).all() and (q == 0).all()
    grads = torch.autograd.grad((y.sum() + s.sum() + q.sum()), (z, scale, shift, weight))
    assert grads[0].shape == z.shape and all((g == 0).all() for g in grads[1:])


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
    y, ys, yq = op(z, s, b, w, 4, 1, 1, 1, 2)
    bwd = torch.ops.bsnas._bn_act_dwconv2d_backward
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        bwd(y[:, :3], ys, yq, z, s, b, w, y, 4, 1, 1, 1, 2)
    with pytest.raises(RuntimeError, match="grad_sum has shape"):
        bwd(y, ys[:3], yq, z, s, b, w, y, 4, 1, 1, 1, 2)
    with pytest.raises(RuntimeError, match="grad_sumsq must be float64"):
        bwd(y, ys, yq.float(), z, s, b, w, y, 4, 1, 1, 1, 2)
    with pytest.raises(RuntimeError, match="activation code must be"):
        bwd(y, ys, yq, z, s, b, w, y, 4, 1, 1, 1, 3)
