"""The spring block: an inverted-residual (MBConv) block whose hidden width is chosen at
run time (BS-NAS, ../shared/BSNAS.md).

    x -> 1x1 expand -> BN -> act -> k x k depthwise (stride) -> BN -> act
      -> 1x1 project -> BN (+ x when stride 1 and in == out)

All widths share one set of full-width parameters; width c uses the first c expand
filters, depthwise filters and BN entries and the first c input columns of the project
weight. The convolutions are the masked ops of `bsnas.ops`, which read those prefixes
in place. In eval mode BN is folded into the active weights, cached per width, and the
block runs as `bsnas.ops.mbconv_folded` (three kernels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.weight_norm import WeightNorm

from bsnas.nn.batchnorm import DynamicBatchNorm2d
from bsnas.nn.masked_conv import MaskedDepthwiseConv2d, MaskedPointwiseConv2d
from bsnas.nn.module_state import state
from bsnas.nn.static import ACTIVATIONS, StaticMBConv
from bsnas.ops import ACTIVATION_CODES, mbconv_folded, mbconv_train
from bsnas.ops.masked_conv import _format



def _act_fn(name: str):
    return {"relu6": F.relu6, "relu": F.relu, "hswish": F.hardswish}[name]


def _in_layout_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`y` in `x`'s memory format (a no-op when it already is): at width 1 the hidden
    tensors are NCHW and channels_last at once, and the ops then compute in NCHW."""
    if _format(x) == torch.channels_last:
        return y.contiguous(memory_format=torch.channels_last)
    return y


def _weight(module: nn.Module) -> torch.Tensor:
    return state(module, "weight")


#: Forward pre-hooks that recompute a parameter attribute of a submodule from other
#: parameters (torch.nn.utils.prune, the old torch.nn.utils.weight_norm). The fused and
#: folded paths read the submodules' weights without calling the modules, so the block
#: runs these hooks itself, on every forward; other pre-hooks of its submodules run only
#: where a module is called (the eager path, and project_bn in training).
_WEIGHT_HOOKS = (BasePruningMethod, WeightNorm)

_BN_NAMES = ("expand_bn", "depthwise_bn", "project_bn")
_HOOKED = ("expand", "expand_bn", "depthwise", "depthwise_bn", "project", "project_bn")


def _cpu_nchw(x: torch.Tensor) -> bool:
    """A dense NCHW CPU tensor (not also channels_last): the inputs the block converts
    to channels_last where its channels_last kernels are the faster ones."""
    return (x.device.type == "cpu" and x.is_contiguous()
            and not x.is_contiguous(memory_format=torch.channels_last))


