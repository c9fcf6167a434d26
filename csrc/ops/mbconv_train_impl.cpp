// The forward and backward of bsnas::mbconv_train (schema in mbconv_train.cpp;
// declarations in mbconv_train.h), and its CompositeExplicitAutograd kernel: calls
// through the dispatcher to the ops that hold the kernels.
#include <torch/library.h>

#include <tuple>

#include "masked_conv_common.h"
#include "mbconv_train.h"
#include "op_handles.h"

namespace bsnas {

namespace {

constexpr const char* kOp = "mbconv_train";

void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), kOp, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == 4, kOp, ": ", name, " must be 4-D, got ", t.dim(), "-D");
}

}  // namespace

MbconvTrainForward mbconv_train_forward(const at::Tensor& x, const MbconvTrainParams& a) {
  static const auto pw = handle<PwSig>("bsnas::masked_pwconv2d");
  static const auto affine = handle<AffineSig>("bsnas::bn_affine_from_sums");
  static const auto bn_act = handle<BnActOnlySig>("bsnas::bn_act");
  check_4d(x, "x");
  check_4d(a.expand_weight, "expand_weight");
  check_4d(a.dw_weight, "dw_weight");
  check_4d(a.project_weight, "project_weight");
  const int64_t k = a.dw_weight.size(2);
  MbconvTrainForward f;
  f.z = pw.call(x, a.expand_weight, x.sym_size(1), a.width);
  f.dw = bn_train_act_dwconv2d_forward(f.z, a.bn1_weight, a.bn1_bias, a.eps1, a.dw_weight,
                                       a.width, a.stride, k / 2, 1, a.act);
  const at::Tensor& y = f.dw.y;
  auto [scale2, shift2] = affine.call(f.dw.ysum, f.dw.ysumsq, y.sym_numel() / a.width,
                                      a.bn2_weight, a.bn2_bias, a.eps2);
  f.scale2 = as_dtype(scale2, y.scalar_type());  // autocast runs y in half precision
  f.shift2 = as_dtype(shift2, y.scalar_type());
  f.h = bn_act.call(y, f.scale2, f.shift2, a.act);
  f.p = pw.call(f.h, a.project_weight, a.width, a.project_weight.sym_size(0));
  // At width 1 the hidden tensors are NCHW and channels_last at once, and the ops then
  // compute in NCHW: p still comes out in x's format.
  const auto fmt = compute_format(x);
  if (!f.p.is_contiguous(fmt)) f.p = f.p.contiguous(fmt);
  return f;
}

MbconvTrainGrads mbconv_train_backward(at::Tensor grad_p, const at::Tensor& x,
                                       const MbconvTrainParams& a, MbconvTrainForward&& f,
                                       bool want_x) {
  static const auto pw_bwd = handle<PwBwdSig>("bsnas::_masked_pwconv2d_backward");
  static const auto bn_act_bwd = handle<BnActOnlyBwdSig>("bsnas::_bn_act_backward");
  static const auto affine_bwd = handle<AffineBwdSig>("bsnas::_bn_affine_from_sums_backward");
  MbconvTrainGrads g;
  at::Tensor gh, gy, gscale2, gshift2;
  std::tie(gh, g.project_weight) =
      pw_bwd.call(grad_p, f.h, a.project_weight, a.width, a.project_weight.sym_size(0));
  grad_p.reset();
  f.h.reset();
  std::tie(gy, gscale2, gshift2) = bn_act_bwd.call(gh, f.dw.y, f.scale2, f.shift2, a.act);
  gh.reset();
  const auto bt = a.bn2_weight.scalar_type();
  auto [gysum, gysumsq, gb2w, gb2b] =
      affine_bwd.call(as_dtype(gscale2, bt), as_dtype(gshift2, bt), f.dw.ysum, f.dw.ysumsq,
                      f.dw.y.sym_numel() / a.width, a.bn2_weight, a.eps2);
  g.bn2_weight = gb2w;
  g.bn2_bias = gb2b;
  const int64_t k = a.dw_weight.size(2);
  auto g1 = bn_train_act_dwconv2d_backward(gy, gysum, gysumsq, f.z, f.dw, a.bn1_weight, a.eps1,
                                           a.dw_weight, a.width, a.stride, k / 2, 1, a.act,
                                           /*want_z=*/true, /*want_bn=*/true);
  gy.reset();
  f.z.reset();
  f.dw.y.reset();
  g.bn1_weight = g1.bn_weight;
  g.bn1_bias = g1.bn_bias;
  g.dw_weight = g1.weight;
  std::tie(g.x, g.expand_weight) = pw_bwd.call(g1.z, x, a.expand_weight, x.sym_size(1), a.width);
  if (!want_x) g.x.reset();
  return g;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite(
    const at::Tensor& x, const at::Tensor& expand_weight, const at::Tensor& bn1_weight,
    const at::Tensor& bn1_bias, double eps1, const at::Tensor& dw_weight,
    const at::Tensor& bn2_weight, const at::Tensor& bn2_bias, double eps2,
    const at::Tensor& project_weight, c10::SymInt width, int64_t stride, int64_t act) {
  const MbconvTrainParams a{expand_weight, bn1_weight, bn1_bias, dw_weight, bn2_weight,
                            bn2_bias, project_weight, eps1, eps2, std::move(width), stride,
                            act};
  auto f = mbconv_train_forward(x, a);
  return {f.p, f.dw.zsum, f.dw.zsumsq, f.dw.ysum, f.dw.ysumsq};
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, CompositeExplicitAutograd, m) {
  m.impl("mbconv_train", &composite);
}

}  // namespace bsnas
