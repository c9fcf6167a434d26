// bsnas::channel_stats: per-channel sum and sum of squares of an [N, C, H, W] tensor,
// accumulated and returned in float64, for the batch statistics of a BatchNorm
// (var = E[z^2] - E[z]^2 does not cancel in float64). The spring block uses it for the
// expand BN in training. CPU: one vectorised pass (var_mean over (0, 2, 3) is several
// times slower on NCHW), cpu/channel_stats_cpu.h. CUDA: two launches, deterministic
// (cuda/bn_from_sums_kernel.cu).
//
// bsnas::_channel_stats_grad_add_ adds z's gradient through those sums into a gradient
// of z in place, grad_z += grad_sum[c] + 2 z grad_sumsq[c]: one pass (one launch on
// CUDA) where the ATen composite took five (a scaling, two casts, addcmul_, add_). The
// training backward of the expand BN uses it (bn_train_act_dwconv2d.cpp).
// Autograd: autograd.cpp; the fake kernels: bsnas/ops/channel_stats.py.
#include <torch/library.h>

#include <tuple>

#include "masked_conv_common.h"
#ifdef BSNAS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>

#include "cuda/bn_from_sums_cuda.h"
#endif

namespace bsnas {

TORCH_LIBRARY_FRAGMENT(bsnas, m) {
  // (sum [C], sumsq [C]), both float64.
  m.def("channel_stats(Tensor z) -> (Tensor, Tensor)");
  // grad_z [N, C, H, W] (dense in z's format) += grad_sum[c] + 2 z grad_sumsq[c];
  // grad_sum, grad_sumsq: float64 [C]. Not differentiable.
  m.def(
      "_channel_stats_grad_add_(Tensor(a!) grad_z, Tensor z, Tensor grad_sum, "
      "Tensor grad_sumsq) -> ()");
}

#ifdef BSNAS_WITH_CUDA
namespace {
std::tuple<at::Tensor, at::Tensor> channel_stats_cuda(const at::Tensor& z_in) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  ChannelStatsArgs args = prepare_channel_stats(z_in);
  bn_sums_cuda::channel_stats(args.z, args.channels_last, args.sum, args.sumsq);
  return {args.sum, args.sumsq};
}

void stats_grad_add_cuda(at::Tensor& grad_z, const at::Tensor& z, const at::Tensor& grad_sum,
                         const at::Tensor& grad_sumsq) {
  const c10::cuda::CUDAGuard guard(z.device());
  const bool cl = check_stats_grad_add(grad_z, z, grad_sum, grad_sumsq);
  bn_sums_cuda::stats_grad_add(grad_z, z, cl, grad_sum, grad_sumsq);
}
}  // namespace

TORCH_LIBRARY_IMPL(bsnas, CUDA, m) {
  m.impl("channel_stats", &channel_stats_cuda);
  m.impl("_channel_stats_grad_add_", &stats_grad_add_cuda);
}
#endif

}  // namespace bsnas
