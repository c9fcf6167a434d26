"""The masked convolution ops on CPU against plain PyTorch on sliced weights."""
import random

import pytest
import torch
import torch.nn.functional as F

import bsnas
from bsnas import masked_dwconv2d, masked_pwconv2d
from bsnas.ops.masked_conv import _format
from fresh_interpreter import GLIBC, run_python

LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _rand(*shape, dtype=torch.float64, fmt=torch.contiguous_format, grad=True):
    t = torch.randn(*shape, dtype=dtype).to(memory_format=fmt)
    return t.requires_grad_(grad)


def _dw_case(rng, dtype, fmt):
    k = rng.choice([1, 3, 5, 7])
    stride = rng.choice([1, 2])
    dilation = rng.choice([1, 1, 2])
    padding = rng.choice([dilation * (k - 1) // 2, 0, 1])
    c_max = rng.randint(1, 40)
    width = rng.randint(1, c_max)
    n = rng.randint(1, 3)
    lo = dilation * (k - 1) + 1 - 2 * padding
    h, w = rng.randint(max(lo, 1), 17), rng.randint(max(lo, 1), 17)
    x = _rand(n, width, h, w, dtype=dtype, fmt=fmt)
    weight = _rand(c_max, 1, k, k, dtype=dtype)
    return x, weight, width, stride, padding, dilation


def _check_against(y, ref, inputs, dtype):
    """y equals ref, and so do their gradients with respect to `inputs` for one random
    upstream gradient; returns y's gradients."""
    _close(y, ref, dtype)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, inputs, g)
    for a, b in zip(grads, torch.autograd.grad(ref, inputs, g)):
        _close(a, b, dtype)
    return grads


def _close(a, b, dtype):
    """float64: elementwise within 1e-10. float32: relative norm error under 1e-5 (the
    reduction order differs from the reference, so single elements may differ more)."""
    if dtype == torch.float64:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    else:
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err < 1e-5, f"relative error {err:.3g}"


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dwconv_matches_sliced_reference(dtype, fmt):
    rng = random.Random(f"{dtype}-{fmt}")  # str seeds are stable across runs
    torch.manual_seed(rng.randint(0, 1 << 30))
    for _ in range(25):
        x, weight, width, s, p, d = _dw_case(rng, dtype, fmt)
        y = masked_dwconv2d(x, weight, width, s, p, d)
        ref = F.conv2d(x, weight[:width], None, s, p, d, width)
        _close(y, ref, dtype)
        assert y.is_contiguous(memory_format=_format(x))  # fmt, unless x is both layouts
        g = torch.randn_like(ref)
        gx, gw = torch.autograd.grad(y, (x, weight), g)
        rx, rw = torch.autograd.grad(ref, (x, weight), g)
        _close(gx, rx, dtype)
        _close(gw, rw, dtype)
        assert gw.shape == weight.shape and not gw[width:].any()


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,c_max,width,h,w,k,s,p,d", [
    (2, 70, 67, 9, 41, 3, 1, 1, 1),    # several vectors per row and channel blocks, ragged
    (1, 20, 17, 23, 38, 5, 2, 2, 1),   # stride 2, even and odd phases
    (2, 9, 9, 17, 16, 3, 3, 1, 1),     # stride 3
    (1, 5, 4, 8, 9, 3, 1, 4, 1),       # padding past the kernel's reach
    (1, 6, 6, 12, 13, 5, 2, 5, 2),     # dilation 2, stride 2, large padding
    (3, 33, 32, 7, 7, 7, 1, 3, 1),     # 7x7 plane, k7
    (1, 4, 3, 1, 1, 1, 1, 0, 1),       # 1x1
    (9, 17, 17, 5, 6, 3, 1, 1, 1),     # more images than one weight-gradient partial
    (2, 50, 45, 60, 70, 5, 1, 2, 1),   # channels_last: several row strips per image
    (1, 40, 37, 66, 50, 7, 2, 3, 1),   # the same at stride 2 (input gradient spread)
    (2, 40, 37, 16, 16, 3, 1, 1, 1),   # NCHW through channel blocks: ragged block, whole pixel chunks
    (1, 24, 19, 28, 28, 7, 2, 0, 1),   # ... at stride 2, no padding
    (1, 20, 18, 32, 32, 7, 1, 3, 1),   # ... k7
    (1, 6, 5, 128, 128, 3, 1, 1, 1),   # ... the largest plane it takes
    (1, 6, 5, 129, 128, 5, 1, 2, 1),   # ... just past it: plane_pass
    (2, 36, 33, 6, 6, 5, 1, 5, 1),     # output rows whose every tap lies in the padding
    (1, 18, 17, 9, 11, 3, 2, 0, 1),    # stride 2, no padding, odd sizes: right-edge windows
    (2, 21, 21, 10, 7, 3, 2, 3, 1),    # stride 2, padding past the kernel's reach
    (5, 35, 33, 28, 29, 3, 1, 1, 1),   # channels_last weight gradient through the window
    (2, 20, 19, 31, 28, 3, 2, 0, 1),   # ... at stride 2, no padding
    (1, 24, 17, 80, 79, 5, 2, 2, 1),   # ... k5 on a large plane
    (1, 9, 9, 81, 78, 7, 1, 4, 1),     # ... k7, padding past the kernel's reach
    (1, 35, 33, 1, 12, 5, 2, 2, 1),    # stride 2, one input row, even width
])
def test_dwconv_unusual_geometry(dtype, fmt, n, c_max, width, h, w, k, s, p, d):
    torch.manual_seed(0)
    x = _rand(n, width, h, w, dtype=dtype, fmt=fmt)
    weight = _rand(c_max, 1, k, k, dtype=dtype)
    y = masked_dwconv2d(x, weight, width, s, p, d)
    ref = F.conv2d(x, weight[:width], None, s, p, d, width)
    _check_against(y, ref, (x, weight), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dwconv_every_run_length(dtype):
    # channels_last rows of 1..40 pixels: window_pass splits each row into runs of as
    # equal lengths as can be, up to 12 pixels (kernel 3, stride 1) or 8, so every run
    # length and split is taken, with masked windows at both borders.
    torch.manual_seed(0)
    for w in range(1, 41):
        for k, s in ((3, 1), (5, 1), (3, 2)):
            x = _rand(1, 19, 3, w, dtype=dtype, fmt=torch.channels_last, grad=False)
            weight = _rand(20, 1, k, k, dtype=dtype, grad=False)
            y = masked_dwconv2d(x, weight, 19, s, k // 2, 1)
            ref = F.conv2d(x, weight[:19], None, s, k // 2, 1, 19)
            _close(y, ref, dtype)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pwconv_matches_sliced_reference(dtype, fmt):
    rng = random.Random(f"pw-{dtype}-{fmt}")
    torch.manual_seed(rng.randint(0, 1 << 30))
    for _ in range(25):
        cin_max, cout_max = rng.randint(1, 48), rng.randint(1, 48)
        cin, cout = rng.randint(1, cin_max), rng.randint(1, cout_max)
        n, h, w = rng.randint(1, 3), rng.randint(1, 9), rng.randint(1, 9)
        x = _rand(n, cin, h, w, dtype=dtype, fmt=fmt)
        weight = _rand(cout_max, cin_max, 1, 1, dtype=dtype)
        y = masked_pwconv2d(x, weight, cin, cout)
        ref = F.conv2d(x, weight[:cout, :cin])
        _close(y, ref, dtype)
        g = torch.randn_like(ref)
        gx, gw = torch.autograd.grad(y, (x, weight), g)
        rx, rw = torch.autograd.grad(ref, (x, weight), g)
        _close(gx, rx, dtype)
        _close(gw, rw, dtype)
        assert not gw[cout:].any() and not gw[:, cin:].any()


def test_noncontiguous_inputs_and_grads():
    x = torch.randn(2, 12, 10, 10, dtype=torch.float64)[:, ::2].requires_grad_()
    w = torch.randn(8, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    y = masked_dwconv2d(x, w, 6)
    ref = F.conv2d(x, w[:6], None, 1, 1, 1, 6)
    torch.testing.assert_close(y, ref)
    g = torch.randn(2, 6, 10, 20, dtype=torch.float64)[..., ::2]  # strided grad_out
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
@pytest.mark.parametrize("k,stride", [(3, 1), (5, 2), (7, 1)])
def test_dwconv_gradcheck(k, stride, fmt):
    x = _rand(2, 3, 7, 6, fmt=fmt)
    w = _rand(5, 1, k, k)
    assert torch.autograd.gradcheck(lambda a, b: masked_dwconv2d(a, b, 3, stride), (x, w))


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
def test_pwconv_gradcheck(fmt):
    x = _rand(2, 3, 4, 5, fmt=fmt)
    w = _rand(6, 5, 1, 1)
    assert torch.autograd.gradcheck(lambda a, b: masked_pwconv2d(a, b, 3, 4), (x, w))


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
def test_opcheck(fmt):
    dw_args = (_rand(2, 4, 8, 8, dtype=torch.float32, fmt=fmt),
               _rand(6, 1, 5, 5, dtype=torch.float32), 4, 2, 2, 1)
    torch.library.opcheck(torch.ops.bsnas.masked_dwconv2d.default, dw_args)
    pw_args = (_rand(2, 4, 5, 5, dtype=torch.float32, fmt=fmt),
               _rand(7, 6, 1, 1, dtype=torch.float32), 4, 3)
    torch.library.opcheck(torch.ops.bsnas.masked_pwconv2d.default, pw_args)


def _op_names_run(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_no_weight_slice_is_copied():
    """The ops pass the active block as a strided view: no copy or clone of anything
    (activations are copied only by the small-plane weight gradient of
    masked_pwconv2d, test_pwconv_small_plane_weight_grad)."""
    x = torch.randn(2, 24, 8, 8, requires_grad=True)
    dw = torch.randn(32, 1, 3, 3, requires_grad=True)
    pw = torch.randn(40, 32, 1, 1, requires_grad=True)
    for fmt in LAYOUTS:
        xf = x.detach().to(memory_format=fmt).requires_grad_()

        def step():
            y = masked_pwconv2d(masked_dwconv2d(xf, dw, 24), pw, 24, 30)
            y.backward(torch.ones_like(y))

        names = _op_names_run(step)
        assert "bsnas::masked_pwconv2d" in names  # the profile saw the ops
        copies = {n for n in names if n in ("aten::copy_", "aten::clone", "aten::contiguous")}
        assert not copies, f"{fmt}: unexpected {copies}"


@pytest.mark.parametrize("n", [1, 3])
def test_pwconv_small_plane_weight_grad(n):
    """NCHW with H*W*(out + in) < out*in: the weight gradient is one GEMM over
    [C, N*H*W] copies of grad_out and x."""
    torch.manual_seed(5)
    x = _rand(n, 40, 2, 3)
    weight = _rand(50, 48, 1, 1)
    y = masked_pwconv2d(x, weight, 40, 45)
    ref = F.conv2d(x, weight[:45, :40])
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(y, (x, weight), g), torch.autograd.grad(ref, (x, weight), g)):
        _close(a, b, torch.float64)


@pytest.mark.parametrize("threads", [2, 3])
def test_pwconv_gemm_depth_split(threads):
    """A weight gradient over many pixels onto a small result splits its depth (pixels)
    across threads, each summing a range into its own partial result: channels_last
    (in_width filling the GEMM's 16-float vectors worse than out_width, so gw^T is
    computed: 24 -> 16, 40 -> 67; and the other way, 16 -> 48), and NCHW image by image,
    each image added into the result (32x32 with out >= in; 14x14 with out < in and at
    least 8192 weight values). Depths that do not split evenly into passes of 256
    pixels."""
    torch.manual_seed(11)
    small = _rand(70, 48, 1, 1, dtype=torch.float32)
    large = _rand(96, 130, 1, 1, dtype=torch.float32)
    cases = [(small, torch.channels_last, 3, 24, 16, 23, 37),
             (small, torch.channels_last, 2, 40, 67, 30, 41),
             (small, torch.channels_last, 1, 16, 48, 45, 45),
             (small, torch.contiguous_format, 3, 8, 40, 32, 32),
             (large, torch.contiguous_format, 3, 120, 80, 14, 14)]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for weight, fmt, n, in_w, out_w, h, w in cases:
            x = _rand(n, in_w, h, w, dtype=torch.float32, fmt=fmt)
            y = masked_pwconv2d(x, weight, in_w, out_w)
            ref = F.conv2d(x.double(), weight.double()[:out_w, :in_w])
            g = torch.randn_like(ref)
            gx, gw = torch.autograd.grad(y, (x, weight), g.float())
            rx, rw = torch.autograd.grad(ref, (x, weight), g)
            for a, b in ((y, ref), (gx, rx), (gw, rw)):
                _close(a.double(), b, torch.float32)
            assert not gw[out_w:].any() and not gw[:, in_w:].any()
    finally:
        torch.set_num_threads(old)


def test_compile_does_not_recompile_per_width():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    dw = torch.randn(32, 1, 3, 3, requires_grad=True)
    pw = torch.randn(16, 32, 1, 1, requires_grad=True)

    @torch.compile(backend=counter, fullgraph=True)
    def block(x, width):
        return masked_pwconv2d(masked_dwconv2d(x, dw, width), pw, width, 16).relu().sum()

    for width in (8, 12, 16, 24, 32):
        x = torch.randn(2, width, 6, 6, requires_grad=True)
        out = block(x, width)
        out.backward()
        ref = F.conv2d(F.conv2d(x, dw[:width], None, 1, 1, 1, width), pw[:16, :width]).relu().sum()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(x.grad, torch.autograd.grad(ref, x)[0])
    assert counter.frame_count <= 2, f"recompiled {counter.frame_count} times for 5 widths"


# --------------------------------------------------------------------------- bad input

def _dw(**over):
    args = dict(x=torch.randn(1, 4, 8, 8), weight=torch.randn(6, 1, 3, 3), width=4,
                stride=1, padding=1, dilation=1)
    args.update(over)
    return lambda: torch.ops.bsnas.masked_dwconv2d(*args.values())


def _pw(**over):
    args = dict(x=torch.randn(1, 4, 5, 5), weight=torch.randn(6, 5, 1, 1), in_width=4,
                out_width=3)
    args.update(over)
    return lambda: torch.ops.bsnas.masked_pwconv2d(*args.values())


@pytest.mark.parametrize("call,message", [
    (_dw(width=0), "width must be in"),
    (_dw(width=7), "width must be in"),
    (_dw(width=3), "has 4 channels but the active width is 3"),
    (_dw(x=torch.randn(4, 8, 8)), "x must be 4-D"),
    (_dw(weight=torch.randn(6, 3, 3)), "weight must be 4-D"),
    (_dw(weight=torch.randn(6, 1, 4, 4)), "kernel size must be odd"),
    (_dw(weight=torch.randn(6, 1, 3, 5)), "kernel must be square"),
    (_dw(weight=torch.randn(6, 2, 3, 3)), "depthwise"),
    (_dw(weight=torch.randn(6, 1, 3, 3, dtype=torch.float64)), "weight is"),
    (_dw(x=torch.randn(1, 4, 8, 8).half(), weight=torch.randn(6, 1, 3, 3).half()), "CUDA only"),
    (_dw(x=torch.randn(1, 4, 8, 8).long(), weight=torch.randn(6, 1, 3, 3).long()), "float32 or float64"),
    (_dw(stride=0), "stride must be >= 1"),
    (_dw(padding=-1), "padding must be >= 0"),
    (_dw(dilation=0), "dilation must be >= 1"),
    (_dw(x=torch.randn(1, 4, 2, 2), padding=0), "too small"),
    (_pw(in_width=0), "in_width must be in"),
    (_pw(in_width=6), "in_width must be in"),
    (_pw(out_width=7), "out_width must be in"),
    (_pw(out_width=0), "out_width must be in"),
    (_pw(in_width=3), "has 4 channels but in_width is 3"),
    (_pw(weight=torch.randn(6, 5, 3, 3)), "weight must be [Cout_max, Cin_max, 1, 1]"),
    (_pw(x=torch.randn(4, 5, 5)), "x must be 4-D"),
    (_pw(x=torch.randn(1, 4, 5, 5).bfloat16(), weight=torch.randn(6, 5, 1, 1).bfloat16()), "CUDA only"),
    (_pw(weight=torch.randn(6, 5, 1, 1, dtype=torch.float64)), "weight is"),
])
def test_bad_input_raises_clear_error(call, message):
    with pytest.raises(RuntimeError) as info:
        call()
    assert message in str(info.value)


def test_backward_checks_grad_shape():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(6, 1, 3, 3)
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        torch.ops.bsnas._masked_dwconv2d_backward(torch.randn(1, 4, 7, 8), x, w, 4, 1, 1, 1)
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        torch.ops.bsnas._masked_pwconv2d_backward(torch.randn(1, 2, 8, 8), x,
                                                  torch.randn(3, 4, 1, 1), 4, 3)


def test_empty_batch():
    y = masked_dwconv2d(torch.randn(0, 4, 8, 8), torch.randn(6, 1, 3, 3), 4)
    assert y.shape == (0, 4, 8, 8)
    y = masked_pwconv2d(torch.randn(0, 4, 8, 8), torch.randn(6, 5, 1, 1), 4, 2)
    assert y.shape == (0, 2, 8, 8)
    # The weight gradients keep the full shape and are zero everywhere.
    _, gw = torch.ops.bsnas._masked_dwconv2d_backward(
        torch.randn(0, 4, 8, 8), torch.randn(0, 4, 8, 8), torch.randn(6, 1, 3, 3), 4, 1, 1, 1)
    assert gw.shape == (6, 1, 3, 3) and not gw.any()
    _, gw = torch.ops.bsnas._masked_pwconv2d_backward(
        torch.randn(0, 2, 8, 8), torch.randn(0, 4, 8, 8), torch.randn(6, 5, 1, 1), 4, 2)
    assert gw.shape == (6, 5, 1, 1) and not gw.any()


def test_build_reports_cuda():
    assert isinstance(bsnas.cuda_compiled(), bool)


# Run in a fresh interpreter by test_dwconv_streamed_large_output: with freed memory
# kept, each case's second call writes into the resident block its first call freed.
_STREAMED_CASES = """
import sys
import torch
import torch.nn.functional as F
import bsnas
from bsnas import masked_dwconv2d
from bsnas.train.host_memory import keep_freed_memory

assert keep_freed_memory()
assert bsnas._C.cpu_llc_bytes() == 32 << 20  # LLC_32MIB
torch.set_num_threads(2)
k = int(sys.argv[1])
torch.manual_seed(k)


def close(a, b):
    err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    tol = 1e-12 if a.dtype == torch.float64 else 1e-5
    assert err < tol, f"relative error {err:.3g}"


cases = [(torch.float32, 4, 64, 1), (torch.float32, 4, 48, 1), (torch.float32, 4, 40, 1),
         (torch.float32, 4, 37, 1), (torch.float32, 4, 40, 2), (torch.float32, 2, 37, 1),
         (torch.float64, 4, 48, 1), (torch.float64, 4, 37, 1), (torch.float32, 1, 140, 1)]
for dtype, n, width, stride in cases:
    x = torch.randn(n, width, 150, 150, dtype=dtype).to(memory_format=torch.channels_last)
    weight = torch.randn(144, 1, k, k, dtype=dtype)
    x.requires_grad_()
    ref = F.conv2d(x, weight[:width], None, stride, k // 2, 1, width)
    g = torch.randn_like(ref)
    (rx,) = torch.autograd.grad(ref, x, g)
    for call in range(2):  # the second call writes into the block the first one freed
        y = masked_dwconv2d(x, weight, width, stride, k // 2, 1)
        close(y, ref)
        (gx,) = torch.autograd.grad(y, x, g)
        close(gx, rx)
        del y, gx
print("ok")
"""


@pytest.mark.skipif(not GLIBC, reason="keeping freed memory resident needs glibc's malloc")
@pytest.mark.parametrize("k", [3, 5])
def test_dwconv_streamed_large_output(k):
    """channels_last results beyond 30 % of the last-level cache: where pixels start on
    cache lines and the pages are resident, written from the registers with
    non-temporal stores (stream_output; widths 64 and 48); otherwise stored through the
    cache while each run prefetches the output lines and input lines of the run after it
    (window_pass's fetch_ahead; widths 40 and 37, stride 1 and 2, the 2-image case, and
    width 140, whose kernel-5 pass takes channel blocks outermost). The prefetches reach
    past a row's end into the next row and are clamped to the tensors. Inputs larger than
    the cache (the float64 cases, 35 MB) are also prefetched row by row; all with the
    thresholds read against 32 MiB (LLC_32MIB). A freshly mapped result (last page not
    resident) is written with plain stores. In a fresh interpreter with freed memory kept
    (bsnas.train.host_memory), each case runs twice, the second time into the resident block
    the first call freed. Forward and input gradient against F.conv2d; float64 too (8
    values a vector: 48 channels fill whole lines, 37 do not)."""
    _run_with_freed_memory_kept(_STREAMED_CASES, str(k))


# The streaming thresholds read against a 32 MiB last-level cache whatever this
# machine's (set explicitly: memory_policy.cpp's last_level_cache_bytes), so that the cases
# below take the same paths everywhere.
LLC_32MIB = {"BSNAS_CPU_LLC_BYTES": str(32 << 20)}


def _run_with_freed_memory_kept(script, *args):
    """Runs `script` in a fresh interpreter (it calls keep_freed_memory itself, a
    process-wide setting kept out of this session) with LLC_32MIB; it must print "ok"."""
    out = run_python(script, *args, env=LLC_32MIB)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


_PW_STREAMED_CASES = """
import torch
import torch.nn.functional as F
import bsnas
from bsnas import masked_pwconv2d
from bsnas.train.host_memory import keep_freed_memory

assert keep_freed_memory()
assert bsnas._C.cpu_llc_bytes() == 32 << 20  # LLC_32MIB
torch.set_num_threads(2)
torch.manual_seed(7)
weight = torch.randn(112, 40, 1, 1)
# (in, out): one-vector panels (16 outputs), two-vector panels (48), both (80), a
# masked last panel (56: rows of 224 bytes, not streamed), NCHW (batched)
for fmt, in_w, out_w in [(torch.channels_last, 40, 16), (torch.channels_last, 16, 48),
                         (torch.channels_last, 24, 80), (torch.channels_last, 40, 56),
                         (torch.contiguous_format, 24, 112)]:
    x = torch.randn(4, in_w, 160, 150).to(memory_format=fmt)
    ref = F.conv2d(x.double(), weight.double()[:out_w, :in_w])
    for call in range(2):  # the second call writes into the block the first one freed
        y = masked_pwconv2d(x, weight, in_w, out_w)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-6, (in_w, out_w, call, err)
        del y
print("ok")
"""


@pytest.mark.skipif(not GLIBC, reason="keeping freed memory resident needs glibc's malloc")
def test_pwconv_streamed_large_output():
    """A float32 GEMM result beyond 30 % of the last-level cache, written in one depth
    pass onto cache-line-aligned rows whose pages are resident, leaves its whole tiles
    through non-temporal stores (gemm_f32): each case runs twice in a fresh interpreter
    with freed memory kept (the second time into the resident block the first call
    freed), against a float64 reference. Fails when the streamed stores are wrong."""
    _run_with_freed_memory_kept(_PW_STREAMED_CASES)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
def test_pwconv_float32_gemm_shapes(fmt):
    """float32 on CPU runs bsnas's own GEMM: several column panels and a masked last
    one, a last panel of one vector (full: 16 columns; masked), row tiles with a
    remainder, and a weight gradient reduced over more pixels than one pass of a
    register tile takes (partial sums added into the result)."""
    torch.manual_seed(3)
    weight = _rand(70, 48, 1, 1, dtype=torch.float32)
    for in_w, out_w in ((40, 67), (40, 16), (24, 48), (48, 5)):
        x = _rand(4, in_w, 29, 31, dtype=torch.float32, fmt=fmt)
        y = masked_pwconv2d(x, weight, in_w, out_w)
        ref = F.conv2d(x, weight[:out_w, :in_w])
        _, gw = _check_against(y, ref, (x, weight), torch.float32)
        assert not gw[out_w:].any() and not gw[:, in_w:].any()
