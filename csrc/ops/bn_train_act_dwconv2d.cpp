// bsnas::bn_train_act_dwconv2d, the spring block's expand BN in training mode with the
// fused depthwise pass behind it:
//
//   zsum, zsumsq = channel_stats(z)                                   (float64)
//   scale, shift = bn_affine_from_sums(zsum, zsumsq, N*H*W, bn_weight, bn_bias, eps)
//   y, ysum, ysumsq = bn_act_dwconv2d(z, scale, shift, weight, width, ...)
//
// One op, and one autograd node, for what were three: the backward then adds the batch
// statistics' share of z's gradient, grad_zsum[c] + 2 z grad_zsumsq[c], in place into the
// depthwise backward's grad_z. Through three nodes that share came as a fresh tensor
// (one more pass, and on CPU the page faults of a new large output) which autograd then
// added to grad_z: on the dev box 1.15 ms of a 6.6 ms training step of the proxyless
// 56x56 24->40 block at width 25 %. zsum / zsumsq come out for the running-statistics
// update (bn_update_running_stats_) and are not differentiable.
//
// The forward is a composite of the three ops (their CPU and CUDA kernels); the autograd
// kernel is in autograd.cpp, the fake kernel in bsnas/ops/bn_act_dwconv.py.
#include <torch/library.h>

#include <tuple>

#include "bn_train_act_dwconv2d.h"
#include "op_handles.h"

namespace bsnas {

TORCH_LIBRARY_FRAGMENT(bsnas, m) {
  // Returns (y [N, width, Ho, Wo], ysum [width], ysumsq [width], zsum [width],
  // zsumsq [width]); the four sums are float64. bn_weight / bn_bias: [C_max >= width].
  m.def(
      "bn_train_act_dwconv2d(Tensor z, Tensor bn_weight, Tensor bn_bias, float eps, "
      "Tensor weight, SymInt width, int stride, int padding, int dilation, int activation) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

BnTrainForward bn_train_act_dwconv2d_forward(const at::Tensor& z, const at::Tensor& bn_weight,
                                             const at::Tensor& bn_bias, double eps,
                                             const at::Tensor& weight, const c10::SymInt& width,
                                             int64_t stride, int64_t padding, int64_t dilation,
                                             int64_t act) {
  static const auto stats = handle<StatsSig>("bsnas::channel_stats");
  static const auto affine = handle<AffineSig>("bsnas::bn_affine_from_sums");
  static const auto dw = handle<BnActSig>("bsnas::bn_act_dwconv2d");
  TORCH_CHECK(z.dim() == 4, "bn_train_act_dwconv2d: z must be 4-D [N, width, H, W], got ",
              z.dim(), "-D");
  TORCH_CHECK(z.sym_size(1) == width, "bn_train_act_dwconv2d: z has ", z.sym_size(1),
              " channels, the width is ", width);
  TORCH_CHECK(z.sym_numel() > 0, "bn_train_act_dwconv2d: z is empty (BN needs values)");
  BnTrainForward f;
  std::tie(f.zsum, f.zsumsq) = stats.call(z);
  auto [scale, shift] =
      affine.call(f.zsum, f.zsumsq, z.sym_numel() / width, bn_weight, bn_bias, eps);
  // BN's affine map in z's dtype (autocast on CUDA runs z in half precision).
  f.scale = as_dtype(scale, z.scalar_type());
  f.shift = as_dtype(shift, z.scalar_type());
  std::tie(f.y, f.ysum, f.ysumsq) =
      dw.call(z, f.scale, f.shift, weight, width, stride, padding, dilation, act);
  return f;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite(
    const at::Tensor& z, const at::Tensor& bn_weight, const at::Tensor& bn_bias, double eps,
    const at::Tensor& weight, c10::SymInt width, int64_t stride, int64_t padding,
    int64_t dilation, int64_t act) {
  auto f = bn_train_act_dwconv2d_forward(z, bn_weight, bn_bias, eps, weight, width, stride,
                                         padding, dilation, act);
  return {f.y, f.ysum, f.ysumsq, f.zsum, f.zsumsq};
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, CompositeExplicitAutograd, m) {
  m.impl("bn_train_act_dwconv2d", &composite);
}

}  // namespace bsnas
