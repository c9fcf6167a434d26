"""The spring block's training op up to the project convolution (`bsnas::mbconv_train`)
against plain PyTorch on sliced weights."""
import random

import pytest
import torch
import torch.nn.functional as F

import bsnas
from bsnas.ops import mbconv_train
from bsnas.ops.masked_conv import _format
from reference import ACTS, FORMATS, assert_matches_float64, random_depthwise_shape


def _bn(t, gamma, beta, eps):
    """Training-mode BN with the batch statistics (biased variance), by hand: F.batch_norm
    refuses a single value per channel, which a stride-2 1x1 output of one image is."""
    mean = t.mean((0, 2, 3), keepdim=True)
    var = ((t - mean) ** 2).mean((0, 2, 3), keepdim=True)
    return (t - mean) / torch.sqrt(var + eps) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def _reference(x, we, g1, b1, wd, g2, b2, wp, width, stride, act, eps1, eps2):
    c, k, f = width, wd.shape[-1], ACTS[act]
    z = F.conv2d(x, we[:c, :x.shape[1]])
    y = F.conv2d(f(_bn(z, g1[:c], b1[:c], eps1)), wd[:c], None, stride, k // 2, 1, c)
    p = F.conv2d(f(_bn(y, g2[:c], b2[:c], eps2)), wp[:, :c])
    return (p, z.sum((0, 2, 3)), (z * z).sum((0, 2, 3)), y.sum((0, 2, 3)),
            (y * y).sum((0, 2, 3)))


def _inputs(rng, dtype, fmt):
    while True:
        k, stride, c_max, width, n, h, w = random_depthwise_shape(rng, 20, 9)
        # float32 against float64 through two chained batch BNs: a BN over a handful of
        # values, or of one channel, has gradients near zero by cancellation (BN of two
        # values is +-1 whatever they are), whose relative error says nothing. float32
        # draws keep >= 16 values per channel and width >= 4; float64 draws are
        # unrestricted (and compared elementwise).
        ho, wo = -(-h // stride), -(-w // stride)
        if dtype == torch.float64 or (n * ho * wo >= 16 and width >= 4):
            break
    # At least 2 inputs: with one, BN1 cancels every expand filter's scale (BN(w x) =
    # sign(w) BN(x)), the expand weight's gradient is ~0 and its relative error
    # meaningless.
    cin_max, cout = rng.randint(2, 12), rng.randint(1, 12)
    cin = rng.randint(2, cin_max)
    x = torch.randn(n, cin, h, w, dtype=dtype).to(memory_format=fmt)
    ts = [x, torch.randn(c_max, cin_max, 1, 1, dtype=dtype),
          torch.rand(c_max, dtype=dtype) + 0.5, torch.randn(c_max, dtype=dtype),
          torch.randn(c_max, 1, k, k, dtype=dtype),
          torch.rand(c_max, dtype=dtype) + 0.5, torch.randn(c_max, dtype=dtype),
          torch.randn(cout, c_max, 1, 1, dtype=dtype)]
    return [t.requires_grad_(True) for t in ts], width, stride


@pytest.mark.parametrize("act", sorted(ACTS))
@FORMATS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(dtype, fmt, act):
    rng = random.Random(17)
    for _ in range(8):
        ins, width, stride = _inputs(rng, dtype, fmt)
        eps1, eps2 = rng.choice([1e-5, 1e-3]), rng.choice([1e-5, 1e-3])
        got = mbconv_train(*ins, width, stride, act, eps1, eps2)
        ref_in = [t.detach().double().requires_grad_(True) for t in ins]
        want = _reference(*ref_in, width, stride, act, eps1, eps2)
        # An upstream gradient on p only: the sums are not differentiable. float32
        # gradients within 1e-4: each batch BN's backward takes the gradient's components
        # along 1 and x_hat out per channel, and the two chained here cancel about a
        # decimal digit (6 of 1,500 draws exceeded 1e-5, none 4e-5; float64 agrees
        # elementwise).
        d_got = assert_matches_float64(got, want, ins, ref_in, dtype, upstream=1,
                                       grad_tol=1e-4)
        # x's format (x with one channel is NCHW too, and computes in NCHW)
        assert got[0].is_contiguous(memory_format=_format(ins[0]))
        assert all(t.dtype == torch.float64 and not t.requires_grad for t in got[1:])
        _, we, g1, b1, wd, g2, b2, wp = d_got
        for g in (we[width:], we[:, ins[0].shape[1]:], g1[width:], b1[width:], wd[width:],
                  g2[width:], b2[width:], wp[:, width:]):
            assert not g.any()  # zero outside the active part


def test_width_one_keeps_channels_last():
    """At width 1 the hidden tensors are NCHW and channels_last at once; p still comes
    out channels_last, as the fake kernel says."""
    rng = random.Random(9)
    ins, _, stride = _inputs(rng, torch.float64, torch.channels_last)
    got = mbconv_train(*ins, 1, stride)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    want = _reference(*ins, 1, stride, "relu6", 1e-5, 1e-5)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-9)


@FORMATS
@pytest.mark.parametrize("act", ["relu6", "identity"])
def test_gradcheck(act, fmt):
    rng = random.Random(5)
    ins, width, stride = _inputs(rng, torch.float64, fmt)
    assert torch.autograd.gradcheck(lambda *t: mbconv_train(*t, width, stride, act)[0], ins)


def test_parameters_without_gradients():
    """Frozen parameters and an input that wants no gradient: the others still get theirs."""
    rng = random.Random(6)
    ins, width, stride = _inputs(rng, torch.float64, torch.contiguous_format)
    ref_in = [t.detach().clone().requires_grad_(True) for t in ins]
    for i in (0, 2, 3, 7):
        ins[i].requires_grad_(False)
        ref_in[i].requires_grad_(False)
    got = mbconv_train(*ins, width, stride)[0]
    want = _reference(*ref_in, width, stride, "relu6", 1e-5, 1e-5)[0]
    wanted = [i for i in range(8) if ins[i].requires_grad]
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((g * got).sum(), [ins[i] for i in wanted]),
                    torch.autograd.grad((g * want).sum(), [ref_in[i] for i in wanted])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9)


