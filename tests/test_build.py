"""What the build contains."""
import os

import torch

import bsnas


def test_cuda_kernels_compiled_in_ci():
    """CI has a CUDA build of torch and nvcc: the CUDA kernels must be in the build, so a
    kernel that stops compiling cannot land."""
    if os.environ.get("CI") == "true" and torch.version.cuda:
        assert bsnas.cuda_compiled(), "CI build lacks the CUDA kernels"
    assert isinstance(bsnas.cuda_compiled(), bool)


def test_ops_registered_for_built_backends():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in ("bsnas::masked_dwconv2d", "bsnas::masked_pwconv2d",
               "bsnas::_masked_dwconv2d_backward", "bsnas::_masked_pwconv2d_backward"):
        assert has(op, "CPU")
        assert has(op, "CUDA") == bsnas.cuda_compiled()
