// bsnas::channel_stats: per-channel sum and sum of squares of an [N, C, H, W] tensor,
// accumulated and returned in float64, for the batch statistics of a BatchNorm
// (var = E[z^2] - E[z]^2 does not cancel in float64). The spring block uses it for the
// expand BN in training. CPU: one vectorised pass (var_mean over (0, 2, 3) is several
// times slower on NCHW), cpu/channel_stats_cpu.h. CUDA: two launches, deterministic
// (cuda/bn_from_sums_kernel.cu).
// Autograd: autograd.cpp; the fake kernel: bsnas/ops/channel_stats.py.
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
}

#ifdef BSNAS_WITH_CUDA
namespace {
std::tuple<at::Tensor, at::Tensor> channel_stats_cuda(const at::Tensor& z_in) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  ChannelStatsArgs args = prepare_channel_stats(z_in);
  bn_sums_cuda::channel_stats(args.z, args.channels_last, args.sum, args.sumsq);
  return {args.sum, args.sumsq};
}
}  // namespace

TORCH_LIBRARY_IMPL(bsnas, CUDA, m) { m.impl("channel_stats", &channel_stats_cuda); }
#endif

}  // namespace bsnas
