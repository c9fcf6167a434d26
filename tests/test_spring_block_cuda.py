"""SpringBlock on CUDA against the same block on the CPU in float64 (skips without a
GPU). Rounding is judged against plain PyTorch: the block's error must stay within a
small factor of the slicing baseline's (F.conv2d on weight slices, same device, dtype
and autocast), plus a floor. TF32 is off, so float32 means float32."""
import copy
import os
import sys
import types

import pytest
import torch

import bsnas
from bsnas.nn import SpringBlock

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
from baselines import slicing_forward  # noqa: E402

NEED_CUDA = os.environ.get("BSNAS_REQUIRE_CUDA") == "1"
pytestmark = pytest.mark.skipif(
    not NEED_CUDA and not (torch.cuda.is_available() and bsnas.cuda_compiled()),
    reason="needs a CUDA device and the CUDA kernels")


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def _run(block, x, g, amp):
    """Forward (under bf16 autocast if `amp`) and backward; returns y, x.grad and the
    parameter gradients by name."""
    x = x.detach().requires_grad_()
    block.zero_grad(set_to_none=True)
    with torch.autocast("cuda", torch.bfloat16, enabled=amp):
        y = block(x)
    y.float().backward(g)
    return y, x.grad, {n: p.grad for n, p in block.named_parameters()}


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("args,width", [((16, 16, 96, 3, 1), 40), ((24, 40, 144, 5, 2), 72),
                                        ((40, 40, 240, 7, 1), 240)])
def test_matches_cpu_float64(args, width, amp, training, fmt):
    torch.manual_seed(0)
    ref = SpringBlock(*args).double()
    ref.width = width
    with torch.no_grad():
        for bn in (ref.expand_bn, ref.depthwise_bn, ref.project_bn):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    ours = copy.deepcopy(ref).float().cuda().train(training)
    plain = copy.deepcopy(ours)
    plain.forward = types.MethodType(slicing_forward, plain)
    ref.train(training)
    x = torch.randn(8, args[0], 28, 28, dtype=torch.float64).requires_grad_()
    y_ref = ref(x)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    want = {"y": y_ref, "x.grad": x.grad}
    want.update((n, p.grad) for n, p in ref.named_parameters())
    xg = x.detach().float().cuda().to(memory_format=fmt)
    results = {}
    for name, block in (("ours", ours), ("plain", plain)):
        y, gx, grads = _run(block, xg, g.float().cuda(), amp)
        results[name] = {"y": y, "x.grad": gx, **grads}
    if training:
        for bn in ("expand_bn", "depthwise_bn", "project_bn"):
            want[bn + ".running_var"] = getattr(ref, bn).running_var
            for name, block in (("ours", ours), ("plain", plain)):
                results[name][bn + ".running_var"] = getattr(block, bn).running_var
    floor = 5e-3 if amp else 1e-5
    for key, w in want.items():
        e_ours, e_plain = _rel(results["ours"][key], w), _rel(results["plain"][key], w)
        print(f"{key}: ours {e_ours:.2e} plain {e_plain:.2e}")
        assert e_ours <= 3 * e_plain + floor, (key, e_ours, e_plain)


def test_inference_folding_on_cuda():
    torch.manual_seed(1)
    block = SpringBlock(16, 16, 96, 5, 1).cuda().eval()
    block.width = 48
    x = torch.randn(4, 16, 20, 20, device="cuda")
    with torch.no_grad():
        folded = block(x)
        static = block.to_static()(x)
    assert _rel(folded, static) < 1e-5


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("args", [(16, 16, 96, 3, 1), (24, 40, 144, 5, 2), (40, 40, 240, 7, 1)])
def test_inference_is_three_launches(args, fmt):
    """Eval without gradients: the folded block is the expand GEMM, one depthwise kernel
    and the project GEMM, nothing else, and equals the static twin."""
    torch.manual_seed(2)
    block = SpringBlock(*args).cuda().eval()
    block.width = args[2] // 2
    x = torch.randn(8, args[0], 28, 28, device="cuda").to(memory_format=fmt)
    with torch.no_grad():
        y = block(x)  # warm-up: folds and caches the weights, loads cuBLAS
        static = block.to_static()(x)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            block(x)
            torch.cuda.synchronize()
    kernels = [e.name for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    assert 1 <= len(kernels) <= 3, kernels
    assert _rel(y, static) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_mbconv_folded_matches_cpu(dtype, fmt):
    """The folded op on CUDA against F.conv2d in float64 on the CPU, random shapes:
    float32 within 1e-5 relative, half types within 1e-2."""
    import random

    from bsnas.ops import mbconv_folded
    from test_mbconv_folded import make_case, reference  # tests/ is on sys.path

    rng = random.Random(9)
    torch.manual_seed(9)
    for _ in range(10):
        x, ws, stride, residual = make_case(rng, torch.float64, fmt)
        for act in ("relu6", "relu", "identity"):
            y = mbconv_folded(x.to("cuda", dtype), *(w.to("cuda", dtype) for w in ws),
                              stride=stride, activation=act, residual=residual)
            ref = reference(x, *ws, stride, act, residual)
            assert y.dtype == dtype and y.shape == ref.shape
            assert _rel(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
