"""Comparison of a fused op's outputs and gradients with a float64 PyTorch reference,
shared by the tests of the fused ops: the reference activations, the two memory formats,
random depthwise cases."""
import pytest
import torch
import torch.nn.functional as F

# PyTorch's function for each activation name the kernels take (ACTIVATION_CODES).
ACTS = {"identity": lambda t: t, "relu": F.relu, "relu6": F.relu6}

# Parametrizes a test over NCHW and channels_last as `fmt`.
FORMATS = pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                                  ids=["nchw", "cl"])


def assert_matches_float64(got, want, inputs, ref_inputs, dtype, upstream=None,
                           grad_tol=1e-5):
    """`got`: the op's outputs (computed in `dtype` from `inputs`); `want`: the float64
    reference's outputs from `ref_inputs`. The first `upstream` outputs (all by default)
    receive one random upstream gradient each; outputs and the gradients of the inputs
    must agree: float64 elementwise (rtol 1e-10, atol 1e-9), float32 within 1e-5 in
    relative L2 norm (the reduction order differs; `grad_tol` for the gradients). Returns
    the op's input gradients."""
    upstream = len(want) if upstream is None else upstream
    grads = [torch.randn_like(t) for t in want[:upstream]]
    loss_got = sum((g.to(t.dtype) * t).sum() for g, t in zip(grads, got))
    loss_want = sum((g * t).sum() for g, t in zip(grads, want))
    d_got = torch.autograd.grad(loss_got, inputs)
    d_want = torch.autograd.grad(loss_want, ref_inputs)
    tols = [1e-5] * len(got) + [grad_tol] * len(d_got)
    for a, b, tol in zip([*got, *d_got], [*want, *d_want], tols):
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9)
        else:
            err = ((a.double() - b).norm() / b.norm().clamp_min(1e-12)).item()
            assert err < tol, err
    return d_got


def random_depthwise_shape(rng, c_max_hi, hw_hi):
    """A random depthwise case: (k, stride, c_max, width, n, h, w) with k in 3/5/7,
    stride 1 or 2, 1 <= width <= c_max <= c_max_hi and planes of k // 2 + 1 to hw_hi."""
    k, stride = rng.choice([3, 5, 7]), rng.choice([1, 2])
    c_max = rng.randint(1, c_max_hi)
    width = rng.randint(1, c_max)
    n, h, w = rng.randint(1, 3), rng.randint(k // 2 + 1, hw_hi), rng.randint(k // 2 + 1, hw_hi)
    return k, stride, c_max, width, n, h, w
