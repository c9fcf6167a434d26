"""Modules over the masked convolution ops: full-width weights, run-time active width.

Other NAS code can use these directly: each module owns the weight of its largest
configuration and computes only the active part of it, reading the weight in place.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from bsnas.ops import masked_dwconv2d, masked_pwconv2d


class MaskedPointwiseConv2d(nn.Module):
    """1x1 convolution, no bias, with weight `[out_max, in_max, 1, 1]`.

    `forward(x, out_width=None)`: `x` is `[N, in_width, H, W]` with any
    `in_width <= in_max`; returns `[N, out_width, H, W]` (default `out_max`).
    """

    def __init__(self, in_max: int, out_max: int):
        super().__init__()
        if in_max < 1 or out_max < 1:
            raise ValueError(f"channel counts must be >= 1, got in={in_max}, out={out_max}")
        self.in_max, self.out_max = in_max, out_max
        self.weight = nn.Parameter(torch.empty(out_max, in_max, 1, 1))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def forward(self, x: torch.Tensor, out_width: int | None = None) -> torch.Tensor:
        return masked_pwconv2d(x, self.weight, x.shape[1],
                               self.out_max if out_width is None else out_width)

    def extra_repr(self) -> str:
        return f"in_max={self.in_max}, out_max={self.out_max}"


class MaskedDepthwiseConv2d(nn.Module):
    """Depthwise k x k convolution, no bias, with weight `[channels_max, 1, k, k]` and
    "same" padding. `forward(x)`: `x` is `[N, width, H, W]`, width <= channels_max;
    returns `[N, width, ceil(H / stride), ceil(W / stride)]`."""

    def __init__(self, channels_max: int, kernel_size: int, stride: int = 1):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.channels_max, self.kernel_size, self.stride = channels_max, kernel_size, stride
        self.weight = nn.Parameter(torch.empty(channels_max, 1, kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_dwconv2d(x, self.weight, x.shape[1], self.stride, self.kernel_size // 2, 1)

    def extra_repr(self) -> str:
        return f"channels_max={self.channels_max}, kernel_size={self.kernel_size}, stride={self.stride}"
