"""Masked variable-width convolutions: Python entry points and fake kernels (for
torch.compile) of the `torch.ops.bsnas` ops defined in `csrc/ops/`; their autograd is
registered in C++ (`csrc/ops/autograd/`).

Both ops read a full-width weight with an active width and never copy a slice of it:

- `masked_dwconv2d(x, weight, width)`: `x` is `[N, width, H, W]`, `weight` the full
  depthwise weight `[C_max, 1, k, k]`; equals
  `F.conv2d(x, weight[:width], None, stride, padding, dilation, groups=width)`.
- `masked_pwconv2d(x, weight, in_width, out_width)`: `x` is `[N, in_width, H, W]`,
  `weight` the full `[Cout_max, Cin_max, 1, 1]`; equals
  `F.conv2d(x, weight[:out_width, :in_width])`.

Weight gradients have the full weight's shape and are zero outside the active part.
Results are channels_last when `x` is channels_last (and not also NCHW-contiguous).
"""
from __future__ import annotations

import torch

from bsnas.extension import _C  # noqa: F401  (loads the library, registering the ops)

__all__ = ["masked_dwconv2d", "masked_pwconv2d"]

_ops = torch.ops.bsnas


def _format(x: torch.Tensor) -> torch.memory_format:
    # Mirrors bsnas::compute_format in csrc/ops/masked_conv_common.h.
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _autocast(*tensors):
    """Under CUDA autocast, run in the autocast dtype (like F.conv2d): cast the floating
    inputs, weights included, to it. Outside autocast the tensors pass unchanged."""
    if tensors[0].is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)
    return tensors


def _conv_out(size, k: int, stride: int, padding: int, dilation: int):
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


# --------------------------------------------------------------------------- depthwise


def masked_dwconv2d(x: torch.Tensor, weight: torch.Tensor, width=None, stride: int = 1,
                    padding: int | None = None, dilation: int = 1) -> torch.Tensor:
    """Depthwise conv of `x` [N, width, H, W] with the first `width` filters of `weight`
    [C_max, 1, k, k]. `width` defaults to x's channels, `padding` to "same"
    (`dilation * (k - 1) // 2`). Returns [N, width, H_out, W_out]."""
    if width is None:
        width = x.shape[1]
    if padding is None:
        padding = dilation * (weight.shape[-1] - 1) // 2
    x, weight = _autocast(x, weight)
    return _ops.masked_dwconv2d(x, weight, width, stride, padding, dilation)


@torch.library.register_fake("bsnas::masked_dwconv2d")
def _dw_fake(x, weight, width, stride, padding, dilation):
    torch._check(x.dim() == 4, lambda: "masked_dwconv2d: x must be 4-D")
    torch._check(weight.dim() == 4, lambda: "masked_dwconv2d: weight must be 4-D")
    torch._check(x.shape[1] == width, lambda: "masked_dwconv2d: x channels != width")
    torch._check(width >= 1, lambda: "masked_dwconv2d: width must be >= 1")
    torch._check(width <= weight.shape[0], lambda: "masked_dwconv2d: width > C_max")
    k = weight.shape[2]
    n, _, h, w = x.shape
    shape = (n, width, _conv_out(h, k, stride, padding, dilation),
             _conv_out(w, k, stride, padding, dilation))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_format(x))


@torch.library.register_fake("bsnas::_masked_dwconv2d_backward")
def _dw_backward_fake(grad_out, x, weight, width, stride, padding, dilation):
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_format(x))
    return gx, torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)




# --------------------------------------------------------------------------- pointwise


def masked_pwconv2d(x: torch.Tensor, weight: torch.Tensor, in_width=None,
                    out_width=None) -> torch.Tensor:
    """1x1 conv of `x` [N, in_width, H, W] with the block `weight[:out_width, :in_width]`
    of the full `weight` [Cout_max, Cin_max, 1, 1]. `in_width` defaults to x's
    channels, `out_width` to Cout_max. Returns [N, out_width, H, W]."""
    if in_width is None:
        in_width = x.shape[1]
    if out_width is None:
        out_width = weight.shape[0]
    x, weight = _autocast(x, weight)
    return _ops.masked_pwconv2d(x, weight, in_width, out_width)


@torch.library.register_fake("bsnas::masked_pwconv2d")
def _pw_fake(x, weight, in_width, out_width):
    torch._check(x.dim() == 4, lambda: "masked_pwconv2d: x must be 4-D")
    torch._check(x.shape[1] == in_width, lambda: "masked_pwconv2d: x channels != in_width")
    torch._check(in_width <= weight.shape[1], lambda: "masked_pwconv2d: in_width > Cin_max")
    torch._check(out_width <= weight.shape[0], lambda: "masked_pwconv2d: out_width > Cout_max")
    torch._check(in_width >= 1, lambda: "masked_pwconv2d: in_width must be >= 1")
    torch._check(out_width >= 1, lambda: "masked_pwconv2d: out_width must be >= 1")
    n, _, h, w = x.shape
    return torch.empty((n, out_width, h, w), dtype=x.dtype, device=x.device,
                       memory_format=_format(x))


@torch.library.register_fake("bsnas::_masked_pwconv2d_backward")
def _pw_backward_fake(grad_out, x, weight, in_width, out_width):
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_format(x))
    return gx, torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
