// Autograd of bsnas::masked_dwconv2d and its backward op.
#include "autograd_util.h"

namespace bsnas {
namespace {

using DwSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, int64_t, int64_t,
                         int64_t);
using DwBwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, c10::SymInt, int64_t,
                                                    int64_t, int64_t);

struct MaskedDw : torch::autograd::Function<MaskedDw> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            c10::SymInt width, int64_t stride, int64_t padding,
                            int64_t dilation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = handle<DwSig>("bsnas::masked_dwconv2d");
    ctx->save_for_backward({x, w});
    ctx->saved_data["width"] = width;
    ctx->saved_data["geometry"] = std::vector<int64_t>{stride, padding, dilation};
    return op.call(x, w, width, stride, padding, dilation);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = handle<DwBwdSig>("bsnas::_masked_dwconv2d_backward");
    const auto saved = ctx->get_saved_variables();
    const auto geo = ctx->saved_data["geometry"].toIntVector();
    auto [gx, gw] = op.call(grads[0], saved[0], saved[1], ctx->saved_data["width"].toSymInt(),
                            geo[0], geo[1], geo[2]);
    return {grad_if(ctx, 0, gx), grad_if(ctx, 1, gw), {}, {}, {}, {}};
  }
};

at::Tensor masked_dwconv2d(const at::Tensor& x, const at::Tensor& w, c10::SymInt width,
                           int64_t stride, int64_t padding, int64_t dilation) {
  return MaskedDw::apply(x, w, std::move(width), stride, padding, dilation);
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, Autograd, m) {
  m.impl("masked_dwconv2d", &masked_dwconv2d);
}

}  // namespace bsnas
