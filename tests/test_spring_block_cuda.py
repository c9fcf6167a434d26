"""SpringBlock on CUDA against the same block on the CPU in float64 (skips without a
GPU): float32 within 1e-4 relative; bf16 autocast within 3e-2 relative (bf16 has an
8-bit mantissa and the block chains three convolutions and three BNs)."""
import copy
import os

import pytest
import torch

import bsnas
from bsnas.nn import SpringBlock

NEED_CUDA = os.environ.get("BSNAS_REQUIRE_CUDA") == "1"
pytestmark = pytest.mark.skipif(
    not NEED_CUDA and not (torch.cuda.is_available() and bsnas.cuda_compiled()),
    reason="needs a CUDA device and the CUDA kernels")


def _rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


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
    gpu = copy.deepcopy(ref).float().cuda()
    ref.train(training), gpu.train(training)
    x = torch.randn(8, args[0], 28, 28, dtype=torch.float64)
    xg = x.float().cuda().to(memory_format=fmt).requires_grad_()
    xr = x.clone().requires_grad_()
    with torch.autocast("cuda", torch.bfloat16, enabled=amp):
        y = gpu(xg)
    y_ref = ref(xr)
    g = torch.randn_like(y_ref)
    y.float().backward(g.float().cuda())
    y_ref.backward(g)
    tol = 3e-2 if amp else 1e-4
    assert _rel(y, y_ref) < tol
    assert _rel(xg.grad, xr.grad) < tol
    for (name, p), (_, q) in zip(gpu.named_parameters(), ref.named_parameters()):
        assert _rel(p.grad, q.grad) < tol, name
    if training:
        for bn in ("expand_bn", "depthwise_bn", "project_bn"):
            assert _rel(getattr(gpu, bn).running_var, getattr(ref, bn).running_var) < tol


def test_inference_folding_on_cuda():
    torch.manual_seed(1)
    block = SpringBlock(16, 16, 96, 5, 1).cuda().eval()
    block.width = 48
    x = torch.randn(4, 16, 20, 20, device="cuda")
    with torch.no_grad():
        folded = block(x)
        static = block.to_static()(x)
    assert _rel(folded, static) < 1e-5
