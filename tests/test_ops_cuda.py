"""CUDA tests of the masked convolutions (`bsnas.masked_dwconv2d`, `bsnas.masked_pwconv2d`)
and of the fused `bsnas.ops.bn_act_dwconv2d`.

Skipped unless a GPU is present and bsnas._C was built with its CUDA kernels. References
are `F.conv2d` over the sliced weight, computed in float64 on the same (rounded) inputs,
so each tolerance below bounds the error of the op under test alone:

- float64: 1e-10 relative; float32: 1e-4 relative to the largest reference magnitude;
- float16 / bfloat16 (accumulated in float32, one rounding of the result):
  depthwise 2e-3 / 1.6e-2, pointwise (cuBLAS, which may reduce in half precision)
  1e-2 / 3e-2, relative to the largest reference magnitude;
- bn_act_dwconv2d (every output and gradient, including sum / sumsq and the gradients
  through them, against the unfused float64 composite: affine, F.relu / F.relu6,
  F.conv2d, y.sum, (y * y).sum): float16 / bfloat16 4e-3 / 3e-2 relative to the
  largest reference magnitude. Looser than the depthwise bound because the statistics
  are sums of the rounded y and the backward's 2 * y * grad_sumsq term reads the
  rounded y, so two roundings of half precision reach each result.

Tests whose names contain `smoke` are small, cover every kernel variant and compare
against CPU float64 (no cuDNN): benchmarks/gpu_check.sh runs them under
compute-sanitizer.
"""
from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

import bsnas
from bsnas.ops import bn_act_dwconv2d

_HAVE_CUDA = torch.cuda.is_available() and bsnas.cuda_compiled()
if os.environ.get("BSNAS_REQUIRE_CUDA") == "1" and not _HAVE_CUDA:
    # benchmarks/gpu_check.sh sets this so that a broken setup fails instead of skipping.
    raise RuntimeError(f"BSNAS_REQUIRE_CUDA=1 but torch.cuda.is_available() = "
                       f"{torch.cuda.is_available()}, bsnas.cuda_compiled() = "
                       f"{bsnas.cuda_compiled()}")
pytestmark = pytest.mark.skipif(not _HAVE_CUDA,
                                reason="needs a CUDA device and a CUDA build of bsnas._C")

DW_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
PW_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full-precision float32 matmuls and convolutions for the duration of a test."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _close(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max(|expected|), in float64; no NaN/inf."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    if e.numel() == 0:
        return
    scale = max(e.abs().max().item(), 1e-12)
    err = (a.to(e.device) - e).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * {scale:.3g}"


def _format(x):
    """The layout every op returns (compute_format in csrc/ops/masked_conv_common.h)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# ------------------------------------------------------------------------- depthwise


def _dw_reference(x, w, width, s, p, d, gy):
    """F.conv2d over w[:width] in float64 on x's device: (y, grad_x, grad_w full)."""
    xr = x.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True)
    y = F.conv2d(xr, wr[:width], None, s, p, d, groups=width)
    gx, gw = torch.autograd.grad(y, (xr, wr), gy.double())
    return y.detach(), gx, gw


