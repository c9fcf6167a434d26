// bsnas::bn_act_dwconv2d, the spring block's fused depthwise pass in training:
//
//   a = act(z * scale + shift)                    (BN of the expand output, folded)
//   y = conv2d(a, weight[:width], groups=width)   (masked depthwise convolution)
//   sum = y.sum((0, 2, 3)), sumsq = (y * y).sum((0, 2, 3))   (statistics for the next BN)
//
// The CPU kernel (cpu/bn_act_dwconv2d_kernel.cpp) does it in one pass: `a` exists only
// in a per-task scratch, never as a tensor. The backward recomputes `a` from `z`, so
// training keeps no activation tensor between the expand and depthwise convolutions.
// The CUDA forward is still composite (separate elementwise, conv and reduction
// kernels); a fused CUDA kernel is future work.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "masked_conv_common.h"

namespace bsnas {

TORCH_LIBRARY_FRAGMENT(bsnas, m) {
  // Returns (y [N, width, Ho, Wo], sum [width], sumsq [width]).
  m.def(
      "bn_act_dwconv2d(Tensor z, Tensor scale, Tensor shift, Tensor weight, SymInt width, "
      "int stride, int padding, int dilation, int activation) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_z, grad_scale, grad_shift, grad_weight [C_max, 1, k, k]).
  m.def(
      "_bn_act_dwconv2d_backward(Tensor grad_y, Tensor grad_sum, Tensor grad_sumsq, "
      "Tensor z, Tensor scale, Tensor shift, Tensor weight, Tensor y, SymInt width, "
      "int stride, int padding, int dilation, int activation) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
}

namespace {

constexpr const char* kFwd = "bn_act_dwconv2d";
constexpr const char* kBwd = "bn_act_dwconv2d_backward";

at::Tensor per_channel(const at::Tensor& v) { return v.view({1, -1, 1, 1}); }

at::Tensor act_forward(const at::Tensor& u, int64_t act) {
  if (act == kActReLU) return at::relu(u);
  if (act == kActReLU6) return at::clamp(u, 0, 6);
  return u;
}

// d act / d u, as F.relu / F.relu6 define it (zero at the kinks).
at::Tensor act_grad(const at::Tensor& grad, const at::Tensor& u, int64_t act) {
  if (act == kActReLU) return grad * (u > 0);
  if (act == kActReLU6) return grad * ((u > 0) & (u < 6));
  return grad;
}

std::tuple<at::Tensor, at::Tensor> dw_backward(const at::Tensor& gy, const at::Tensor& x,
                                               const at::Tensor& w, int64_t width,
                                               int64_t stride, int64_t padding,
                                               int64_t dilation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bsnas::_masked_dwconv2d_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt,
                           int64_t, int64_t, int64_t)>();
  return op.call(gy, x, w, c10::SymInt(width), stride, padding, dilation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& grad_sum, const at::Tensor& grad_sumsq,
    const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& weight, const at::Tensor& y, int64_t width, int64_t stride,
    int64_t padding, int64_t dilation, int64_t act) {
  const DwGeometry g = check_dw_args(kBwd, z, weight, width, stride, padding, dilation);
  check_affine_act(kBwd, z, scale, shift, width, act);
  check_grad_out(kBwd, grad_y, z, {g.N, g.C, g.Ho, g.Wo});
  check_grad_out(kBwd, y, z, {g.N, g.C, g.Ho, g.Wo});
  check_grad_out(kBwd, grad_sum, z, {g.C});
  check_grad_out(kBwd, grad_sumsq, z, {g.C});
  const auto fmt = compute_format(z);
  // The statistics outputs feed back into y's gradient: d sum/dy = 1, d sumsq/dy = 2y.
  const at::Tensor gy = (grad_y + per_channel(grad_sum) + 2 * y * per_channel(grad_sumsq))
                            .contiguous(fmt);
  const at::Tensor u = z * per_channel(scale) + per_channel(shift);
  auto [ga, gw] = dw_backward(gy, act_forward(u, act).contiguous(fmt), weight, width, stride,
                              padding, dilation);
  const at::Tensor gu = act_grad(ga, u, act);
  return {(gu * per_channel(scale)).contiguous(fmt), (gu * z).sum({0, 2, 3}),
          gu.sum({0, 2, 3}), gw};
}

#ifdef BSNAS_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_composite(
    const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& weight, int64_t width, int64_t stride, int64_t padding, int64_t dilation,
    int64_t act) {
  check_dw_args(kFwd, z, weight, width, stride, padding, dilation);
  check_affine_act(kFwd, z, scale, shift, width, act);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bsnas::masked_dwconv2d", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt,
                                         int64_t, int64_t, int64_t)>();
  const auto fmt = compute_format(z);
  const at::Tensor a = act_forward(z * per_channel(scale) + per_channel(shift), act).contiguous(fmt);
  at::Tensor y = op.call(a, weight, c10::SymInt(width), stride, padding, dilation);
  const auto acc = at::toOpMathType(z.scalar_type());
  return {y, y.sum({0, 2, 3}, false, acc).to(z.scalar_type()),
          y.square().sum({0, 2, 3}, false, acc).to(z.scalar_type())};
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, CPU, m) { m.impl("_bn_act_dwconv2d_backward", &backward); }

#ifdef BSNAS_WITH_CUDA
TORCH_LIBRARY_IMPL(bsnas, CUDA, m) {
  m.impl("bn_act_dwconv2d", &forward_composite);
  m.impl("_bn_act_dwconv2d_backward", &backward);
}
#endif

}  // namespace bsnas
