"""NaN and +-Inf through every bsnas op and the spring block: where the plain PyTorch
composite on the same device (F.conv2d on sliced weights, F.batch_norm, the activation)
has NaN, +Inf or -Inf, in outputs, in gradients and in BatchNorm running statistics, so
must the op, and nowhere else. Non-finite values are injected at random positions of
an input (and, for the backward passes, of the upstream gradient), separately for NaN
and for +-Inf, in NCHW and channels_last, float32 and float64; float64 values that both
sides keep finite must also agree.

ReLU6's gradient at a NaN input follows ATen on each device: CUDA's hardtanh_backward is
`(u <= 0 || u >= 6) ? 0 : g` (the gradient passes), the vectorised loop of the CPU one is
`(u > 0) & (u < 6)` (zero; only the scalar tail of each loop, under 16 values, passes
it). `_ReLU6` below is F.relu6 with that gradient made explicit, so that a comparison
does not depend on where a NaN falls against that tail; test_reference_relu6_is_pytorchs
checks it against F.relu6. ReLU's gradient at NaN passes on both (threshold_backward).

One place where PyTorch itself has no single answer: a depthwise weight gradient whose
upstream gradient is NaN or Inf at an output that reads the zero padding (oneDNN leaves
the padding out, im2col multiplies it in: 0 * Inf = NaN). There (padding_taps) NaN on
either side is accepted; everywhere else the positions must be the same.
"""
import copy
import os
import random
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

import bsnas
from bsnas.nn import SpringBlock
from bsnas.ops import (bn_act, bn_act_dwconv2d, bn_affine_from_sums, bn_train_act_dwconv2d,
                       bn_update_running_stats_, channel_stats, masked_dwconv2d,
                       masked_pwconv2d, mbconv_folded, mbconv_train)

CUDA = torch.cuda.is_available() and bsnas.cuda_compiled()
DEVICES = pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no GPU"))])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
FORMATS = pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                                  ids=["nchw", "cl"])
KINDS = pytest.mark.parametrize("kind", ["nan", "inf"])
ACT_NAMES = ["identity", "relu", "relu6"]


