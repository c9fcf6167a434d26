"""bsnas.ops.bn_act (per-channel affine + activation, one-pass backward) against the
plain PyTorch composite in float64, on random shapes and values; gradcheck and opcheck.
CUDA cases run where a GPU and the CUDA kernels are present (float16 / bfloat16 there:
computed in float32 from the rounded inputs, one rounding of each result, so 2e-3 /
1.6e-2 relative to the largest reference magnitude)."""
import random

import pytest
import torch

import bsnas
from bsnas.ops import bn_act
from reference import ACTS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and bsnas.cuda_compiled() else [])
HALF_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _reference(y, scale, shift, activation):
    return ACTS[activation](y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))


KINK_GAP = 1e-4  # float32 rounding of y * scale + shift is ~1e-6 at these magnitudes


def _inputs(rng, dtype, fmt, shape=None, device="cpu"):
    """Random inputs whose pre-activations lie at least KINK_GAP away from relu/relu6's
    kinks (0 and 6), where the rounding of the float32 (or FMA) pre-activation, not the
    kernel, decides which side the float64 reference falls on: such elements of y are
    drawn again."""
    shape = shape or (rng.randint(1, 4), rng.randint(1, 70), rng.randint(1, 12), rng.randint(1, 12))
    gen = torch.Generator().manual_seed(rng.randint(0, 1 << 30))
    y = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    scale = (torch.rand(shape[1], generator=gen) * 2 - 0.5).to(dtype)
    shift = (torch.randn(shape[1], generator=gen) * 2).to(dtype)
    for _ in range(20):
        u = y.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
        near = (u.abs() < KINK_GAP) | ((u - 6).abs() < KINK_GAP)
        if not near.any():
            break
        y[near] = (torch.randn(int(near.sum()), generator=gen) * 3).to(dtype)
    else:
        raise AssertionError("could not draw inputs away from the activation's kinks")
    return (y.to(device).contiguous(memory_format=fmt), scale.to(device), shift.to(device))


def _assert_close(got, want, dtype):
    """`got` (dtype) against the float64 `want`."""
    assert got.dtype == dtype
    if dtype in HALF_TOL:
        tol = HALF_TOL[dtype]
        scale = max(want.abs().max().item(), 1e-6)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale)
    elif dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("activation", sorted(ACTS))
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device, dtype, fmt, activation):
    if device == "cpu" and dtype in HALF_TOL:
        pytest.skip("half precision is CUDA only")
    rng = random.Random(f"{device}-{dtype}-{fmt}-{activation}")
    torch.manual_seed(rng.randint(0, 1 << 30))
    for _ in range(8):
        args = [t.requires_grad_() for t in _inputs(rng, dtype, fmt, device=device)]
        h = bn_act(*args, activation)
        assert h.is_contiguous(memory_format=fmt) and h.device.type == device
        ref_args = [t.detach().double().requires_grad_() for t in args]
        ref = _reference(*ref_args, activation)
        g = torch.randn_like(ref).to(dtype)
        got = torch.autograd.grad(h, args, g)
        want = torch.autograd.grad(ref, ref_args, g.double())
        _assert_close(h, ref.detach(), dtype)
        for a, b in zip(got, want):
            _assert_close(a, b, dtype)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_opcheck(device, fmt):
    rng = random.Random(5)
    y, scale, shift = _inputs(rng, torch.float64, fmt, (2, 5, 4, 3), device)
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
    _assert_same_and_close(outs, g, y, scale, shift)


def _assert_same_and_close(outs, g, y, scale, shift):
    """Two runs of the relu6 backward gave the same bits, close to float64 autograd."""
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    ref_args = [t.double().requires_grad_() for t in (y, scale, shift)]
    want = torch.autograd.grad(_reference(*ref_args, "relu6"), ref_args, g.double())
    for a, b in zip(outs[0], want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-3)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
def test_cuda_large_is_deterministic(fmt):
    """Many splits of each channel's values: the same bits on every run, and the float64
    reference."""
    rng = random.Random(11)
    y, scale, shift = _inputs(rng, torch.float32, fmt, (16, 72, 56, 56), "cuda")
    g = torch.randn_like(y)
    outs = [torch.ops.bsnas._bn_act_backward(g, y, scale, shift, 2) for _ in range(2)]
    _assert_same_and_close(outs, g, y, scale, shift)
    torch.testing.assert_close(bn_act(y, scale, shift).double(),
                               _reference(y.double(), scale.double(), shift.double(), "relu6"),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    y = torch.randn(2, 3, 4, 4, device=device)
    s = torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match="y must be 4-D"):
        bn_act(torch.randn(3, 4, 4, device=device), s, s)
    with pytest.raises(RuntimeError, match="scale must be 1-D of the active width 3"):
        bn_act(y, torch.ones(4, device=device), s)
    with pytest.raises(RuntimeError, match="shift is Double but y is Float"):
        bn_act(y, s, s.double())
    if device == "cpu":
        with pytest.raises(RuntimeError, match="half precision is supported on CUDA only"):
            bn_act(y.half(), s.half(), s.half())
    else:
        with pytest.raises(RuntimeError, match="shift is on cpu"):
            bn_act(y, s, s.cpu())
        with pytest.raises(RuntimeError, match="CUDA tensors must be float32"):
            bn_act(y.int(), s.int(), s.int())
    with pytest.raises(RuntimeError, match="activation code must be"):
        torch.ops.bsnas.bn_act(y, s, s, 7)
    with pytest.raises(ValueError, match="activation must be one of"):
        bn_act(y, s, s, "gelu")
    with pytest.raises(RuntimeError, match="grad_h has shape"):
        torch.ops.bsnas._bn_act_backward(torch.randn(2, 3, 4, 5, device=device), y, s, s, 2)
