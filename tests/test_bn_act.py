"""bsnas.ops.bn_act (per-channel affine + activation, one-pass backward) against the
plain PyTorch composite."""
import random

import pytest
import torch
import torch.nn.functional as F

from bsnas.ops import bn_act

LAYOUTS = [torch.contiguous_format, torch.channels_last]
ACTS = {"identity": lambda u: u, "relu": F.relu, "relu6": F.relu6}


def _reference(y, scale, shift, activation):
    return ACTS[activation](y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))


def _inputs(rng, dtype, fmt, shape=None):
    shape = shape or (rng.randint(1, 4), rng.randint(1, 70), rng.randint(1, 12), rng.randint(1, 12))
    y = (torch.randn(*shape, dtype=dtype) * 3).contiguous(memory_format=fmt)
    scale = torch.rand(shape[1], dtype=dtype) * 2 - 0.5
    shift = torch.randn(shape[1], dtype=dtype) * 2
    return y, scale, shift


@pytest.mark.parametrize("activation", sorted(ACTS))
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(dtype, fmt, activation):
    rng = random.Random(f"{dtype}-{fmt}-{activation}")
    torch.manual_seed(rng.randint(0, 1 << 30))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    for _ in range(8):
        args = [t.requires_grad_() for t in _inputs(rng, dtype, fmt)]
        h = bn_act(*args, activation)
        assert h.is_contiguous(memory_format=fmt) and h.dtype == dtype
        ref_args = [t.detach().double().requires_grad_() for t in args]
        ref = _reference(*ref_args, activation)
        g = torch.randn_like(ref)
        got = torch.autograd.grad(h, args, g.to(dtype))
        want = torch.autograd.grad(ref, ref_args, g)
        torch.testing.assert_close(h.double(), ref, **tol)
        for a, b in zip(got, want):
            assert a.dtype == dtype
            torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
def test_gradcheck_and_opcheck(fmt):
    rng = random.Random(5)
    y, scale, shift = _inputs(rng, torch.float64, fmt, (2, 5, 4, 3))
    for activation in ACTS:
        assert torch.autograd.gradcheck(
            lambda a, b, c: bn_act(a, b, c, activation),
            tuple(t.clone().requires_grad_() for t in (y, scale, shift)))
    args = (*(t.float().requires_grad_() for t in (y, scale, shift)), 2)
    torch.library.opcheck(torch.ops.bsnas.bn_act.default, args)
    g = torch.randn_like(y).float().contiguous(memory_format=fmt)
    torch.library.opcheck(torch.ops.bsnas._bn_act_backward.default,
                          (g, y.float(), scale.float(), shift.float(), 2))


def test_large_image_parts_and_threads():
    """channels_last partial sums per chunk of 1024 pixels: several chunks per image,
    and the same bits with 1 and 2 threads."""
    rng = random.Random(9)
    y, scale, shift = _inputs(rng, torch.float32, torch.channels_last, (2, 40, 50, 45))
    g = torch.randn_like(y)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(torch.ops.bsnas._bn_act_backward(g, y, scale, shift, 2))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    ref_args = [t.double().requires_grad_() for t in (y, scale, shift)]
    want = torch.autograd.grad(_reference(*ref_args, "relu6"), ref_args, g.double())
    for a, b in zip(outs[0], want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-3)


def test_bad_input():
    y = torch.randn(2, 3, 4, 4)
    s = torch.ones(3)
    with pytest.raises(RuntimeError, match="y must be 4-D"):
        bn_act(torch.randn(3, 4, 4), s, s)
    with pytest.raises(RuntimeError, match="scale must be 1-D of the active width 3"):
        bn_act(y, torch.ones(4), s)
    with pytest.raises(RuntimeError, match="shift is Double but y is Float"):
        bn_act(y, s, s.double())
    with pytest.raises(RuntimeError, match="half precision is supported on CUDA only"):
        bn_act(y.half(), s.half(), s.half())
    with pytest.raises(RuntimeError, match="activation code must be"):
        torch.ops.bsnas.bn_act(y, s, s, 7)
    with pytest.raises(ValueError, match="activation must be one of"):
        bn_act(y, s, s, "gelu")
    with pytest.raises(RuntimeError, match="grad_h has shape"):
        torch.ops.bsnas._bn_act_backward(torch.randn(2, 3, 4, 5), y, s, s, 2)