class _ReLU6(torch.autograd.Function):
    """F.relu6 whose gradient at NaN is ATen's on the input's device (module docstring)."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return F.relu6(u)

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        zero = torch.zeros_like(g)
        if u.is_cuda:
            return torch.where((u <= 0) | (u >= 6), zero, g)
        return torch.where((u > 0) & (u < 6), g, zero)


def act_ref(name, u):
    if name == "identity":
        return u
    return F.relu(u) if name == "relu" else _ReLU6.apply(u)


# ------------------------------------------------------------------------ helpers


def rng_for(*key):
    """A random.Random seeded from the test case (not hash(): strings hash differently in
    every process)."""
    return random.Random(zlib.crc32(repr(key).encode()))


def inject(t, kind, rng, count=None):
    """A copy of `t` (same layout, no history) with `count` (default 1-3) values at random
    positions set to NaN (`kind` "nan") or to +Inf / -Inf (random signs)."""
    t = t.detach().clone()
    count = rng.randint(1, 3) if count is None else count
    for _ in range(count):
        idx = tuple(rng.randrange(s) for s in t.shape)
        t[idx] = float("nan") if kind == "nan" else rng.choice([1.0, -1.0]) * float("inf")
    return t


def randn(shape, dtype, device, rng, fmt=torch.contiguous_format, scale=1.0):
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return t.to(dtype=dtype, device=device).contiguous(memory_format=fmt)


def leaf(t):
    return t.detach().clone().requires_grad_()


def assert_same_nonfinite(got, want, what, values=None, either_nan=None):
    """NaN, +Inf and -Inf at the same positions of `got` and `want` (same shape); where
    both are finite, values within 1e-7 with `values` (default: when both are float64).
    Where the bool mask `either_nan` is set, NaN on either side passes too."""
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    for name, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        g, w = f(got), f(want)
        bad = g != w
        if either_nan is not None:
            bad &= ~(either_nan.cpu() & (got.isnan() | want.isnan()))
        if bad.any():
            diff = bad.nonzero()[:4].tolist()
            raise AssertionError(f"{what}: {name} at {int(g.sum())} positions, the composite "
                                 f"at {int(w.sum())}; they differ first at {diff}")
    fin = torch.isfinite(got) & torch.isfinite(want)
    if values is None:
        values = got.dtype == torch.float64 and want.dtype == torch.float64
    if values:
        torch.testing.assert_close(got[fin], want[fin].to(got.dtype), rtol=1e-7, atol=1e-7,
                                   msg=lambda m: f"{what}: {m}")


def check_all(gots, wants, names, values=None, either_nan=None):
    """assert_same_nonfinite for each pair; `values`: see there (float32 ops have float64
    statistics, computed from unrounded values: compare their values only in float64);
    `either_nan`: {index: mask} for assert_same_nonfinite."""
    for i, (g, w, n) in enumerate(zip(gots, wants, names)):
        if g is None and w is None:
            continue
        if g is None or w is None:  # an absent gradient is a zero one
            g = torch.zeros_like(w) if g is None else g
            w = torch.zeros_like(g) if w is None else w
        assert_same_nonfinite(g, w, n, values, (either_nan or {}).get(i))


def running_stats_lenience(mean, device):
    """{index of a running mean: mask} for check_all: on CUDA F.batch_norm takes the batch
    mean by Welford's update, in which one Inf value turns the mean NaN (Inf - Inf on the
    next value); from the sums it is Inf, as on CPU. There NaN on either side passes."""
    return {i: torch.ones(mean.shape, dtype=torch.bool) for i in ([0] if device == "cuda" else [])}


def padding_taps(g, c_max, h, w, k, stride, pad, dil):
    """The depthwise weight-gradient entries [c_max, 1, k, k] at which PyTorch's own
    result depends on its convolution algorithm: (c, tap) where an output of channel c
    whose upstream gradient `g` [N, width, Ho, Wo] is NaN or Inf reads the zero padding
    through the tap. oneDNN (float32 on CPU) leaves the padding out of the sum, the
    im2col path (float64 on CPU, one channel) multiplies it in: 0 * Inf = NaN. The
    kernels here multiply it in (packed, zero-padded inputs)."""
    width, ho, wo = g.shape[1:]
    valid = F.unfold(torch.ones(1, 1, h, w, dtype=torch.float64), k, dil, pad, stride)[0]
    nonfinite = (~torch.isfinite(g.detach().cpu())).double().sum(0).view(width, ho * wo)
    taps = (nonfinite @ (valid == 0).double().T) > 0  # [width, k * k]
    out = torch.zeros(c_max, 1, k, k, dtype=torch.bool)
    out[:width] = taps.view(width, 1, k, k)
    return out


def conv_upstream(ups, y):
    """The depthwise convolution's upstream gradient in bn_act_dwconv2d's composite:
    grad_y + grad_sum[c] + 2 y grad_sumsq[c] (absent terms left out)."""
    g = ups[0].double()
    if ups[1] is not None:
        g = g + ups[1].view(1, -1, 1, 1)
    if ups[2] is not None:
        g = g + 2 * y.detach().double() * ups[2].view(1, -1, 1, 1)
    return g


def grads(outs, ins, ups):
    """d(sum of <out, up>)/d(ins) over the outputs with an upstream gradient."""
    pairs = [(o, u) for o, u in zip(outs, ups) if u is not None]
    return torch.autograd.grad([o for o, _ in pairs], ins, [u for _, u in pairs],
                               allow_unused=True, retain_graph=True)


def upstream(outs, rng, kind=None):
    """A random upstream gradient per output (like it, on its device); with `kind`,
    non-finite values injected into the first one."""
    ups = [randn(o.shape, o.dtype, o.device, rng) for o in outs]
    if kind is not None:
        ups[0] = inject(ups[0], kind, rng)
    return ups


def dw_ref(a, weight, width, stride, padding, dilation):
    return F.conv2d(a, weight[:width], None, stride, padding, dilation, width)


def sums_ref(y):
    y = y.double()
    return y.sum((0, 2, 3)), (y * y).sum((0, 2, 3))


# Depthwise cases (n, c_max, width, h, w, k, stride, dilation) reaching every CPU path:
# small planes (the flat pass), the blocked NCHW passes, the plain plane pass (dilation
# 2, a plane over 128 x 128), channels_last window / direct / block passes and the
# phase input gradient (stride 2), window weight gradient (28 x 28 and up), partial
# channel blocks.
DW_CASES = [
    (2, 24, 21, 9, 11, 3, 1, 1),
    (2, 16, 16, 12, 12, 5, 2, 1),
    (1, 40, 37, 7, 7, 7, 1, 1),
    (2, 20, 17, 29, 30, 3, 2, 1),
    (1, 9, 9, 28, 28, 5, 1, 1),
    (2, 12, 9, 10, 13, 3, 1, 2),
    (1, 6, 5, 4, 4, 3, 1, 2),
    (1, 5, 3, 9, 14, 5, 2, 2),
    (1, 3, 2, 130, 131, 3, 2, 1),
    (2, 1, 1, 6, 7, 3, 2, 1),
]


def dw_case_ids():
    return [f"n{c[0]}c{c[2]}of{c[1]}-{c[3]}x{c[4]}-k{c[5]}s{c[6]}d{c[7]}" for c in DW_CASES]


DW = pytest.mark.parametrize("case", DW_CASES, ids=dw_case_ids())


def same_pad(k, dilation):
    return dilation * (k - 1) // 2


# ------------------------------------------------------------------------ activations


@DEVICES
def test_reference_relu6_is_pytorchs(device):
    nan, inf = float("nan"), float("inf")
    for dtype in (torch.float32, torch.float64):
        # 64 values: every one in ATen's vectorised loop (no scalar tail) on CPU.
        u = torch.tensor([nan, inf, -inf, 0.0, 6.0, 3.0, -1.0, 7.0] * 8, dtype=dtype,
                         device=device, requires_grad=True)
        g = torch.randn(u.shape, dtype=dtype, device=device)
        want = F.relu6(u)
        got = _ReLU6.apply(u)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
        (gw,) = torch.autograd.grad(want, u, g)
        (gg,) = torch.autograd.grad(got, u, g)
        assert torch.equal(gg, gw)


# ------------------------------------------------------------------------ masked convs


@DEVICES
@DTYPES
@FORMATS
@KINDS
@pytest.mark.parametrize("where", ["input", "grad"])
@DW
def test_masked_dwconv2d(device, dtype, fmt, kind, where, case):
    n, c_max, width, h, w, k, stride, dil = case
    rng = rng_for(case, kind, where, dtype, device)
    pad = same_pad(k, dil)
    for _ in range(2):
        x = randn((n, width, h, w), dtype, device, rng, fmt)
        if where == "input":
            x = inject(x, kind, rng)
        weight = randn((c_max, 1, k, k), dtype, device, rng)
        xa, wa, xb, wb = leaf(x), leaf(weight), leaf(x), leaf(weight)
        y = masked_dwconv2d(xa, wa, width, stride, pad, dil)
        ref = dw_ref(xb, wb, width, stride, pad, dil)
        assert_same_nonfinite(y, ref, "y")
        ups = upstream([ref], rng, kind if where == "grad" else None)
        lenient = padding_taps(ups[0], c_max, h, w, k, stride, pad, dil)
        check_all(grads([y], [xa, wa], ups), grads([ref], [xb, wb], ups), ["grad_x", "grad_w"],
                  either_nan={1: lenient})


@DEVICES
@DTYPES
@FORMATS
@KINDS
@pytest.mark.parametrize("where", ["input", "grad"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 7, 9, 11, 6), (3, 24, 17, 5, 5, 40, 33),
                                   (1, 8, 8, 14, 13, 8, 8)],
                         ids=["small", "partial", "full"])
def test_masked_pwconv2d(device, dtype, fmt, kind, where, shape):
    n, in_max, in_w, h, w, out_max, out_w = shape
    rng = rng_for(shape, kind, where, dtype, device)
    for _ in range(2):
        x = randn((n, in_w, h, w), dtype, device, rng, fmt)
        if where == "input":
            x = inject(x, kind, rng)
        weight = randn((out_max, in_max, 1, 1), dtype, device, rng)
        xa, wa, xb, wb = leaf(x), leaf(weight), leaf(x), leaf(weight)
        y = masked_pwconv2d(xa, wa, in_w, out_w)
        ref = F.conv2d(xb, wb[:out_w, :in_w])
        assert_same_nonfinite(y, ref, "y")
        ups = upstream([ref], rng, kind if where == "grad" else None)
        check_all(grads([y], [xa, wa], ups), grads([ref], [xb, wb], ups), ["grad_x", "grad_w"])


# ------------------------------------------------------------------------ BN + activation


@DEVICES
@DTYPES
@FORMATS
@KINDS
@pytest.mark.parametrize("act", ACT_NAMES)
def test_bn_act(device, dtype, fmt, kind, act):
    rng = rng_for(kind, act, dtype, device)
    for n, c, h, w in [(2, 13, 6, 7), (3, 32, 5, 5), (1, 3, 17, 19)]:
        y = inject(randn((n, c, h, w), dtype, device, rng, fmt, 3.0), kind, rng, 4)
        scale = randn((c,), dtype, device, rng)
        shift = randn((c,), dtype, device, rng, scale=3.0)
        ins_a = [leaf(t) for t in (y, scale, shift)]
        ins_b = [leaf(t) for t in (y, scale, shift)]
        out = bn_act(*ins_a, activation=act)
        yb, sb, tb = ins_b
        ref = act_ref(act, yb * sb.view(1, -1, 1, 1) + tb.view(1, -1, 1, 1))
        assert_same_nonfinite(out, ref, "h")
        for where in ("input", "grad"):
            ups = upstream([ref], rng, kind if where == "grad" else None)
            check_all(grads([out], ins_a, ups), grads([ref], ins_b, ups),
                      [f"{where}: grad_y", f"{where}: grad_scale", f"{where}: grad_shift"])


def bn_act_dw_ref(z, scale, shift, weight, width, stride, pad, dil, act):
    a = act_ref(act, z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    y = dw_ref(a, weight, width, stride, pad, dil)
    return (y, *sums_ref(y))


@DEVICES
@DTYPES
@FORMATS
@KINDS
@pytest.mark.parametrize("where", ["input", "grad"])
@pytest.mark.parametrize("act", ACT_NAMES)
@DW
def test_bn_act_dwconv2d(device, dtype, fmt, kind, where, act, case):
    n, c_max, width, h, w, k, stride, dil = case
    rng = rng_for(case, kind, where, act, dtype, device)
    pad = same_pad(k, dil)
    z = randn((n, width, h, w), dtype, device, rng, fmt, 3.0)
    if where == "input":
        z = inject(z, kind, rng)
    scale = randn((width,), dtype, device, rng)
    shift = randn((width,), dtype, device, rng, scale=3.0)
    weight = randn((c_max, 1, k, k), dtype, device, rng)
    ins_a = [leaf(t) for t in (z, scale, shift, weight)]
    ins_b = [leaf(t) for t in (z, scale, shift, weight)]
    outs = bn_act_dwconv2d(*ins_a, width, stride, pad, dil, act)
    refs = bn_act_dw_ref(*ins_b, width, stride, pad, dil, act)
    check_all(outs, refs, ["y", "sum", "sumsq"], dtype == torch.float64)
    names = ["grad_z", "grad_scale", "grad_shift", "grad_w"]
    ups = upstream(refs, rng, kind if where == "grad" else None)
    # Only y used: the sums' gradients are absent, not zero.
    for u, tag in ((ups, ""), ([ups[0], None, None], "y only: ")):
        lenient = padding_taps(conv_upstream(u, refs[0]), c_max, h, w, k, stride, pad, dil)
        check_all(grads(outs, ins_a, u), grads(refs, ins_b, u), [tag + n for n in names],
                  either_nan={3: lenient})


def bn_train_ref(z, bn_w, bn_b, eps, rm, rv, momentum):
    c = z.shape[1]
    return F.batch_norm(z, rm[:c], rv[:c], bn_w[:c], bn_b[:c], True, momentum, eps)


def running_buffers(c_max, dtype, device, rng):
    rm = randn((c_max,), dtype, device, rng) * 0.5
    rv = randn((c_max,), dtype, device, rng).abs() + 0.5
    return rm, rv


@DEVICES
@DTYPES
@FORMATS
@KINDS
@pytest.mark.parametrize("act", ACT_NAMES)
@DW
def test_bn_train_act_dwconv2d(device, dtype, fmt, kind, act, case):
    n, c_max, width, h, w, k, stride, dil = case
    rng = rng_for(case, kind, act, dtype, device)
    pad, eps, momentum = same_pad(k, dil), 1e-5, 0.1
    z = inject(randn((n, width, h, w), dtype, device, rng, fmt, 3.0), kind, rng)
    bn_w = randn((c_max,), dtype, device, rng)
    bn_b = randn((c_max,), dtype, device, rng)
    weight = randn((c_max, 1, k, k), dtype, device, rng)
    ins_a = [leaf(t) for t in (z, bn_w, bn_b, weight)]
    ins_b = [leaf(t) for t in (z, bn_w, bn_b, weight)]
    y, ysum, ysq, zsum, zsq = bn_train_act_dwconv2d(ins_a[0], ins_a[1], ins_a[2], ins_a[3],
                                                    width, stride, pad, dil, act, eps)
    rm, rv = running_buffers(c_max, dtype, device, rng)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    zb, bwb, bbb, wb = ins_b
    a = act_ref(act, bn_train_ref(zb, bwb, bbb, eps, rm_ref, rv_ref, momentum))
    ref = dw_ref(a, wb, width, stride, pad, dil)
    check_all([y, ysum, ysq, zsum, zsq], [ref, *sums_ref(ref), *sums_ref(zb)],
              ["y", "ysum", "ysumsq", "zsum", "zsumsq"], dtype == torch.float64)
    bn_update_running_stats_(rm, rv, torch.zeros((), dtype=torch.long, device=device), zsum,
                             zsq, n * h * w, momentum)
    check_all([rm, rv], [rm_ref, rv_ref], ["running_mean", "running_var"],
              either_nan=running_stats_lenience(rm, device))
    ups = upstream([ref, ysum, ysq], rng)
    lenient = padding_taps(conv_upstream(ups, ref), c_max, h, w, k, stride, pad, dil)
    check_all(grads([y, ysum, ysq], ins_a, ups), grads([ref, *sums_ref(ref)], ins_b, ups),
              ["grad_z", "grad_bn_weight", "grad_bn_bias", "grad_w"], either_nan={3: lenient})


# ------------------------------------------------------------------------ statistics


@DEVICES
@DTYPES
@FORMATS
@KINDS
def test_channel_stats(device, dtype, fmt, kind):
    rng = rng_for(kind, dtype, device)
    for shape in [(2, 13, 6, 7), (3, 40, 5, 5), (1, 3, 17, 19)]:
        z = inject(randn(shape, dtype, device, rng, fmt), kind, rng, 3)
        za, zb = leaf(z), leaf(z)
        outs, refs = channel_stats(za), sums_ref(zb)
        check_all(outs, refs, ["sum", "sumsq"], dtype == torch.float64)
        ups = upstream(refs, rng)
        for used, tag in (((0, 1), "both"), ((0,), "sum only"), ((1,), "sumsq only")):
            u = [ups[i] if i in used else None for i in range(2)]
            check_all(grads(outs, [za], u), grads(refs, [zb], u), [f"{tag}: grad_z"])


def affine_ref(s, q, count, w, b, eps):
    mean = s / count
    var = (q / count - mean * mean).clamp_min(0)
    c = s.shape[0]
    scale = w[:c].double() / torch.sqrt(var + eps)
    shift = b[:c].double() - mean * scale
    return scale.to(w.dtype), shift.to(w.dtype)


def batch_sums(c, count, device, rng, kind):
    """float64 per-channel sums of `count` random values per channel, with non-finite
    values injected into sum, sumsq or both."""
    z = randn((count, c), torch.float64, device, rng) + randn((1, c), torch.float64, device, rng)
    s, q = z.sum(0), (z * z).sum(0)
    which = rng.choice(["sum", "sumsq", "both"])
    if which in ("sum", "both"):
        s = inject(s, kind, rng)
    if which in ("sumsq", "both"):
        q = inject(q, kind, rng)
    return s, q


@DEVICES
@DTYPES
@KINDS
def test_bn_affine_from_sums(device, dtype, kind):
    rng = rng_for(kind, dtype, device)
    for _ in range(6):
        c_max, count = rng.randint(4, 40), rng.randint(2, 50)
        c = rng.randint(1, c_max)
        s, q = batch_sums(c, count, device, rng, kind)
        w, b = randn((c_max,), dtype, device, rng), randn((c_max,), dtype, device, rng)
        ins_a = [leaf(t) for t in (s, q, w, b)]
        ins_b = [leaf(t) for t in (s, q, w, b)]
        outs = bn_affine_from_sums(ins_a[0], ins_a[1], count, ins_a[2], ins_a[3], 1e-5)
        refs = affine_ref(ins_b[0], ins_b[1], count, ins_b[2], ins_b[3], 1e-5)
        check_all(outs, refs, ["scale", "shift"])
        ups = upstream(refs, rng)
        check_all(grads(outs, ins_a, ups), grads(refs, ins_b, ups),
                  ["grad_sum", "grad_sumsq", "grad_weight", "grad_bias"])


@DEVICES
@DTYPES
@KINDS
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0])
def test_bn_update_running_stats(device, dtype, kind, momentum):
    rng = rng_for(kind, momentum, dtype, device)
    for _ in range(6):
        c_max, count = rng.randint(4, 40), rng.randint(2, 50)
        c = rng.randint(1, c_max)
        s, q = batch_sums(c, count, device, rng, kind)
        rm, rv = running_buffers(c_max, dtype, device, rng)
        nbt = torch.tensor(rng.randint(0, 5), device=device)
        f = 1.0 / float(nbt + 1) if momentum is None else momentum
        mean = s / count
        var = (q / count - mean * mean).clamp_min(0) * (count / (count - 1))
        want_m, want_v = rm.clone(), rv.clone()  # as F.batch_norm updates them
        want_m[:c] = ((1 - f) * rm[:c].double() + f * mean).to(dtype)
        want_v[:c] = ((1 - f) * rv[:c].double() + f * var).to(dtype)
        bn_update_running_stats_(rm, rv, nbt, s, q, count, momentum)
        check_all([rm, rv], [want_m, want_v], ["running_mean", "running_var"])


# ------------------------------------------------------------------------ fused blocks


MB_CASES = [  # (n, cin, c_max, width, cout, h, w, k, stride)
    (2, 8, 24, 21, 12, 9, 10, 3, 1),
    (2, 5, 16, 16, 7, 12, 12, 5, 2),
    (1, 16, 40, 17, 16, 7, 7, 7, 1),
    (2, 3, 9, 4, 5, 28, 29, 5, 2),
]
MB = pytest.mark.parametrize("case", MB_CASES,
                             ids=[f"{c[1]}-{c[3]}of{c[2]}-{c[4]}-{c[5]}x{c[6]}-k{c[7]}s{c[8]}"
                                  for c in MB_CASES])


@DEVICES
@DTYPES
@FORMATS
@KINDS
@pytest.mark.parametrize("act", ACT_NAMES)
@MB
def test_mbconv_train(device, dtype, fmt, kind, act, case):
    n, cin, c_max, c, cout, h, w, k, stride = case
    rng = rng_for(case, kind, act, dtype, device)
    eps, momentum = 1e-5, 0.1
    x = inject(randn((n, cin, h, w), dtype, device, rng, fmt), kind, rng)
    params = [randn(s, dtype, device, rng) for s in
              [(c_max, cin + 2, 1, 1), (c_max,), (c_max,), (c_max, 1, k, k), (c_max,), (c_max,),
               (cout, c_max, 1, 1)]]
    ins_a = [leaf(x)] + [leaf(p) for p in params]
    ins_b = [leaf(x)] + [leaf(p) for p in params]
    xa, ew, b1w, b1b, dww, b2w, b2b, pw = ins_a
    p, zsum, zsq, ysum, ysq = mbconv_train(xa, ew, b1w, b1b, dww, b2w, b2b, pw, c, stride, act,
                                           eps, eps)
    bufs = [running_buffers(c_max, dtype, device, rng) for _ in range(2)]
    refbufs = [(m.clone(), v.clone()) for m, v in bufs]
    xb, ew, b1w, b1b, dww, b2w, b2b, pw = ins_b
    z = F.conv2d(xb, ew[:c, :cin])
    a = act_ref(act, bn_train_ref(z, b1w, b1b, eps, *refbufs[0], momentum))
    y = F.conv2d(a, dww[:c], None, stride, k // 2, 1, c)
    hh = act_ref(act, bn_train_ref(y, b2w, b2b, eps, *refbufs[1], momentum))
    ref = F.conv2d(hh, pw[:, :c])
    check_all([p, zsum, zsq, ysum, ysq], [ref, *sums_ref(z), *sums_ref(y)],
              ["p", "zsum", "zsumsq", "ysum", "ysumsq"], dtype == torch.float64)
    nbt = torch.zeros((), dtype=torch.long, device=device)
    bn_update_running_stats_(*bufs[0], nbt, zsum, zsq, n * h * w, momentum)
    bn_update_running_stats_(*bufs[1], nbt, ysum, ysq, y.shape[0] * y.shape[2] * y.shape[3],
                             momentum)
    lenient = running_stats_lenience(bufs[0][0], device)
    check_all([*bufs[0], *bufs[1]], [*refbufs[0], *refbufs[1]],
              ["bn1 running_mean", "bn1 running_var", "bn2 running_mean", "bn2 running_var"],
              either_nan={**lenient, **{i + 2: m for i, m in lenient.items()}})
    ups = upstream([ref], rng)
    check_all(grads([p], ins_a, ups), grads([ref], ins_b, ups),
              ["grad_x", "grad_expand_w", "grad_bn1_w", "grad_bn1_b", "grad_dw_w", "grad_bn2_w",
               "grad_bn2_b", "grad_project_w"])


@DEVICES
@DTYPES
@FORMATS
@KINDS
@pytest.mark.parametrize("act", ACT_NAMES)
@MB
def test_mbconv_folded(device, dtype, fmt, kind, act, case):
    n, cin, _, c, cout, h, w, k, stride = case
    rng = rng_for(case, kind, act, dtype, device)
    for residual in ([False, True] if stride == 1 else [False]):
        co = cin if residual else cout
        x = inject(randn((n, cin, h, w), dtype, device, rng, fmt), kind, rng)
        ew, eb = randn((c, cin, 1, 1), dtype, device, rng), randn((c,), dtype, device, rng)
        dww, dwb = randn((c, 1, k, k), dtype, device, rng), randn((c,), dtype, device, rng)
        pw, pb = randn((co, c, 1, 1), dtype, device, rng), randn((co,), dtype, device, rng)
        with torch.no_grad():
            out = mbconv_folded(x, ew, eb, dww, dwb, pw, pb, stride, act, residual)
            hh = act_ref(act, F.conv2d(x, ew, eb))
            hh = act_ref(act, F.conv2d(hh, dww, dwb, stride, k // 2, 1, c))
            ref = F.conv2d(hh, pw, pb) + (x if residual else 0)
        assert_same_nonfinite(out, ref, f"out (residual={residual})")


# ------------------------------------------------------------------------ spring block


def block_reference(block, x, c, training, stats, act):
    """The block as F.conv2d / F.batch_norm / activation on sliced weights; `stats`
    holds clones of the running buffers, updated like the block's prefix."""
    k, s = block.kernel_size, block.stride

    def bn(name, h, n):
        m = getattr(block, name)
        mean, var = stats[name]
        return F.batch_norm(h, mean[:n], var[:n], m.weight[:n], m.bias[:n], training,
                            m.momentum, m.eps)

    h = act_ref(act, bn("expand_bn", F.conv2d(x, block.expand.weight[:c]), c))
    h = act_ref(act, bn("depthwise_bn",
                        F.conv2d(h, block.depthwise.weight[:c], None, s, k // 2, 1, c), c))
    h = bn("project_bn", F.conv2d(h, block.project.weight[:, :c]), block.out_channels)
    return h + x if block.residual else h


BN_NAMES = ("expand_bn", "depthwise_bn", "project_bn")


def block_params(b):
    return [b.expand.weight, b.depthwise.weight, b.project.weight] + [
        getattr(getattr(b, n), a) for n in BN_NAMES for a in ("weight", "bias")]


@DEVICES
@DTYPES
@pytest.mark.parametrize("fmt,cl_inside", [(torch.contiguous_format, True),
                                           (torch.contiguous_format, False),
                                           (torch.channels_last, True)],
                         ids=["nchw", "nchw-direct", "cl"])
@KINDS
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(16, 16, 96, 48, 5, 1, "relu6"), (8, 12, 40, 23, 3, 2, "relu6"),
                                   (8, 8, 24, 24, 7, 1, "relu")],
                         ids=["16-48of96-k5", "8-23of40-12-k3s2", "8-24-k7-relu"])
def test_spring_block(device, dtype, fmt, cl_inside, kind, training, shape):
    cin, cout, max_w, width, k, stride, act = shape
    rng = rng_for(shape, kind, training, dtype, device)
    torch.manual_seed(rng.randrange(2**31))
    block = SpringBlock(cin, cout, max_w, k, stride, act).to(device=device, dtype=dtype)
    block.CPU_TRAIN_CHANNELS_LAST = cl_inside
    with torch.no_grad():
        for n in BN_NAMES:
            bn = getattr(block, n)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    block.width = width
    block.train(training)
    ref_block = copy.deepcopy(block)
    stats = {n: (getattr(ref_block, n).running_mean.clone(),
                 getattr(ref_block, n).running_var.clone()) for n in BN_NAMES}
    x = inject(randn((4, cin, 12, 12), dtype, device, rng, fmt), kind, rng, 1)
    if not training:  # inference: the folded op
        with torch.no_grad():
            y = block(x)
            ref = block_reference(ref_block, x, width, False, stats, act)
        assert_same_nonfinite(y, ref, "y")
        return
    xa, xb = leaf(x), leaf(x)
    y = block(xa)
    ref = block_reference(ref_block, xb, width, True, stats, act)
    assert_same_nonfinite(y, ref, "y")
    ups = upstream([ref], rng)
    names = ["grad_x", "grad_expand_w", "grad_dw_w", "grad_project_w"] + [
        f"grad_{n}.{a}" for n in BN_NAMES for a in ("weight", "bias")]
    check_all(grads([y], [xa, *block_params(block)], ups),
              grads([ref], [xb, *block_params(ref_block)], ups), names)
    for n in BN_NAMES:
        m = getattr(block, n)
        check_all([m.running_mean, m.running_var], list(stats[n]),
                  [f"{n}.running_mean", f"{n}.running_var"],
                  either_nan=running_stats_lenience(m.running_mean, device))


def test_spring_block_user_report():
    """One NaN pixel of a 4x16x12x12 float64 input, width 48 of 96, k5: NaN across the
    receptive field as in PyTorch (everything in training: the batch statistics are NaN;
    5 x 5 pixels x 16 channels in eval), and an Inf input gives NaN in training."""
    torch.manual_seed(0)
    block = SpringBlock(16, 16, 96, 5, 1).double()
    block.width = 48
    x = torch.randn(4, 16, 12, 12, dtype=torch.float64)
    x[1, 3, 6, 6] = float("nan")
    with torch.no_grad():  # before training has made the running statistics NaN
        assert int(block.eval()(x).isnan().sum()) == 5 * 5 * 16
    for value in ("nan", "inf"):
        x[1, 3, 6, 6] = float(value)
        assert int(block.train()(x).isnan().sum()) == 4 * 16 * 12 * 12


# ------------------------------------------------------------------------ instruction sets


@pytest.mark.skipif(os.environ.get("BSNAS_CPU_ISA") is not None,
                    reason="already capped (this is the capped run)")
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_cpu_kernels_of_narrower_instruction_sets(isa):
    """The CPU op tests above again with the kernels' AVX2 / generic copies (vector
    widths, masked loads and tails differ); BSNAS_CPU_ISA caps the choice at load time,
    hence a fresh interpreter."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, BSNAS_CPU_ISA=isa)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    select = "cpu and (dwconv or bn_act or mbconv or stats)"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        os.path.abspath(__file__), "-k", select],
                       env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


# ------------------------------------------------------------------------ supernet step


@DEVICES
@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("act", ["relu6", "relu"])
def test_supernet_step_with_one_nonfinite_pixel(device, kind, act):
    """A training step of the tiny supernet whose input holds one NaN (or Inf) pixel: the
    loss is NaN, and the gradients and BN buffers are non-finite exactly where they are
    through the spring blocks' eager path (F.batch_norm and the activation in PyTorch).

    With ReLU6 the stem's gradient is left out: the blocks hand it back channels_last
    (they train in channels_last on CPU), the eager path NCHW, and ATen's CPU
    hardtanh_backward passes the gradient at NaN in its scalar loop (mixed layouts) but
    not in its vectorised one (module docstring), so the stem's own nn.ReLU6 decides
    differently on the same NaN values."""
    torch.manual_seed(0)
    space = bsnas.load_space("tiny").to_dict()
    space.update(activation=act)
    net = bsnas.Supernet(space).to(device).train()
    arch = bsnas.Arch("tiny", [("k3", 32), ("skip",), ("k5", 48), ("k7", 72), ("k3", 48),
                               ("skip",)])
    net.activate(arch)
    eager = copy.deepcopy(net)
    for m in eager.modules():
        if isinstance(m, SpringBlock):
            m._fused_ok = lambda: False  # the eager path: F.batch_norm + the activation
    x = torch.randn(4, 3, 32, 32, device=device)
    x[2, 1, 17, 9] = float("nan") if kind == "nan" else float("inf")
    target = torch.tensor([0, 1, 2, 3], device=device)
    losses = []
    for model in (net, eager):
        torch.manual_seed(1)  # the same dropout mask
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        losses.append(loss)
    assert losses[0].isnan() and losses[1].isnan()
    for (name, p), q in zip(net.named_parameters(), eager.parameters()):
        if act == "relu6" and name.startswith("stem."):
            continue
        check_all([p.grad], [q.grad], [f"{name}.grad"])
    for (name, b), c in zip(net.named_buffers(), eager.buffers()):
        if b.is_floating_point():
            lenient = running_stats_lenience(b, device) if "running_mean" in name else {}
            check_all([b], [c], [name], either_nan=lenient)
