// Autograd of bsnas::bn_act_dwconv2d and its backward op.
#include "autograd_util.h"

namespace bsnas {
namespace {

struct BnActDw : torch::autograd::Function<BnActDw> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z,
                               const at::Tensor& scale, const at::Tensor& shift,
                               const at::Tensor& w, c10::SymInt width, int64_t stride,
                               int64_t padding, int64_t dilation, int64_t act) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = handle<BnActSig>("bsnas::bn_act_dwconv2d");
    auto [y, sum, sumsq] = op.call(z, scale, shift, w, width, stride, padding, dilation, act);
    ctx->save_for_backward({z, scale, shift, w, y});
    ctx->saved_data["width"] = width;
    ctx->saved_data["args"] = std::vector<int64_t>{stride, padding, dilation, act};
    return {y, sum, sumsq};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = handle<BnActBwdSig>("bsnas::_bn_act_dwconv2d_backward");
    const auto s = ctx->get_saved_variables();
    const auto a = ctx->saved_data["args"].toIntVector();
    // Undefined output gradients arrive as zeros (materialised): float64 for the sums.
    auto [gz, gs, gb, gw] = op.call(grads[0], grads[1], grads[2], s[0], s[1], s[2], s[3], s[4],
                                    ctx->saved_data["width"].toSymInt(), a[0], a[1], a[2],
                                    a[3]);
    return {grad_if(ctx, 0, gz), grad_if(ctx, 1, gs), grad_if(ctx, 2, gb), grad_if(ctx, 3, gw),
            {}, {}, {}, {}, {}};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_dwconv2d(
    const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& w,
    c10::SymInt width, int64_t stride, int64_t padding, int64_t dilation, int64_t act) {
  auto out = BnActDw::apply(z, scale, shift, w, std::move(width), stride, padding, dilation, act);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, Autograd, m) {
  m.impl("bn_act_dwconv2d", &bn_act_dwconv2d);
}

}  // namespace bsnas
