// Autograd of bsnas::channel_stats (its backward is one ATen pass), and the version
// counter of the in-place _channel_stats_grad_add_.
#include <ATen/ops/addcmul.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>

#include "autograd_util.h"
#include "../masked_conv_common.h"

namespace bsnas {
namespace {

// z's gradient through its per-channel sum and sum of squares is gs + z * gq: returns
// (gs, gq) = (grad_sum[c], 2 grad_sumsq[c]) in z's dtype, shaped [1, C, 1, 1].
std::pair<at::Tensor, at::Tensor> stats_grad_terms(const at::Tensor& z, const at::Tensor& gsum,
                                                   const at::Tensor& gsumsq) {
  const auto dt = z.scalar_type();
  return {as_dtype(gsum, dt).view({1, -1, 1, 1}), as_dtype(gsumsq.mul(2), dt).view({1, -1, 1, 1})};
}

struct ChannelStats : torch::autograd::Function<ChannelStats> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = handle<StatsSig>("bsnas::channel_stats");
    auto [sum, sumsq] = op.call(z);
    ctx->save_for_backward({z});
    // An unused output's gradient stays undefined: z * 0 would be NaN where z is NaN or
    // Inf, where the gradient of the sums that are used is finite.
    ctx->set_materialize_grads(false);
    return {sum, sumsq};
  }
  // grad_z = grad_sum[c] + 2 z grad_sumsq[c]: one pass over z (either term alone where
  // the other output is unused).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool has_sum = grads[0].defined(), has_sq = grads[1].defined();
    if (!has_sum && !has_sq) return {at::Tensor()};
    const at::Tensor z = ctx->get_saved_variables()[0];
    if (!has_sq) {
      const at::Tensor gs = as_dtype(grads[0], z.scalar_type()).view({1, -1, 1, 1});
      return {gs.expand(z.sizes()).contiguous(compute_format(z))};
    }
    if (!has_sum) return {z.mul(as_dtype(grads[1].mul(2), z.scalar_type()).view({1, -1, 1, 1}))};
    const auto [gs, gq] = stats_grad_terms(z, grads[0], grads[1]);
    return {at::addcmul(gs, z, gq)};
  }
};

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& z) {
  auto out = ChannelStats::apply(z);
  return {out[0], out[1]};
}

// _channel_stats_grad_add_ writes through data pointers, which autograd does not see. Its
// ADInplaceOrView kernel bumps the written tensors' version counters, as PyTorch's own
// in-place ops do: autograd's check of saved tensors reads them.
void stats_grad_add_(at::Tensor& grad_z, const at::Tensor& z, const at::Tensor& grad_sum,
                     const at::Tensor& grad_sumsq) {
  static const auto op = handle<StatsGradAddSig>("bsnas::_channel_stats_grad_add_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(grad_z, z, grad_sum, grad_sumsq);
  }
  torch::autograd::increment_version(grad_z);
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, Autograd, m) {
  m.impl("channel_stats", &channel_stats);
}

TORCH_LIBRARY_IMPL(bsnas, ADInplaceOrView, m) {
  m.impl("_channel_stats_grad_add_", &stats_grad_add_);
}

}  // namespace bsnas
