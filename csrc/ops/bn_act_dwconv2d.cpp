// bsnas::bn_act_dwconv2d, the spring block's fused depthwise pass in training:
//
//   a = act(z * scale + shift)                    (BN of the expand output, folded)
//   y = conv2d(a, weight[:width], groups=width)   (masked depthwise convolution)
//   sum = y.sum((0, 2, 3)), sumsq = (y * y).sum((0, 2, 3))   (statistics for the next BN,
//                                                              float64)
//
// Both backends are fused, forward and backward: BN + activation are applied as z is
// read, so neither u = z * scale + shift nor a = act(u) ever exists as a tensor, and
// training keeps no activation tensor between the expand and depthwise convolutions
// (the backward recomputes a from z). Kernels: cpu/bn_act_dwconv2d_kernel.h (registered
// in cpu/register_cpu.cpp) and cuda/bn_act_dwconv2d_kernel.cu; autograd in
// autograd/bn_act_dwconv2d.cpp; the fake kernels are registered from Python (bsnas/ops/bn_act_dwconv.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bsnas, m) {
  // Returns (y [N, width, Ho, Wo], sum [width], sumsq [width]); sum and sumsq are
  // float64 whatever z's dtype (accumulated in double: the next BN's variance
  // E[y^2] - E[y]^2 would cancel in float32 on near-constant channels).
  m.def(
      "bn_act_dwconv2d(Tensor z, Tensor scale, Tensor shift, Tensor weight, SymInt width, "
      "int stride, int padding, int dilation, int activation) -> (Tensor, Tensor, Tensor)");
  // Given the gradients of (y, sum, sumsq), returns (grad_z, grad_scale, grad_shift,
  // grad_weight [C_max, 1, k, k], zero past `width`).
  m.def(
      "_bn_act_dwconv2d_backward(Tensor grad_y, Tensor grad_sum, Tensor grad_sumsq, "
      "Tensor z, Tensor scale, Tensor shift, Tensor weight, Tensor y, SymInt width, "
      "int stride, int padding, int dilation, int activation) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
}
