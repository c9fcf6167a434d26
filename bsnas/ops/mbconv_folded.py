"""The folded spring block in inference, `torch.ops.bsnas.mbconv_folded`:

    z   = conv1x1(x, expand_w)                              # GEMM
    h   = act(dwconv(act(z + expand_b), dw_w) + dw_b)       # one depthwise kernel
    out = conv1x1(h, project_w) + project_b (+ x)           # GEMM accumulating into
                                                            # project_b (+ x)

with every BatchNorm folded into the weights and biases (`SpringBlock.folded_weights`).
Three kernel launches on CUDA (the two GEMMs and the depthwise kernel, which also writes
the GEMM's initial value), the same three stages on CPU. Inference only: not
differentiable (the spring block uses its training path when gradients are wanted).
"""
from __future__ import annotations

import torch

from bsnas.extension import _C  # noqa: F401  (registers the ops)
from bsnas.ops.bn_act_dwconv import _act_code
from bsnas.ops.masked_conv import _autocast, _conv_out, _format

__all__ = ["mbconv_folded"]

_ops = torch.ops.bsnas


def mbconv_folded(x, expand_w, expand_b, dw_w, dw_b, project_w, project_b, stride: int = 1,
                  activation: str = "relu6", residual: bool = False) -> torch.Tensor:
    """See the module docstring. Shapes: `x [N, in, H, W]`, `expand_w [c, in, 1, 1]`,
    `expand_b [c]`, `dw_w [c, 1, k, k]` (odd k, "same" padding), `dw_b [c]`,
    `project_w [out, c, 1, 1]`, `project_b [out]`; `residual` adds `x` (stride 1,
    out == in). Returns `[N, out, H / stride, W / stride]` in x's memory format."""
    act = _act_code(activation)
    args = _autocast(x, expand_w, expand_b, dw_w, dw_b, project_w, project_b)
    return _ops.mbconv_folded(*args, stride, act, residual)


def _empty(x, channels, h, w):
    return torch.empty((x.shape[0], channels, h, w), dtype=x.dtype, device=x.device,
                       memory_format=_format(x))


@torch.library.register_fake("bsnas::mbconv_folded")
def _fake(x, expand_w, expand_b, dw_w, dw_b, project_w, project_b, stride, activation,
          residual):
    torch._check(x.dim() == 4, lambda: "mbconv_folded: x must be 4-D")
    torch._check(expand_w.shape[1] == x.shape[1], lambda: "mbconv_folded: expand_w's "
                 "input channels != x's channels")
    torch._check(project_w.shape[1] == expand_w.shape[0], lambda: "mbconv_folded: "
                 "project_w's input channels != the hidden width")
    k = dw_w.shape[2]
    ho = _conv_out(x.shape[2], k, stride, k // 2, 1)
    wo = _conv_out(x.shape[3], k, stride, k // 2, 1)
    return _empty(x, project_w.shape[0], ho, wo)


@torch.library.register_fake("bsnas::_mbconv_folded_depthwise")
def _depthwise_fake(z, expand_b, dw_w, dw_b, project_b, shortcut, stride, activation):
    torch._check(z.dim() == 4, lambda: "_mbconv_folded_depthwise: z must be 4-D")
    k = dw_w.shape[2]
    ho = _conv_out(z.shape[2], k, stride, k // 2, 1)
    wo = _conv_out(z.shape[3], k, stride, k // 2, 1)
    return _empty(z, z.shape[1], ho, wo), _empty(z, project_b.shape[0], ho, wo)
