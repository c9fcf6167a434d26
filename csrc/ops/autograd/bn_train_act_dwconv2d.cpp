// Autograd of bsnas::bn_train_act_dwconv2d: one node over the composite forward and
// backward of bn_train_act_dwconv2d.h.
#include "autograd_util.h"
#include "../bn_train_act_dwconv2d.h"

namespace bsnas {
namespace {

struct BnTrainActDw : torch::autograd::Function<BnTrainActDw> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z,
                               const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                               double eps, const at::Tensor& w, c10::SymInt width,
                               int64_t stride, int64_t padding, int64_t dilation, int64_t act) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto f = bn_train_act_dwconv2d_forward(z, bn_weight, bn_bias, eps, w, width, stride,
                                           padding, dilation, act);
    ctx->save_for_backward({z, f.scale, f.shift, w, f.y, f.zsum, f.zsumsq, bn_weight});
    ctx->saved_data["width"] = width;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["args"] = std::vector<int64_t>{stride, padding, dilation, act};
    ctx->mark_non_differentiable({f.zsum, f.zsumsq});
    return {f.y, f.ysum, f.ysumsq, f.zsum, f.zsumsq};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto a = ctx->saved_data["args"].toIntVector();
    BnTrainForward f;
    f.scale = s[1], f.shift = s[2], f.y = s[4], f.zsum = s[5], f.zsumsq = s[6];
    const bool want_z = ctx->needs_input_grad(0);
    auto g = bn_train_act_dwconv2d_backward(
        grads[0], grads[1], grads[2], s[0], f, s[7], ctx->saved_data["eps"].toDouble(), s[3],
        ctx->saved_data["width"].toSymInt(), a[0], a[1], a[2], a[3], want_z,
        ctx->needs_input_grad(1) || ctx->needs_input_grad(2));
    // needs_input_grad counts tensor inputs only: z, bn_weight, bn_bias, weight.
    return {grad_if(ctx, 0, g.z), grad_if(ctx, 1, g.bn_weight), grad_if(ctx, 2, g.bn_bias), {},
            grad_if(ctx, 3, g.weight), {}, {}, {}, {}, {}};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_train_act_dwconv2d(
    const at::Tensor& z, const at::Tensor& bn_weight, const at::Tensor& bn_bias, double eps,
    const at::Tensor& w, c10::SymInt width, int64_t stride, int64_t padding, int64_t dilation,
    int64_t act) {
  auto out = BnTrainActDw::apply(z, bn_weight, bn_bias, eps, w, std::move(width), stride,
                                 padding, dilation, act);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, Autograd, m) {
  m.impl("bn_train_act_dwconv2d", &bn_train_act_dwconv2d);
}

}  // namespace bsnas
