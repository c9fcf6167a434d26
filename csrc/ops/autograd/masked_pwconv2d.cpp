// Autograd of bsnas::masked_pwconv2d and its backward op.
#include "autograd_util.h"

namespace bsnas {
namespace {

struct MaskedPw : torch::autograd::Function<MaskedPw> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            c10::SymInt in_width, c10::SymInt out_width) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = handle<PwSig>("bsnas::masked_pwconv2d");
    ctx->save_for_backward({x, w});
    ctx->saved_data["in_width"] = in_width;
    ctx->saved_data["out_width"] = out_width;
    return op.call(x, w, in_width, out_width);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = handle<PwBwdSig>("bsnas::_masked_pwconv2d_backward");
    const auto saved = ctx->get_saved_variables();
    auto [gx, gw] = op.call(grads[0], saved[0], saved[1], ctx->saved_data["in_width"].toSymInt(),
                            ctx->saved_data["out_width"].toSymInt());
    return {grad_if(ctx, 0, gx), grad_if(ctx, 1, gw), {}, {}};
  }
};

at::Tensor masked_pwconv2d(const at::Tensor& x, const at::Tensor& w, c10::SymInt in_width,
                           c10::SymInt out_width) {
  return MaskedPw::apply(x, w, std::move(in_width), std::move(out_width));
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, Autograd, m) {
  m.impl("masked_pwconv2d", &masked_pwconv2d);
}

}  // namespace bsnas
