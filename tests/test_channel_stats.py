"""bsnas.ops.channel_stats (float64 per-channel sum and sum of squares) against torch."""
import random

import pytest
import torch

import bsnas
from bsnas.ops import channel_stats

LAYOUTS = [torch.contiguous_format, torch.channels_last]
HAVE_CUDA = torch.cuda.is_available() and bsnas.cuda_compiled()


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(dtype, fmt):
    rng = random.Random(f"{dtype}-{fmt}")
    torch.manual_seed(rng.randint(0, 1 << 30))
    for _ in range(10):
        shape = (rng.randint(1, 5), rng.randint(1, 70), rng.randint(1, 13), rng.randint(1, 13))
        z = (torch.randn(*shape, dtype=dtype) * 3 + 1).contiguous(memory_format=fmt)
        s, q = channel_stats(z)
        assert s.dtype == q.dtype == torch.float64 and s.shape == (shape[1],)
        zd = z.double()
        torch.testing.assert_close(s, zd.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(q, (zd * zd).sum((0, 2, 3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
def test_gradcheck_and_opcheck(fmt):
    torch.manual_seed(1)
    z = torch.randn(2, 5, 4, 3, dtype=torch.float64).contiguous(memory_format=fmt)
    assert torch.autograd.gradcheck(channel_stats, (z.requires_grad_(),))
    torch.library.opcheck(torch.ops.bsnas.channel_stats.default, (z.detach().float(),))
    torch.library.opcheck(torch.ops.bsnas.channel_stats.default,
                          (z.detach().float().requires_grad_(),))


def test_variance_does_not_cancel():
    """mean^2 / var ~ 1e8: the variance from the float64 sums of float32 data matches a
    two-pass float64 variance."""
    torch.manual_seed(2)
    z = 3.0 + 1e-4 * torch.randn(8, 4, 16, 16)
    s, q = channel_stats(z)
    n = z.numel() // 4
    var = q / n - (s / n) ** 2
    torch.testing.assert_close(var, z.double().var((0, 2, 3), unbiased=False), rtol=1e-6, atol=0)


def test_deterministic_across_thread_counts():
    torch.manual_seed(3)
    z = torch.randn(9, 33, 17, 17).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = channel_stats(z)
        torch.set_num_threads(2)
        two = channel_stats(z)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_bad_input():
    with pytest.raises(RuntimeError, match="z must be 4-D"):
        channel_stats(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="half precision is supported on CUDA only"):
        channel_stats(torch.randn(1, 2, 3, 3).half())
    s, q = channel_stats(torch.randn(0, 3, 4, 4))
    assert (s == 0).all() and (q == 0).all()


@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device and the CUDA kernels")
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
def test_cuda_matches_float64(dtype, fmt):
    """The CUDA kernel (row splits + an ordered finish) on random shapes, small planes
    and big ones (many splits), against float64 sums on the CPU; deterministic."""
    rng = random.Random(f"cuda-{dtype}-{fmt}")
    torch.manual_seed(rng.randint(0, 1 << 30))
    shapes = [(rng.randint(1, 9), rng.randint(1, 300), rng.randint(1, 30), rng.randint(1, 30))
              for _ in range(8)] + [(64, 24, 112, 112), (64, 960, 7, 7), (2, 3, 1, 1)]
    for shape in shapes:
        z = (torch.randn(*shape) * 2 + 0.5).to(dtype)
        s, q = channel_stats(z.cuda().contiguous(memory_format=fmt))
        zd = z.double()
        torch.testing.assert_close(s.cpu(), zd.sum((0, 2, 3)), rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(q.cpu(), (zd * zd).sum((0, 2, 3)), rtol=1e-10, atol=1e-8)
        again = channel_stats(z.cuda().contiguous(memory_format=fmt))
        assert torch.equal(s, again[0]) and torch.equal(q, again[1])


# ------------------------------------------------------------ _channel_stats_grad_add_
_grad_add = torch.ops.bsnas._channel_stats_grad_add_


def _grad_add_case(rng, dtype, fmt, device="cpu"):
    shape = (rng.randint(1, 4), rng.randint(1, 40), rng.randint(1, 9), rng.randint(1, 9))
    z = torch.randn(*shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
    gz = torch.randn(*shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
    gs = torch.randn(shape[1], dtype=torch.float64, device=device)
    gq = torch.randn(shape[1], dtype=torch.float64, device=device)
    # What the op replaces: the composite autograd computed, in z's dtype.
    want = gz + gs.to(dtype).view(1, -1, 1, 1) + z * (2 * gq).to(dtype).view(1, -1, 1, 1)
    return gz, z, gs, gq, want


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_grad_add_matches_composite(dtype, fmt):
    """grad_z += grad_sum[c] + 2 z grad_sumsq[c] in place, in z's format."""
    rng = random.Random(f"grad-add-{dtype}-{fmt}")
    torch.manual_seed(rng.randint(0, 1 << 30))
    for _ in range(10):
        gz, z, gs, gq, want = _grad_add_case(rng, dtype, fmt)
        ptr = gz.data_ptr()
        _grad_add(gz, z, gs, gq)
        assert gz.data_ptr() == ptr
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(gz, want, rtol=tol, atol=tol)


def test_grad_add_bumps_the_version_counter():
    gz, z, gs, gq, _ = _grad_add_case(random.Random(6), torch.float32, LAYOUTS[0])
    before = gz._version
    _grad_add(gz, z, gs, gq)
    assert gz._version > before


def test_grad_add_is_z_gradient_through_the_sums():
    """Added into zeros, it is channel_stats' autograd gradient of z."""
    torch.manual_seed(4)
    z = torch.randn(3, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    gs, gq = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    s, q = channel_stats(z)
    (want,) = torch.autograd.grad((s * gs).sum() + (q * gq).sum(), z)
    got = torch.zeros_like(z)
    _grad_add(got, z.detach(), gs, gq)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
def test_grad_add_opcheck(fmt):
    gz, z, gs, gq, _ = _grad_add_case(random.Random(5), torch.float32, fmt)
    torch.library.opcheck(_grad_add.default, (gz, z, gs, gq))


def test_grad_add_bad_input():
    z = torch.randn(2, 3, 4, 4)
    gs, gq = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="grad_z has shape"):
        _grad_add(torch.zeros(2, 3, 4, 5), z, gs, gq)
    with pytest.raises(RuntimeError, match="grad_z is Double but z is Float"):
        _grad_add(torch.zeros(2, 3, 4, 4, dtype=torch.float64), z, gs, gq)
    with pytest.raises(RuntimeError, match="dense in one memory format"):
        _grad_add(torch.zeros(2, 3, 4, 4).contiguous(memory_format=torch.channels_last), z,
                  gs, gq)
    with pytest.raises(RuntimeError, match=r"grad_sum must be float64 \[3\]"):
        _grad_add(torch.zeros_like(z), z, gs.float(), gq)
    with pytest.raises(RuntimeError, match=r"grad_sumsq must be float64 \[3\]"):
        _grad_add(torch.zeros_like(z), z, gs, gq[:2])
    with pytest.raises(RuntimeError, match="z must be 4-D"):
        _grad_add(torch.zeros(3, 4), torch.randn(3, 4), gs, gq)


@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device and the CUDA kernels")
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_grad_add_cuda(dtype, fmt):
    rng = random.Random(f"grad-add-cuda-{dtype}-{fmt}")
    torch.manual_seed(rng.randint(0, 1 << 30))
    for _ in range(6):
        gz, z, gs, gq, want = _grad_add_case(rng, dtype, fmt, "cuda")
        _grad_add(gz, z, gs, gq)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(gz, want, rtol=tol, atol=tol)