def _dw_check(N, c_max, width, H, W, k, s, p, d, dtype, fmt, device="cuda", ref_device=None):
    """Runs the op forward and backward through autograd and compares with F.conv2d."""
    g = torch.Generator().manual_seed(N * 1000003 + c_max * 1009 + H * 31 + k)
    x = torch.randn(N, width, H, W, generator=g).to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=fmt).requires_grad_(True)
    w = torch.randn(c_max, 1, k, k, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    y = bsnas.masked_dwconv2d(x, w, width, s, p, d)
    gy = torch.randn(y.shape, generator=g).to(device=device, dtype=dtype)
    gy = gy.contiguous(memory_format=fmt)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    rdev = ref_device or device
    ry, rgx, rgw = _dw_reference(x.to(rdev), w.to(rdev), width, s, p, d, gy.to(rdev))
    tol = DW_TOL[dtype]
    tag = f"N={N} C_max={c_max} width={width} {H}x{W} k={k} s={s} p={p} d={d} {dtype} {fmt}"
    assert y.dtype == dtype and gx.dtype == dtype and gw.dtype == dtype
    assert y.device == x.device and gw.shape == w.shape and gx.shape == x.shape
    assert y.is_contiguous(memory_format=_format(x)), tag
    _close(y, ry, tol, "y " + tag)
    _close(gx, rgx, tol, "grad_x " + tag)
    _close(gw, rgw, tol, "grad_w " + tag)
    assert (gw[width:] == 0).all(), "grad_w must be zero past the active width"


def _random_dw_case(rng, k, s):
    d = rng.choice([1, 1, 2])
    p = rng.randint(0, d * (k - 1) // 2 + 1)
    lo = max(1, d * (k - 1) + 1 - 2 * p)  # the smallest input with an output
    c_max = rng.randint(1, 72)
    return dict(N=rng.randint(1, 3), c_max=c_max, width=rng.randint(1, c_max),
                H=rng.randint(lo, lo + 20), W=rng.randint(lo, lo + 20), k=k, s=s, p=p, d=d)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_dw_float32_matches_conv2d(k, stride, fmt):
    rng = random.Random(f"{k}-{stride}-{fmt}")
    for _ in range(4):
        _dw_check(**_random_dw_case(rng, k, stride), dtype=torch.float32, fmt=FORMATS[fmt])


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [3, 5, 7])
def test_dw_other_dtypes_match_conv2d(k, dtype, fmt):
    rng = random.Random(f"{k}-{dtype}-{fmt}")
    for s in (1, 2):
        _dw_check(**_random_dw_case(rng, k, s), dtype=dtype, fmt=FORMATS[fmt])


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("k,s,d", [(1, 1, 1), (9, 1, 1), (3, 3, 1), (5, 3, 2), (11, 2, 1)])
def test_dw_runtime_kernel_size_and_stride(k, s, d, fmt):
    """k outside {3, 5, 7} and strides outside {1, 2} take the runtime-parameter kernels."""
    rng = random.Random(f"{k}-{s}-{d}-{fmt}")
    for dtype in (torch.float32, torch.float16):
        case = _random_dw_case(rng, k, s)
        case["d"] = d
        case["p"] = d * (k - 1) // 2
        _dw_check(**case, dtype=dtype, fmt=FORMATS[fmt])


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_dw_weight_grad_split_reduction(dtype, fmt):
    """Few channels over many positions: the weight reduction splits over the grid."""
    for c_max, width, k in ((4, 3, 3), (8, 8, 7), (2, 1, 5)):
        _dw_check(N=8, c_max=c_max, width=width, H=64, W=48, k=k, s=1, p=k // 2, d=1,
                  dtype=dtype, fmt=FORMATS[fmt])


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_dw_backward_is_deterministic(fmt):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 6, 40, 40, generator=g).cuda().contiguous(memory_format=FORMATS[fmt])
    w = torch.randn(8, 1, 5, 5, generator=g).cuda()
    gy = torch.randn(16, 6, 40, 40, generator=g).cuda().contiguous(memory_format=FORMATS[fmt])
    a = torch.ops.bsnas._masked_dwconv2d_backward(gy, x, w, 6, 1, 2, 1)
    b = torch.ops.bsnas._masked_dwconv2d_backward(gy, x, w, 6, 1, 2, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("k,s,p,d", [(3, 1, 1, 1), (3, 2, 0, 1), (5, 2, 3, 2), (7, 1, 3, 1), (9, 3, 2, 1)])
def test_dw_gradcheck_float64(k, s, p, d, fmt):
    g = torch.Generator().manual_seed(k * 7 + s)
    H = d * (k - 1) + 3
    x = torch.randn(2, 3, H, H + 1, generator=g, dtype=torch.float64).cuda()
    x = x.contiguous(memory_format=FORMATS[fmt]).requires_grad_(True)
    w = torch.randn(5, 1, k, k, generator=g, dtype=torch.float64).cuda().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: bsnas.masked_dwconv2d(a, b, 3, s, p, d), (x, w), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dw_opcheck(dtype, fmt):
    x = torch.randn(2, 5, 9, 8, device="cuda", dtype=dtype).contiguous(memory_format=FORMATS[fmt])
    w = torch.randn(7, 1, 3, 3, device="cuda", dtype=dtype)
    torch.library.opcheck(torch.ops.bsnas.masked_dwconv2d.default,
                          (x.requires_grad_(True), w.requires_grad_(True), 5, 2, 1, 1))
    gy = torch.randn(2, 5, 5, 4, device="cuda", dtype=dtype).contiguous(memory_format=FORMATS[fmt])
    torch.library.opcheck(torch.ops.bsnas._masked_dwconv2d_backward.default,
                          (gy, x.detach(), w.detach(), 5, 2, 1, 1))


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_dw_empty_batch(fmt):
    x = torch.randn(0, 4, 8, 8, device="cuda").contiguous(memory_format=FORMATS[fmt])
    w = torch.randn(6, 1, 3, 3, device="cuda", requires_grad=True)
    y = bsnas.masked_dwconv2d(x.requires_grad_(True), w, 4)
    assert y.shape == (0, 4, 8, 8)
    gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert gx.shape == x.shape and gw.shape == w.shape and (gw == 0).all()


def test_dw_non_dense_inputs():
    """Strided views of x, weight and grad_out are made dense first, like on CPU."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(3, 10, 20, 22, generator=g).cuda()
    x = big[:, 1:7, ::2, 1:19]  # non-contiguous, 6 channels
    wbig = torch.randn(8, 1, 5, 5, 2, generator=g).cuda()
    w = wbig[..., 0]  # non-contiguous weight
    y = bsnas.masked_dwconv2d(x, w, 6, 1, 2, 1)
    ry = F.conv2d(x.double(), w.double()[:6], None, 1, 2, 1, groups=6)
    _close(y, ry, DW_TOL[torch.float32], "non-dense forward")
    gy = torch.randn(3, 6, 10, 18, 2, generator=g).cuda()[..., 1]
    gx, gw = torch.ops.bsnas._masked_dwconv2d_backward(gy, x, w, 6, 1, 2, 1)
    _, rgx, rgw = _dw_reference(x, w, 6, 1, 2, 1, gy)
    _close(gx, rgx, DW_TOL[torch.float32], "non-dense grad_x")
    _close(gw, rgw, DW_TOL[torch.float32], "non-dense grad_w")


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_dw_int64_indexing(fmt):
    """More than 2**31 elements: the int64-index kernels. Needs about 32 GB free."""
    free, _ = torch.cuda.mem_get_info()
    if free < 34 * 2**30:
        pytest.skip(f"needs ~34 GiB free GPU memory, {free / 2**30:.1f} GiB free")
    N, C, H, W = 1, 2, 32800, 32800  # 2.15e9 elements
    mf = FORMATS[fmt]
    torch.manual_seed(0)
    x = torch.randn(N, C, H, W, device="cuda").contiguous(memory_format=mf)
    w = torch.randn(3, 1, 3, 3, device="cuda")
    wc = w[:C].double()
    y = bsnas.masked_dwconv2d(x, w, C, 1, 1, 1)
    # The last rows hold the largest indices: compare them with F.conv2d over a crop.
    ref = F.conv2d(x[:, :, -16:, :].double(), wc, None, 1, 1, 1, groups=C)[:, :, -8:, :]
    _close(y[:, :, -8:, :], ref, DW_TOL[torch.float32], "int64 forward tail")
    _close(y[:, :, :8, :], F.conv2d(x[:, :, :16, :].double(), wc, None, 1, 1, 1, groups=C)[:, :, :8, :],
           DW_TOL[torch.float32], "int64 forward head")
    del y
    gy = torch.randn(N, C, H, W, device="cuda").contiguous(memory_format=mf)
    gx, _ = torch.ops.bsnas._masked_dwconv2d_backward(gy, x, w, C, 1, 1, 1)
    gyc = gy[:, :, -16:, :].double()
    xc = x[:, :, -16:, :].double().requires_grad_(True)
    (rgx,) = torch.autograd.grad(F.conv2d(xc, wc, None, 1, 1, 1, groups=C), (xc,), gyc)
    _close(gx[:, :, -8:, :], rgx[:, :, -8:, :], DW_TOL[torch.float32], "int64 grad_x tail")
    del gx
    # x = c + 1 on channel c and grad_out = 1 on the last 3 rows only: grad_w[c, kh, kw]
    # is (c + 1) * (valid rows of tap kh) * (valid columns of tap kw), exact in float32.
    x.fill_(1)
    x[:, 1].fill_(2)
    gy.zero_()
    gy[:, :, -3:, :] = 1
    _, gw = torch.ops.bsnas._masked_dwconv2d_backward(gy, x, w, C, 1, 1, 1)
    rows = torch.tensor([3, 3, 2], dtype=torch.float64)
    cols = torch.tensor([W - 1, W, W - 1], dtype=torch.float64)
    count = torch.arange(1, C + 1, dtype=torch.float64)[:, None, None] * rows[:, None] * cols
    _close(gw[:C, 0].cpu(), count, 1e-7, "int64 grad_w counts")
    assert (gw[C:] == 0).all()


# Small cases for every kernel variant, compared with CPU float64; run under
# compute-sanitizer by benchmarks/gpu_check.sh (no cuDNN involved on the GPU side).
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("k", [3, 5, 7, 9])
def test_dw_smoke(k, dtype, fmt):
    for s, d in ((1, 1), (2, 1), (3, 2)):
        p = d * (k - 1) // 2
        _dw_check(N=2, c_max=11, width=9, H=d * (k - 1) + 4, W=d * (k - 1) + 6, k=k, s=s, p=p,
                  d=d, dtype=dtype, fmt=FORMATS[fmt], ref_device="cpu")


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_dw_smoke_split_reduction(fmt):
    _dw_check(N=4, c_max=3, width=2, H=34, W=33, k=3, s=1, p=1, d=1, dtype=torch.float32,
              fmt=FORMATS[fmt], ref_device="cpu")
    _dw_check(N=2, c_max=130, width=130, H=9, W=8, k=5, s=2, p=2, d=1, dtype=torch.float32,
              fmt=FORMATS[fmt], ref_device="cpu")


def _misaligned_channels_last(t):
    """A channels_last copy of t whose data starts one element past an aligned address,
    so the vector loads of the channels_last run kernel must not be used."""
    n, c, h, w = t.shape
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    v = buf[1:].as_strided((n, c, h, w), (h * w * c, 1, w * c, c))
    v.copy_(t)
    assert v.is_contiguous(memory_format=torch.channels_last) and v.data_ptr() % 8 != 0
    return v


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("k", [3, 5, 7])
def test_dw_channels_last_runs(k, dtype):
    """The channels_last run kernel (forward stride 1/2, stride-1 input gradient): widths
    that take the vector loads (multiples of 4, 2 for float64) or not, more than one
    channel tile, rows not a multiple of the 8-output run, padding up to k."""
    rng = random.Random(f"runs-{k}-{dtype}")
    for width in (4, 8, 36, 130, 200, 7):
        s = rng.choice([1, 2])
        p = rng.randint(0, k)
        lo = max(1, k - 2 * p)
        _dw_check(N=rng.randint(1, 3), c_max=width + rng.randint(0, 9), width=width,
                  H=rng.randint(lo, lo + 19), W=rng.randint(lo, lo + 27), k=k, s=s, p=p, d=1,
                  dtype=dtype, fmt=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("width", [8, 5])
def test_dw_runs_smoke_misaligned(width, dtype):
    """Vector-width channels at an address that is not 16-byte aligned: the scalar loads;
    compared with CPU float64 (run under compute-sanitizer by gpu_check.sh)."""
    g = torch.Generator().manual_seed(width)
    for k, s in ((3, 1), (7, 2), (5, 1)):
        x = _misaligned_channels_last(torch.randn(2, width, 13, 17, generator=g).to("cuda", dtype))
        w = torch.randn(width + 2, 1, k, k, generator=g).to("cuda", dtype)
        y = bsnas.masked_dwconv2d(x, w, width, s, k // 2, 1)
        gy = _misaligned_channels_last(torch.randn(y.shape, generator=g).to("cuda", dtype))
        gx, gw = torch.ops.bsnas._masked_dwconv2d_backward(gy, x, w, width, s, k // 2, 1)
        ry, rgx, rgw = _dw_reference(x.cpu(), w.cpu(), width, s, k // 2, 1, gy.cpu())
        tol = DW_TOL[dtype]
        _close(y, ry, tol, f"y k={k} s={s}")
        _close(gx, rgx, tol, f"grad_x k={k} s={s}")
        _close(gw, rgw, tol, f"grad_w k={k} s={s}")


# ------------------------------------------------------------------------- pointwise


def _pw_check(N, in_max, out_max, in_w, out_w, H, W, dtype, fmt, ref_device=None):
    g = torch.Generator().manual_seed(N * 7919 + in_max * 101 + out_w)
    x = torch.randn(N, in_w, H, W, generator=g).to(device="cuda", dtype=dtype)
    x = x.contiguous(memory_format=fmt).requires_grad_(True)
    w = torch.randn(out_max, in_max, 1, 1, generator=g).to(device="cuda", dtype=dtype)
    w.requires_grad_(True)
    y = bsnas.masked_pwconv2d(x, w, in_w, out_w)
    gy = torch.randn(y.shape, generator=g).to(device="cuda", dtype=dtype)
    gy = gy.contiguous(memory_format=fmt)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    rdev = ref_device or "cuda"
    xr = x.detach().to(rdev).double().requires_grad_(True)
    wr = w.detach().to(rdev).double().requires_grad_(True)
    ry = F.conv2d(xr, wr[:out_w, :in_w])
    rgx, rgw = torch.autograd.grad(ry, (xr, wr), gy.to(rdev).double())
    tol = PW_TOL[dtype]
    tag = f"N={N} W[{out_max},{in_max}] active [{out_w},{in_w}] {H}x{W} {dtype} {fmt}"
    assert y.dtype == gx.dtype == gw.dtype == dtype and gw.shape == w.shape
    assert y.is_contiguous(memory_format=_format(x)), tag
    _close(y, ry.detach(), tol, "y " + tag)
    _close(gx, rgx, tol, "grad_x " + tag)
    _close(gw, rgw, tol, "grad_w " + tag)
    outside = torch.ones(out_max, in_max, dtype=torch.bool, device="cuda")
    outside[:out_w, :in_w] = False
    assert (gw[..., 0, 0][outside] == 0).all(), "grad_w must be zero outside the active block"


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_pw_matches_conv2d(dtype, fmt):
    rng = random.Random(f"pw-{dtype}-{fmt}")
    for _ in range(4):
        in_max, out_max = rng.randint(1, 96), rng.randint(1, 96)
        _pw_check(N=rng.randint(1, 4), in_max=in_max, out_max=out_max,
                  in_w=rng.randint(1, in_max), out_w=rng.randint(1, out_max),
                  H=rng.randint(1, 17), W=rng.randint(1, 17), dtype=dtype, fmt=FORMATS[fmt])


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_pw_smoke(fmt):
    for dtype in (torch.float32, torch.float16):
        _pw_check(N=2, in_max=12, out_max=20, in_w=7, out_w=13, H=5, W=6, dtype=dtype,
                  fmt=FORMATS[fmt], ref_device="cpu")


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_pw_opcheck(fmt):
    x = torch.randn(2, 5, 6, 7, device="cuda").contiguous(memory_format=FORMATS[fmt])
    w = torch.randn(9, 8, 1, 1, device="cuda")
    torch.library.opcheck(torch.ops.bsnas.masked_pwconv2d.default,
                          (x.requires_grad_(True), w.requires_grad_(True), 5, 7))


def test_pw_gradcheck_float64():
    x = torch.randn(2, 3, 4, 5, device="cuda", dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 1, 1, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: bsnas.masked_pwconv2d(a, b, 3, 5), (x, w))


# ------------------------------------------------------------------ fused bn_act_dwconv2d

BNACT_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 4e-3,
             torch.bfloat16: 3e-2}
ACT_NAMES = ["identity", "relu", "relu6"]  # activation codes 0, 1, 2
ACT_FNS = {"identity": lambda t: t, "relu": F.relu, "relu6": F.relu6}


def _bnact_reference(z, scale, shift, w, width, s, p, d, act, grads):
    """The unfused float64 composite: (y, sum, sumsq) and the gradients of
    sum(grads[i] * outputs[i]) w.r.t. (z, scale, shift, w)."""
    zr, sr, br, wr = (t.detach().double().requires_grad_(True) for t in (z, scale, shift, w))
    a = ACT_FNS[act](zr * sr.view(1, -1, 1, 1) + br.view(1, -1, 1, 1))
    y = F.conv2d(a, wr[:width], None, s, p, d, groups=width)
    outs = (y, y.sum((0, 2, 3)), (y * y).sum((0, 2, 3)))
    loss = sum((g.double() * o).sum() for g, o in zip(grads, outs))
    return [o.detach() for o in outs], torch.autograd.grad(loss, (zr, sr, br, wr))


def _bnact_inputs(N, c_max, width, H, W, k, dtype, fmt, device, seed):
    """z, scale, shift, weight (requiring grad); weights scaled by 1/k so that sumsq stays
    well inside float16's range."""
    g = torch.Generator().manual_seed(seed)
    z = (1.5 * torch.randn(N, width, H, W, generator=g)).to(device=device, dtype=dtype)
    z = z.contiguous(memory_format=fmt)
    scale = (torch.rand(width, generator=g) + 0.5).to(device=device, dtype=dtype)
    shift = torch.randn(width, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(c_max, 1, k, k, generator=g) / k).to(device=device, dtype=dtype)
    return [t.requires_grad_(True) for t in (z, scale, shift, w)], g


def _bnact_check(N, c_max, width, H, W, k, s, p, d, dtype, fmt, act, device="cuda",
                 ref_device=None, zero_sumsq_grad=False):
    """Forward and backward (upstream gradients on all three outputs) against the float64
    composite."""
    (z, scale, shift, w), g = _bnact_inputs(N, c_max, width, H, W, k, dtype, fmt, device,
                                            N * 7 + c_max * 131 + H * 17 + k * 3 + s)
    outs = bn_act_dwconv2d(z, scale, shift, w, width, s, p, d, act)
    # y's gradient in its dtype; the statistics (and their gradients) are float64.
    grads = [torch.randn(o.shape, generator=g).to(device=device, dtype=o.dtype) for o in outs]
    grads[0] = grads[0].contiguous(memory_format=fmt)
    if zero_sumsq_grad:  # the kernels then skip reading y
        grads[2].zero_()
    d_got = torch.autograd.grad(outs, (z, scale, shift, w), grads)
    rdev = ref_device or device
    r_outs, r_grads = _bnact_reference(*(t.to(rdev) for t in (z, scale, shift, w)), width, s,
                                       p, d, act, [t.to(rdev) for t in grads])
    tol = BNACT_TOL[dtype]
    tag = (f"N={N} C_max={c_max} width={width} {H}x{W} k={k} s={s} p={p} d={d} {act} "
           f"{dtype} {fmt}")
    names = ["y", "sum", "sumsq", "grad_z", "grad_scale", "grad_shift", "grad_weight"]
    for name, a, b in zip(names, [*outs, *d_got], [*r_outs, *r_grads]):
        want_dtype = torch.float64 if name in ("sum", "sumsq") else dtype
        assert a.dtype == want_dtype and a.device == z.device, (name, tag)
        _close(a, b, tol, f"{name} {tag}")
    assert outs[0].is_contiguous(memory_format=_format(z)), tag
    assert d_got[0].is_contiguous(memory_format=_format(z)), tag
    assert (d_got[3][width:] == 0).all(), "grad_weight must be zero past the active width"


def _random_bnact_case(rng, k, s):
    c_max = rng.randint(1, 72)
    return dict(N=rng.randint(1, 3), c_max=c_max, width=rng.randint(1, c_max),
                H=rng.randint(k // 2 + 1, k // 2 + 20), W=rng.randint(k // 2 + 1, k // 2 + 20),
                k=k, s=s, p=k // 2, d=1)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_bnact_matches_reference(dtype, fmt):
    rng = random.Random(f"bnact-{dtype}-{fmt}")
    for i, (k, s) in enumerate([(3, 1), (3, 2), (5, 1), (5, 2), (7, 1), (7, 2)]):
        _bnact_check(**_random_bnact_case(rng, k, s), dtype=dtype, fmt=FORMATS[fmt],
                     act=ACT_NAMES[i % 3], zero_sumsq_grad=i == 4)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("k,s,d", [(1, 1, 1), (9, 1, 1), (3, 3, 1), (5, 3, 2), (3, 1, 2)])
def test_bnact_runtime_kernel_size_stride_dilation(k, s, d, fmt):
    """k outside {3, 5, 7}, strides outside {1, 2} and dilation: the runtime-parameter
    kernels and the generic gather index."""
    rng = random.Random(f"bnact-{k}-{s}-{d}-{fmt}")
    for dtype, act in ((torch.float64, "relu6"), (torch.float32, "relu"),
                       (torch.float16, "identity")):
        case = _random_bnact_case(rng, k, s)
        case["d"], case["p"] = d, d * (k - 1) // 2
        case["H"] += d * (k - 1)
        case["W"] += d * (k - 1)
        _bnact_check(**case, dtype=dtype, fmt=FORMATS[fmt], act=act)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_bnact_split_reduction(dtype, fmt):
    """Few channels over many positions: every per-channel reduction (statistics, weight
    gradient, grad_scale / grad_shift) splits over the grid and is summed by sum_splits."""
    for c_max, width, k in ((4, 3, 3), (8, 8, 7), (2, 1, 5)):
        _bnact_check(N=8, c_max=c_max, width=width, H=64, W=48, k=k, s=1, p=k // 2, d=1,
                     dtype=dtype, fmt=FORMATS[fmt], act="relu6")


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("act", ACT_NAMES)
def test_bnact_gradcheck_float64(act, fmt):
    (z, scale, shift, w), _ = _bnact_inputs(2, 5, 3, 7, 8, 3, torch.float64, FORMATS[fmt],
                                            "cuda", seed=11)
    assert torch.autograd.gradcheck(
        lambda *t: bn_act_dwconv2d(*t, 3, 2, 1, 1, act), (z, scale, shift, w),
        atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bnact_opcheck(dtype, fmt):
    (z, scale, shift, w), _ = _bnact_inputs(2, 7, 5, 9, 8, 3, dtype, FORMATS[fmt], "cuda", seed=2)
    torch.library.opcheck(torch.ops.bsnas.bn_act_dwconv2d.default,
                          (z, scale, shift, w, 5, 2, 1, 1, 2))
    y, ys, yq = torch.ops.bsnas.bn_act_dwconv2d(z, scale, shift, w, 5, 2, 1, 1, 2)
    gy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.bsnas._bn_act_dwconv2d_backward.default,
                          (gy, torch.randn_like(ys), torch.randn_like(yq), z.detach(),
                           scale.detach(), shift.detach(), w.detach(), y.detach(), 5, 2, 1,
                           1, 2))


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_bnact_is_deterministic(fmt):
    """Fixed-order reductions, no atomics: two runs are bit-identical."""
    (z, scale, shift, w), g = _bnact_inputs(16, 8, 6, 40, 40, 5, torch.float32, FORMATS[fmt],
                                            "cuda", seed=5)
    z, scale, shift, w = (t.detach() for t in (z, scale, shift, w))
    op = torch.ops.bsnas.bn_act_dwconv2d
    a = op(z, scale, shift, w, 6, 1, 2, 1, 2)
    b = op(z, scale, shift, w, 6, 1, 2, 1, 2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    grads = (torch.randn(a[0].shape, generator=g).cuda().contiguous(memory_format=FORMATS[fmt]),
             torch.randn(6, generator=g, dtype=torch.float64).cuda(),
             torch.randn(6, generator=g, dtype=torch.float64).cuda())  # the statistics are float64
    bwd = torch.ops.bsnas._bn_act_dwconv2d_backward
    a = bwd(*grads, z, scale, shift, w, a[0], 6, 1, 2, 1, 2)
    b = bwd(*grads, z, scale, shift, w, b[0], 6, 1, 2, 1, 2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_bnact_activation_kinks(fmt):
    """u = z * scale + shift exactly 0 or 6: the gradient there is 0, as F.relu / F.relu6
    autograd define it; everything matches the composite."""
    vals = torch.tensor([-1.0, 0.0, 0.5, 3.0, 6.0, 7.0, 3.0, 4.5], dtype=torch.float64)
    z = vals[torch.randperm(8, generator=torch.Generator().manual_seed(0))].repeat(2, 3, 6, 1)
    z = z.cuda().contiguous(memory_format=FORMATS[fmt]).requires_grad_(True)
    scale = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64, device="cuda", requires_grad=True)
    shift = torch.tensor([0.0, -6.0, 1.5], dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    u = z.detach() * scale.detach().view(1, -1, 1, 1) + shift.detach().view(1, -1, 1, 1)
    assert (u == 0).any() and (u == 6).any()
    for act in ACT_NAMES:
        outs = bn_act_dwconv2d(z, scale, shift, w, 3, 1, 1, 1, act)
        grads = [torch.randn_like(o) for o in outs]
        d_got = torch.autograd.grad(outs, (z, scale, shift, w), grads)
        r_outs, r_grads = _bnact_reference(z, scale, shift, w, 3, 1, 1, 1, act, grads)
        for a, b in zip([*outs, *d_got], [*r_outs, *r_grads]):
            _close(a, b, BNACT_TOL[torch.float64], f"kinks {act}")
        if act == "relu":
            assert (d_got[0][u <= 0] == 0).all()
        if act == "relu6":
            assert (d_got[0][(u <= 0) | (u >= 6)] == 0).all()


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_bnact_matches_cpu_kernels(fmt):
    """The CUDA and CPU kernels agree in float64 (both against each other, not only
    against the composite)."""
    for k, s in ((3, 1), (5, 2), (7, 1)):
        (z, scale, shift, w), g = _bnact_inputs(2, 12, 9, 13, 11, k, torch.float64,
                                                FORMATS[fmt], "cpu", seed=k)
        args = (9, s, k // 2, 1, 2)
        cpu = torch.ops.bsnas.bn_act_dwconv2d(z, scale, shift, w, *args)
        gpu = torch.ops.bsnas.bn_act_dwconv2d(*(t.cuda() for t in (z, scale, shift, w)), *args)
        for a, b in zip(gpu, cpu):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12)
        grads = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in cpu]
        bwd = torch.ops.bsnas._bn_act_dwconv2d_backward
        cpu_g = bwd(*grads, z, scale, shift, w, cpu[0], *args)
        gpu_g = bwd(*(t.cuda() for t in (*grads, z, scale, shift, w, cpu[0])), *args)
        for a, b in zip(gpu_g, cpu_g):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_bnact_empty(fmt):
    """An empty batch, and an empty input whose output is all padding."""
    for shape, pad in (((0, 4, 8, 8), 1), ((2, 4, 0, 3), 2)):
        z = torch.randn(*shape, device="cuda").contiguous(memory_format=FORMATS[fmt])
        scale = torch.ones(4, device="cuda", requires_grad=True)
        shift = torch.ones(4, device="cuda", requires_grad=True)
        w = torch.randn(6, 1, 3, 3, device="cuda", requires_grad=True)
        y, ys, yq = bn_act_dwconv2d(z.requires_grad_(True), scale, shift, w, 4, 1, pad)
        assert (y == 0).all() and (ys == 0).all() and (yq == 0).all()
        grads = torch.autograd.grad((y.sum() + ys.sum() + yq.sum()), (z, scale, shift, w))
        assert grads[0].shape == z.shape and all((t == 0).all() for t in grads[1:])


# Small cases for every fused kernel variant, compared with CPU float64; run under
# compute-sanitizer by benchmarks/gpu_check.sh.
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("k", [3, 5, 7, 9])
def test_bnact_smoke(k, fmt):
    for s, d, act in ((1, 1, "relu6"), (2, 1, "relu"), (3, 2, "identity")):
        p = d * (k - 1) // 2
        _bnact_check(N=2, c_max=11, width=9, H=d * (k - 1) + 4, W=d * (k - 1) + 6, k=k, s=s,
                     p=p, d=d, dtype=torch.float32, fmt=FORMATS[fmt], act=act, ref_device="cpu")
    _bnact_check(N=4, c_max=3, width=2, H=34, W=33, k=k, s=1, p=k // 2, d=1,
                 dtype=torch.float32, fmt=FORMATS[fmt], act="relu6", ref_device="cpu")


# --------------------------------------------------------------------------- errors


def test_mismatched_device_raises():
    x = torch.randn(1, 3, 8, 8, device="cuda")
    # The shared check (masked_conv_common.h) reads "<op>: x is on cuda:0 but weight is
    # on cpu": it names both devices but not the word "device".
    pattern = r"(?i)device|cuda.* cpu|cpu.* cuda"
    with pytest.raises(RuntimeError, match=pattern):
        bsnas.masked_dwconv2d(x, torch.randn(4, 1, 3, 3), 3)
    with pytest.raises(RuntimeError, match=pattern):
        bsnas.masked_pwconv2d(x, torch.randn(5, 4, 1, 1), 3, 5)
    y = bsnas.masked_dwconv2d(x, torch.randn(4, 1, 3, 3, device="cuda"), 3)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.bsnas._masked_dwconv2d_backward(y.cpu(), x, torch.randn(4, 1, 3, 3, device="cuda"),
                                                   3, 1, 1, 1)


def test_bnact_mismatched_device_raises():
    z = torch.randn(1, 3, 8, 8, device="cuda")
    w = torch.randn(4, 1, 3, 3, device="cuda")
    s, b = torch.ones(3, device="cuda"), torch.zeros(3, device="cuda")
    with pytest.raises(RuntimeError, match="scale is on cpu but z is on cuda"):
        torch.ops.bsnas.bn_act_dwconv2d(z, s.cpu(), b, w, 3, 1, 1, 1, 2)
    y, ys, yq = torch.ops.bsnas.bn_act_dwconv2d(z, s, b, w, 3, 1, 1, 1, 2)
    with pytest.raises(RuntimeError, match="grad_sum is on cpu but z is on cuda"):
        torch.ops.bsnas._bn_act_dwconv2d_backward(y, ys.cpu(), yq, z, s, b, w, y, 3, 1, 1, 1, 2)


def test_half_precision_rejected_on_cpu_only():
    """float16 is accepted on CUDA (and checked against the CPU error message)."""
    x = torch.randn(1, 2, 5, 5, dtype=torch.float16)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="CUDA only"):
        bsnas.masked_dwconv2d(x, w, 2)
    assert bsnas.masked_dwconv2d(x.cuda(), w.cuda(), 2).dtype == torch.float16