class SpringBlock(nn.Module):
    """MBConv with a searchable hidden width.

    Args:
        in_channels, out_channels: block input / output channels.
        max_width: the largest hidden width; parameters are allocated for it.
        kernel_size: odd depthwise kernel size (3, 5, 7, ...).
        stride: 1 or 2.
        activation: "relu6" (default), "relu" or "hswish".

    `block.width` (1..max_width, default max_width) is the active hidden width.
    Input `[N, in_channels, H, W]` -> output `[N, out_channels, H / stride, W / stride]`.
    """

    def __init__(self, in_channels: int, out_channels: int, max_width: int, kernel_size: int,
                 stride: int, activation: str = "relu6"):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("max_width", max_width)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SpringBlock: {name} must be a positive int, got {v!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"SpringBlock: activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {activation!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.max_width, self.kernel_size, self.stride = max_width, kernel_size, stride
        self.activation = activation
        self.residual = stride == 1 and in_channels == out_channels
        self.expand = MaskedPointwiseConv2d(in_channels, max_width)
        self.expand_bn = DynamicBatchNorm2d(max_width)
        self.depthwise = MaskedDepthwiseConv2d(max_width, kernel_size, stride)
        self.depthwise_bn = DynamicBatchNorm2d(max_width)
        self.project = MaskedPointwiseConv2d(max_width, out_channels)
        self.project_bn = DynamicBatchNorm2d(out_channels)
        self._width = max_width
        self._folded_cache: dict = {}

    # ------------------------------------------------------------------ width
    @property
    def width(self) -> int:
        return self._width

    @width.setter
    def width(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"SpringBlock.width must be an int, got {value!r}")
        if not 1 <= value <= self.max_width:
            raise ValueError(f"SpringBlock.width must be in [1, {self.max_width}], got {value}")
        self._width = value

    def extra_repr(self) -> str:
        return (f"in={self.in_channels}, out={self.out_channels}, max_width={self.max_width}, "
                f"k={self.kernel_size}, stride={self.stride}, width={self.width}, "
                f"act={self.activation}")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SpringBlock expects [N, {self.in_channels}, H, W], got "
                             f"{tuple(x.shape)}")
        m = self._modules
        for name in _BN_NAMES:
            if not isinstance(m[name], DynamicBatchNorm2d):
                raise TypeError(
                    f"SpringBlock.{name} is a {type(m[name]).__name__}, not a "
                    f"bsnas.nn.DynamicBatchNorm2d (nn.SyncBatchNorm.convert_sync_batchnorm "
                    f"replaces every BatchNorm it finds): the spring block's batch norms "
                    f"must stay DynamicBatchNorm2d, whose statistics are per process (as "
                    f"bsnas.train keeps them); convert only the modules outside the blocks")
        for name in _HOOKED:
            hooks = m[name]._forward_pre_hooks
            if hooks:
                for hook in list(hooks.values()):
                    if isinstance(hook, _WEIGHT_HOOKS):
                        hook(m[name], (x,))
        return _in_layout_of(x, self._forward(x))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and not (torch.is_grad_enabled() and
                                      _weight(self._modules["expand"]).requires_grad):
            return self._forward_folded(x)  # inference; gradients need the path below
        if self.training and self.activation in ACTIVATION_CODES and self._fused_ok():
            return self._forward_train_fused(x)
        act = _act_fn(self.activation)
        c = self._width
        h = act(self.expand_bn(self.expand(x, c)))
        h = act(self.depthwise_bn(self.depthwise(h)))
        h = self.project_bn(self.project(h))
        return h + x if self.residual else h

    def _fused_ok(self) -> bool:
        m = self._modules
        return all(bn.track_running_stats and bn.affine
                   for bn in (m["expand_bn"], m["depthwise_bn"]))

    #: On CPU the fused training path computes in channels_last, converting an NCHW
    #: input on the way in and the output back: the channels_last kernels are the
    #: faster ones there, conversions included (docs/performance.md).
    CPU_TRAIN_CHANNELS_LAST = True

    def _train_in_channels_last(self, x: torch.Tensor) -> bool:
        return self.CPU_TRAIN_CHANNELS_LAST and _cpu_nchw(x)

    # Training: one op from x to the project convolution (bsnas.ops.mbconv_train): the
    # expand BN + activation are applied inside the depthwise kernel as it reads its input
    # (the activation tensor between them never exists), both BNs use float64 batch sums
    # (E[z^2] - E[z]^2 does not cancel there) computed in passes the kernels make anyway,
    # and the whole stretch is one autograd node.
    def _forward_train_fused(self, x: torch.Tensor) -> torch.Tensor:
        if self._train_in_channels_last(x):
            y = self._forward_train_fused(x.contiguous(memory_format=torch.channels_last))
            return y.contiguous()
        m = self._modules
        bn1, bn2 = m["expand_bn"], m["depthwise_bn"]
        p, zsum, zsq, ysum, ysq = mbconv_train(
            x, _weight(m["expand"]), _weight(bn1), state(bn1, "bias"), _weight(m["depthwise"]),
            _weight(bn2), state(bn2, "bias"), _weight(m["project"]), self._width,
            self.stride, self.activation, bn1.eps, bn2.eps)
        bn1.update_running_stats(zsum, zsq, x.numel() // x.shape[1])
        bn2.update_running_stats(ysum, ysq, p.numel() // p.shape[1])
        h = m["project_bn"](p)
        return h + x if self.residual else h

    # Inference (eval mode, no gradient wanted): BN folded into the active weights. The
    # folded weights are copies of the active part, cached per width and rebuilt whenever
    # a parameter or BN buffer changes (every in-place update bumps the tensor's version
    # counter; writes through `tensor.data` do not, so code that changes weights that way,
    # as some EMA helpers do, must drop the copies with `block.train()` before eval).
    def _fold_key(self, c: int) -> tuple:
        """What the folded weights of width c are computed from: the tensors (by
        identity, so that a replaced parameter counts as a change), their version
        counters and the BN eps values. Read straight from the submodules' dicts: walking
        parameters() and buffers() took about 50 us a call, as long as the op itself."""
        m = self._modules
        ts = [_weight(m["expand"]), _weight(m["depthwise"]), _weight(m["project"])]
        eps = []
        for bn in (m["expand_bn"], m["depthwise_bn"], m["project_bn"]):
            ts += [state(bn, n) for n in ("weight", "bias", "running_mean", "running_var")]
            eps.append(bn.eps)
        ts = [t for t in ts if t is not None]
        try:
            versions = tuple([t._version for t in ts])
        except RuntimeError:  # inference tensors have no version counter: no caching
            return None, ts
        # The cache entry keeps these tensors alive, so no id can be reused while cached.
        return (c, tuple(map(id, ts)), versions, tuple(eps), ts[0].device, ts[0].dtype), ts

    def folded_weights(self, width: int | None = None) -> dict:
        """Eval-mode weights of the active configuration with BN folded in:
        `expand_w [c, in, 1, 1]`, `expand_b [c]`, `dw_w [c, 1, k, k]`, `dw_b [c]`,
        `project_w [out, c, 1, 1]`, `project_b [out]`."""
        c = self._width if width is None else width
        key, inputs = self._fold_key(c)
        hit = self._folded_cache.get(c)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():  # here, not as a decorator: a cache hit skips its cost
            folded = self._fold(c)
        if key is None:  # nothing would tell a later call that the inputs changed
            self._folded_cache.pop(c, None)
        else:
            self._folded_cache[c] = (key, folded, inputs)
        return folded

    def _fold(self, c: int) -> dict:
        s1, b1 = self.expand_bn.folded(c)
        s2, b2 = self.depthwise_bn.folded(c)
        s3, b3 = self.project_bn.folded(self.out_channels)
        folded = {
            "expand_w": self.expand.weight[:c] * s1.view(-1, 1, 1, 1), "expand_b": b1,
            "dw_w": self.depthwise.weight[:c] * s2.view(-1, 1, 1, 1), "dw_b": b2,
            "project_w": self.project.weight[:, :c] * s3.view(-1, 1, 1, 1), "project_b": b3,
        }
        return {k: v.contiguous() for k, v in folded.items()}

    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        f = self.folded_weights()
        if self.activation in ACTIVATION_CODES and not (
                torch.is_grad_enabled() and x.requires_grad):
            if self._fold_in_channels_last(x):
                return self._folded_op(x.contiguous(memory_format=torch.channels_last),
                                       f).contiguous()
            return self._folded_op(x, f)
        # hswish, or a gradient wanted for x: the same function in eager PyTorch.
        act = _act_fn(self.activation)
        c, k = self._width, self.kernel_size
        h = act(F.conv2d(x, f["expand_w"], f["expand_b"]))
        h = act(F.conv2d(h, f["dw_w"], f["dw_b"], self.stride, k // 2, 1, c))
        h = F.conv2d(h, f["project_w"], f["project_b"])
        return h + x if self.residual else h

    def _folded_op(self, x: torch.Tensor, f: dict) -> torch.Tensor:
        # Three kernels: expand GEMM, one depthwise kernel, project GEMM.
        return mbconv_folded(x, f["expand_w"], f["expand_b"], f["dw_w"], f["dw_b"],
                             f["project_w"], f["project_b"], self.stride, self.activation,
                             self.residual)

    #: On CPU, NCHW inputs whose output planes are narrower than this run the folded op
    #: in channels_last (converted in and out): its NCHW depthwise pays a per-plane cost
    #: on small planes (measurements in docs/performance.md).
    CPU_FOLDED_NCHW_MIN_WIDTH = 16

    def _fold_in_channels_last(self, x: torch.Tensor) -> bool:
        return _cpu_nchw(x) and -(-x.shape[-1] // self.stride) < self.CPU_FOLDED_NCHW_MIN_WIDTH

    def train(self, mode: bool = True):
        if mode:  # training changes the weights: free the folded copies
            self._folded_cache.clear()
        return super().train(mode)

    # ------------------------------------------------------------------ channel order
    @torch.no_grad()
    def channel_importance(self) -> torch.Tensor:
        """L1 norm of each hidden channel's project-weight column, `[max_width]`."""
        return self.project.weight.abs().sum(dim=(0, 2, 3))

    @torch.no_grad()
    def reorder_channels(self, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
        """Permute the hidden channels by decreasing importance, so that width c keeps
        the c most important ones. Every parameter and BN buffer indexed by the hidden
        channel is permuted, and so is any `optimizer` state of the same shape as its
        parameter (momentum, Adam moments). The full-width function is unchanged.
        Returns the permutation (new position i holds old channel perm[i])."""
        perm = torch.argsort(self.channel_importance(), descending=True, stable=True)
        rows = [self.expand.weight, self.depthwise.weight, self.expand_bn.weight,
                self.expand_bn.bias, self.depthwise_bn.weight, self.depthwise_bn.bias]
        cols = [self.project.weight]
        state = optimizer.state if optimizer is not None else {}

        def permute(t: torch.Tensor, dim: int) -> None:
            t.copy_(t.index_select(dim, perm.to(t.device)))

        for p, dim in [(p, 0) for p in rows] + [(p, 1) for p in cols]:
            permute(p, dim)
            for v in state.get(p, {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    permute(v, dim)
        for bn in (self.expand_bn, self.depthwise_bn):
            permute(bn.running_mean, 0)
            permute(bn.running_var, 0)
        return perm

    # ------------------------------------------------------------------ static twin
    @torch.no_grad()
    def to_static(self, width: int | None = None) -> "StaticMBConv":
        """A plain torch.nn block (Conv2d/BatchNorm2d) with copies of the active weights
        and statistics, computing the same function as this block at `width`."""
        c = self._width if width is None else width
        if not 1 <= c <= self.max_width:
            raise ValueError(f"to_static: width must be in [1, {self.max_width}], got {c}")
        s = StaticMBConv(self.in_channels, self.out_channels, c, self.kernel_size,
                         self.stride, self.activation)
        dev, dt = self.expand.weight.device, self.expand.weight.dtype
        s.to(device=dev, dtype=dt)
        s.expand.weight.copy_(self.expand.weight[:c])
        s.depthwise.weight.copy_(self.depthwise.weight[:c])
        s.project.weight.copy_(self.project.weight[:, :c])
        for dst, src, n in ((s.expand_bn, self.expand_bn, c), (s.depthwise_bn, self.depthwise_bn, c),
                            (s.project_bn, self.project_bn, self.out_channels)):
            dst.weight.copy_(src.weight[:n])
            dst.bias.copy_(src.bias[:n])
            dst.running_mean.copy_(src.running_mean[:n])
            dst.running_var.copy_(src.running_var[:n])
            dst.num_batches_tracked.copy_(src.num_batches_tracked)
            dst.eps, dst.momentum = src.eps, src.momentum
        s.train(self.training)
        return s

