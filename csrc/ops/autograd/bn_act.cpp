// Autograd of bsnas::bn_act and its backward op.
#include "autograd_util.h"

namespace bsnas {
namespace {

struct BnActFn : torch::autograd::Function<BnActFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& scale,
                            const at::Tensor& shift, int64_t act) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = handle<BnActOnlySig>("bsnas::bn_act");
    ctx->save_for_backward({y, scale, shift});
    ctx->saved_data["act"] = act;
    return op.call(y, scale, shift, act);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = handle<BnActOnlyBwdSig>("bsnas::_bn_act_backward");
    const auto saved = ctx->get_saved_variables();
    auto [gy, gscale, gshift] =
        op.call(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["act"].toInt());
    return {grad_if(ctx, 0, gy), grad_if(ctx, 1, gscale), grad_if(ctx, 2, gshift), {}};
  }
};

at::Tensor bn_act(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                  int64_t act) {
  return BnActFn::apply(y, scale, shift, act);
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, Autograd, m) {
  m.impl("bn_act", &bn_act);
}

}  // namespace bsnas
