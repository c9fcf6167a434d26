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
