// bsnas::channel_stats: per-channel sum and sum of squares of an [N, C, H, W] tensor,
// accumulated and returned in float64, for the batch statistics of a BatchNorm
// (var = E[z^2] - E[z]^2 does not cancel in float64). The spring block uses it for the
// expand BN in training on CPU, where it is one vectorised pass (var_mean is several
// times slower on NCHW); cpu/channel_stats_cpu.h. CUDA: two launches, deterministic
// (cuda/bn_from_sums_kernel.cu).
// Autograd: autograd.cpp; the fake kernel: bsnas/ops/channel_stats.py.
#include <ATen/ops/empty.h>
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
  TORCH_CHECK(z_in.defined() && z_in.dim() == 4, "channel_stats: z must be 4-D [N, C, H, W], got ",
              z_in.defined() ? z_in.dim() : 0, "-D");
  check_floating("channel_stats", z_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const auto fmt = compute_format(z_in);
  const at::Tensor z = z_in.contiguous(fmt);
  const auto f64 = z.options().dtype(at::kDouble);
  at::Tensor sum = at::empty({z.size(1)}, f64), sumsq = at::empty({z.size(1)}, f64);
  bn_sums_cuda::channel_stats(z, fmt == at::MemoryFormat::ChannelsLast, sum, sumsq);
  return {sum, sumsq};
}
}  // namespace

TORCH_LIBRARY_IMPL(bsnas, CUDA, m) { m.impl("channel_stats", &channel_stats_cuda); }
#endif

}  // namespace bsnas