def test_retain_graph():
    """The backward drops the hidden tensors as it goes unless the graph is retained: a
    retained graph gives the same gradients twice; a freed one refuses a second pass."""
    rng = random.Random(10)
    ins, width, stride = _inputs(rng, torch.float64, torch.channels_last)
    p = mbconv_train(*ins, width, stride)[0]
    g = torch.randn_like(p)
    first = torch.autograd.grad(p, ins, g, retain_graph=True)
    second = torch.autograd.grad(p, ins, g)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(p, ins, g)


@FORMATS
def test_opcheck(fmt):
    rng = random.Random(8)
    ins, width, stride = _inputs(rng, torch.float32, fmt)
    x, we, g1, b1, wd, g2, b2, wp = ins
    torch.library.opcheck(torch.ops.bsnas.mbconv_train.default,
                          (x, we, g1, b1, 1e-5, wd, g2, b2, 1e-3, wp, width, stride, 2))


def test_compiles_without_recompiling_per_width():
    torch._dynamo.reset()
    c_max = 16
    params = [torch.randn(c_max, 6, 1, 1), torch.ones(c_max), torch.zeros(c_max),
              torch.randn(c_max, 1, 3, 3), torch.ones(c_max), torch.zeros(c_max),
              torch.randn(5, c_max, 1, 1)]
    params = [p.requires_grad_(True) for p in params]

    def f(x, width):
        p, zs, zq, ys, yq = mbconv_train(x, *params, width)
        return p.square().sum() + zs.sum() + yq.sum()

    counter = torch._dynamo.testing.CompileCounter()
    g = torch.compile(f, backend=counter, fullgraph=True)
    x = torch.randn(2, 6, 6, 6, requires_grad=True)
    for width in (4, 7, 9, 12, 16):
        got = torch.autograd.grad(g(x, width), (x, *params))
        want = torch.autograd.grad(f(x, width), (x, *params))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    assert counter.frame_count <= 2


def test_bad_input():
    x = torch.randn(2, 4, 6, 6)
    we, wd, wp = torch.randn(8, 4, 1, 1), torch.randn(8, 1, 3, 3), torch.randn(5, 8, 1, 1)
    g, b = torch.ones(8), torch.zeros(8)
    op = torch.ops.bsnas.mbconv_train

    def call(x=x, we=we, g1=g, wd=wd, g2=g, wp=wp, width=6, stride=1):
        return op(x, we, g1, b, 1e-5, wd, g2, b, 1e-5, wp, width, stride, 2)

    with pytest.raises(RuntimeError, match="mbconv_train: x must be 4-D"):
        call(x=x[0])
    with pytest.raises(RuntimeError, match="mbconv_train: dw_weight must be 4-D"):
        call(wd=wd[:, 0])
    with pytest.raises(RuntimeError, match="out_width must be in"):
        call(width=9)  # wider than the expand weight
    with pytest.raises(RuntimeError, match="in_width"):
        call(x=torch.randn(2, 5, 6, 6))  # more channels than the expand weight's inputs
    with pytest.raises(RuntimeError, match="weight"):
        call(g1=g[:5])  # BN1 narrower than the width
    with pytest.raises(RuntimeError, match="weight"):
        call(g2=g[:5])
    with pytest.raises(RuntimeError, match="in_width"):
        call(wp=wp[:, :5])  # project weight narrower than the width
    with pytest.raises(RuntimeError, match="even|odd"):
        call(wd=torch.randn(8, 1, 4, 4))
    with pytest.raises(RuntimeError, match="stride"):
        call(stride=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        mbconv_train(x, we, g, b, wd, g, b, wp, 6, activation="gelu")


@pytest.mark.skipif(not (torch.cuda.is_available() and bsnas.cuda_compiled()),
                    reason="needs a GPU and the CUDA kernels")
@FORMATS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype, fmt):
    """On the GPU: float32 against the float64 reference; bfloat16 under autocast
    (convolutions in bfloat16, BN parameters float32) within bfloat16's resolution."""
    rng = random.Random(19)
    for _ in range(4):
        ins, width, stride = _inputs(rng, torch.float32, fmt)
        dev = [t.detach().cuda().requires_grad_(True) for t in ins]
        with torch.autocast("cuda", torch.bfloat16, enabled=dtype == torch.bfloat16):
            got = mbconv_train(*dev, width, stride)
        ref_in = [t.detach().double().requires_grad_(True) for t in ins]
        want = _reference(*ref_in, width, stride, "relu6", 1e-5, 1e-5)
        g = torch.randn_like(want[0])
        d_got = torch.autograd.grad((g.cuda().to(got[0].dtype) * got[0]).sum(), dev)
        d_want = torch.autograd.grad((g * want[0]).sum(), ref_in)
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        for a, b in zip([*got, *d_got], [*want, *d_want]):
            err = ((a.cpu().double() - b).norm() / b.norm().clamp_min(1e-12)).item()
            assert err < tol, err
        assert got[0].dtype == dtype
