// Autograd of bsnas::bn_affine_from_sums, and the version counters of the in-place
// bn_update_running_stats_.
#include <torch/csrc/autograd/VariableTypeUtils.h>

#include "autograd_util.h"

namespace bsnas {
namespace {

struct BnAffine : torch::autograd::Function<BnAffine> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& sum,
                               const at::Tensor& sumsq, c10::SymInt count,
                               const at::Tensor& w, const at::Tensor& b, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = handle<AffineSig>("bsnas::bn_affine_from_sums");
    auto [scale, shift] = op.call(sum, sumsq, count, w, b, eps);
    ctx->save_for_backward({sum, sumsq, w});
    ctx->saved_data["count"] = count;
    ctx->saved_data["eps"] = eps;
    return {scale, shift};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = handle<AffineBwdSig>("bsnas::_bn_affine_from_sums_backward");
    const auto s = ctx->get_saved_variables();
    auto [gs, gq, gw, gb] = op.call(grads[0], grads[1], s[0], s[1],
                                    ctx->saved_data["count"].toSymInt(), s[2],
                                    ctx->saved_data["eps"].toDouble());
    // needs_input_grad counts tensor inputs only: sum, sumsq, weight, bias.
    return {grad_if(ctx, 0, gs), grad_if(ctx, 1, gq), {}, grad_if(ctx, 2, gw),
            grad_if(ctx, 3, gb), {}};
  }
};

std::tuple<at::Tensor, at::Tensor> bn_affine_from_sums(const at::Tensor& sum,
                                                       const at::Tensor& sumsq,
                                                       c10::SymInt count, const at::Tensor& w,
                                                       const at::Tensor& b, double eps) {
  auto out = BnAffine::apply(sum, sumsq, std::move(count), w, b, eps);
  return {out[0], out[1]};
}

// bn_update_running_stats_ writes through data pointers, which autograd does not see. Its
// ADInplaceOrView kernel bumps the written tensors' version counters, as PyTorch's own
// in-place ops do: autograd's check of saved tensors and SpringBlock's fold
// key (bsnas/nn/spring_block.py) read them.
void update_running_stats_(at::Tensor& mean, at::Tensor& var, at::Tensor& batches,
                           const at::Tensor& sum, const at::Tensor& sumsq, c10::SymInt count,
                           std::optional<double> momentum) {
  static const auto op = handle<RunningUpdateSig>("bsnas::bn_update_running_stats_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(mean, var, batches, sum, sumsq, std::move(count), momentum);
  }
  for (const at::Tensor* t : {&mean, &var, &batches}) torch::autograd::increment_version(*t);
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, Autograd, m) {
  m.impl("bn_affine_from_sums", &bn_affine_from_sums);
}

TORCH_LIBRARY_IMPL(bsnas, ADInplaceOrView, m) {
  m.impl("bn_update_running_stats_", &update_running_stats_);
}

}  // namespace bsnas
