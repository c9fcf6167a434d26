"""bsnas.ops.bn_affine_from_sums / bn_update_running_stats_ against the torch composite
and nn.BatchNorm2d, on random shapes and values; gradcheck and opcheck. CUDA cases run
where a GPU and the CUDA kernels are present."""
import random

import pytest
import torch
import torch.nn.functional as F

import bsnas
from bsnas.nn.batchnorm import DynamicBatchNorm2d
from bsnas.ops import bn_affine_from_sums, bn_update_running_stats_, channel_stats

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and bsnas.cuda_compiled() else [])


def _reference(s, q, n, w, b, eps):
    c = s.shape[0]
    mean = s / n
    var = (q / n - mean * mean).clamp_min(0)
    scale = w[:c] * torch.rsqrt(var + eps)
    return scale, b[:c] - mean * scale


def _sums(rng, c, n, device, constant=False):
    """Float64 sums of `n` random values per channel (a constant channel if asked)."""
    x = torch.randn(n, c, dtype=torch.float64) * (rng.random() * 3 + 0.1) + rng.uniform(-2, 2)
    if constant:
        x[:, 0] = 0.3
    return x.sum(0).to(device), (x * x).sum(0).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affine_matches_composite(dtype, device):
    rng = random.Random(f"affine-{dtype}-{device}")
    torch.manual_seed(rng.randint(0, 1 << 30))
    for _ in range(10):
        c_max = rng.randint(1, 300)
        c, n = rng.randint(1, c_max), rng.randint(1, 5000)
        s, q = _sums(rng, c, n, device, constant=rng.random() < 0.3)
        w = torch.randn(c_max, dtype=dtype, device=device)
        b = torch.randn(c_max, dtype=dtype, device=device)
        eps = rng.choice([1e-5, 1e-3, 0.1])
        scale, shift = bn_affine_from_sums(s, q, n, w, b, eps)
        want = _reference(s, q, n, w.double(), b.double(), eps)
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        assert scale.dtype == shift.dtype == dtype and scale.shape == (c,)
        torch.testing.assert_close(scale.double(), want[0], **tol)
        torch.testing.assert_close(shift.double(), want[1], **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_affine_gradients(device):
    rng = random.Random(f"grad-{device}")
    torch.manual_seed(4)
    for constant in (False, True):
        s, q = _sums(rng, 7, 30, device, constant=constant)
        w = torch.randn(11, dtype=torch.float64, device=device)
        b = torch.randn(11, dtype=torch.float64, device=device)
        args = [t.clone().requires_grad_() for t in (s, q, w, b)]

        def fn(s_, q_, w_, b_):
            return bn_affine_from_sums(s_, q_, 30, w_, b_, 1e-3)

        if not constant:  # the clamp's kink sits exactly at a constant channel
            assert torch.autograd.gradcheck(fn, args)
        # Against autograd of the composite, constant channel included.
        gs, gb = torch.randn(7, dtype=torch.float64, device=device), torch.randn(
            7, dtype=torch.float64, device=device)
        got = torch.autograd.grad(fn(*args), args, (gs, gb))
        ref_args = [t.detach().clone().requires_grad_() for t in args]
        want = torch.autograd.grad(_reference(ref_args[0], ref_args[1], 30, ref_args[2],
                                              ref_args[3], 1e-3), ref_args, (gs, gb))
        for g, h in zip(got, want):
            torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-9)
        assert torch.all(got[2][7:] == 0) and torch.all(got[3][7:] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    rng = random.Random("opcheck")
    s, q = _sums(rng, 5, 40, device)
    w = torch.randn(9, device=device)
    b = torch.randn(9, device=device)
    torch.library.opcheck(torch.ops.bsnas.bn_affine_from_sums.default, (s, q, 40, w, b, 1e-5))
    torch.library.opcheck(torch.ops.bsnas.bn_affine_from_sums.default,
                          (s.requires_grad_(), q, 40, w.requires_grad_(), b, 1e-5))
    rm, rv = torch.randn(9, device=device), torch.rand(9, device=device) + 0.5
    nbt = torch.zeros((), dtype=torch.long, device=device)
    for momentum in (0.1, None):
        torch.library.opcheck(torch.ops.bsnas.bn_update_running_stats_.default,
                              (rm, rv, nbt, s.detach(), q, 40, momentum))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_running_update_matches_batchnorm(momentum, device):
    """Three batches through DynamicBatchNorm2d.batch_affine (sums from channel_stats)
    against nn.BatchNorm2d on the same prefix: running statistics, the batch counter and
    the normalised output."""
    torch.manual_seed(5)
    ours = DynamicBatchNorm2d(12, momentum=momentum).to(device)
    ref = torch.nn.BatchNorm2d(5, momentum=momentum).to(device)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2)
        ours.bias.uniform_(-1, 1)
        ref.weight.copy_(ours.weight[:5])
        ref.bias.copy_(ours.bias[:5])
    untouched = ours.running_mean[5:].clone(), ours.running_var[5:].clone()
    for _ in range(3):
        z = (torch.randn(4, 5, 6, 7, device=device) * 2 + 0.5)
        scale, shift = ours.batch_affine(*channel_stats(z), z.numel() // 5)
        y = z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        torch.testing.assert_close(y, ref(z), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean[:5], ref.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.running_var[:5], ref.running_var, rtol=1e-6, atol=1e-6)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    assert torch.equal(ours.running_mean[5:], untouched[0])
    assert torch.equal(ours.running_var[5:], untouched[1])


@pytest.mark.parametrize("device", DEVICES)
def test_running_update_bumps_version_counters(device):
    """The update writes through data pointers; like PyTorch's own in-place ops it bumps
    the written tensors' versions, so autograd catches a saved tensor it changed."""
    s, q = _sums(random.Random(7), 4, 10, device)
    rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)
    nbt = torch.zeros((), dtype=torch.long, device=device)
    before = [t._version for t in (rm, rv, nbt)]
    bn_update_running_stats_(rm, rv, nbt, s, q, 10, 0.1)
    assert all(t._version > v for t, v in zip((rm, rv, nbt), before))
    w = torch.randn(6, device=device, requires_grad=True)
    loss = (w * rm).sum()  # saves rm for the backward
    bn_update_running_stats_(rm, rv, nbt, s, q, 10, 0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_a_clear_error(device):
    s = torch.rand(4, dtype=torch.float64, device=device)
    q = s + 1
    w = torch.ones(6, device=device)
    b = torch.zeros(6, device=device)
    op = torch.ops.bsnas.bn_affine_from_sums
    with pytest.raises(RuntimeError, match="sum must be float64"):
        op(s.float(), q, 10, w, b, 1e-5)
    with pytest.raises(RuntimeError, match="sum has 4 channels but sumsq has 3"):
        op(s, q[:3], 10, w, b, 1e-5)
    with pytest.raises(RuntimeError, match="weight must be 1-D with at least 4"):
        op(s, q, 10, w[:3], b, 1e-5)
    with pytest.raises(RuntimeError, match="count must be >= 1"):
        op(s, q, 0, w, b, 1e-5)
    with pytest.raises(RuntimeError, match="eps must be finite and >= 0"):
        op(s, q, 10, w, b, -1.0)
    nbt = torch.zeros((), dtype=torch.long, device=device)
    rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)
    upd = torch.ops.bsnas.bn_update_running_stats_
    with pytest.raises(RuntimeError, match="momentum must be in"):
        upd(rm, rv, nbt, s, q, 10, 2.0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        upd(torch.zeros(12, device=device)[::2], rv, nbt, s, q, 10, 0.1)
    with pytest.raises(RuntimeError, match="num_batches_tracked must be a one-element int64"):
        upd(rm, rv, nbt.float(), s, q, 10, 0.1)
    assert torch.equal(rm, torch.zeros(6, device=device)) and int(nbt) == 0  # nothing written
    with pytest.raises(ValueError, match="affine"):
        DynamicBatchNorm2d(6, affine=False).to(device).batch_affine(s, q, 10)


def test_spring_block_training_matches_plain_batchnorm():
    """The fused training forward (which now takes its BN statistics through these ops)
    against the eager composite of the same block: outputs, gradients, running stats."""
    from bsnas.nn import SpringBlock

    torch.manual_seed(6)
    a = SpringBlock(6, 6, 24, 3, 1).double().train()
    a.width = 10
    b = SpringBlock(6, 6, 24, 3, 1).double().train()
    b.load_state_dict(a.state_dict())
    b.width = 10
    x = torch.randn(3, 6, 9, 9, dtype=torch.float64)
    ya = a(x)
    act = F.relu6
    h = act(b.expand_bn(b.expand(x, 10)))
    h = act(b.depthwise_bn(b.depthwise(h)))
    yb = b.project_bn(b.project(h)) + x
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    for (n, p), (_, r) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-9, atol=1e-10, msg=n)
    for n, buf in a.named_buffers():
        torch.testing.assert_close(buf, dict(b.named_buffers())[n], rtol=1e-12, atol=1e-12, msg=n)
