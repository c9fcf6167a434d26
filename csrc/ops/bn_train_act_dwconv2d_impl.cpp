// The forward and backward of bsnas::bn_train_act_dwconv2d (schema in
// bn_train_act_dwconv2d.cpp; declarations in bn_train_act_dwconv2d.h), and its
// CompositeExplicitAutograd kernel: calls through the dispatcher to channel_stats,
// bn_affine_from_sums and bn_act_dwconv2d.
#include <torch/library.h>

#include <tuple>

#include "bn_train_act_dwconv2d.h"
#include "masked_conv_common.h"
#include "op_handles.h"

namespace bsnas {

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

// The depthwise backward gives grad_z, grad_scale, grad_shift and the weight's gradient;
// BN's backward turns grad_scale / grad_shift into the gradients of its weight, bias and
// z's sums; z's share through the sums is added into grad_z in place.
BnTrainGrads bn_train_act_dwconv2d_backward(const at::Tensor& grad_y, const at::Tensor& grad_ysum,
                                            const at::Tensor& grad_ysumsq, const at::Tensor& z,
                                            const BnTrainForward& f, const at::Tensor& bn_weight,
                                            double eps, const at::Tensor& weight,
                                            const c10::SymInt& width, int64_t stride,
                                            int64_t padding, int64_t dilation, int64_t act,
                                            bool want_z, bool want_bn) {
  static const auto dw_bwd = handle<BnActBwdSig>("bsnas::_bn_act_dwconv2d_backward");
  static const auto bn_bwd = handle<AffineBwdSig>("bsnas::_bn_affine_from_sums_backward");
  static const auto stats_add = handle<StatsGradAddSig>("bsnas::_channel_stats_grad_add_");
  BnTrainGrads g;
  at::Tensor gscale, gshift;
  std::tie(g.z, gscale, gshift, g.weight) =
      dw_bwd.call(grad_y, grad_ysum, grad_ysumsq, z, f.scale, f.shift, weight, f.y, width,
                  stride, padding, dilation, act);
  if (want_z || want_bn) {
    const auto bt = bn_weight.scalar_type();
    auto [gsum, gsumsq, gbw, gbb] =
        bn_bwd.call(as_dtype(gscale, bt), as_dtype(gshift, bt), f.zsum, f.zsumsq,
                    z.sym_numel() / width, bn_weight, eps);
    g.bn_weight = gbw;
    g.bn_bias = gbb;
    if (want_z) {  // grad_z += grad_zsum[c] + 2 z grad_zsumsq[c], in place, one pass
      const auto fmt = compute_format(z);  // the kernels' (and grad_z's) layout
      if (!g.z.is_contiguous(fmt)) g.z = g.z.contiguous(fmt);
      stats_add.call(g.z, z.contiguous(fmt), gsum, gsumsq);
    }
  }
  return g;
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
