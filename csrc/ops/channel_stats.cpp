// bsnas::channel_stats: per-channel sum and sum of squares of an [N, C, H, W] tensor,
// accumulated and returned in float64, for the batch statistics of a BatchNorm
// (var = E[z^2] - E[z]^2 does not cancel in float64). The spring block uses it for the
// expand BN in training on CPU, where it is one vectorised pass (var_mean is several
// times slower on NCHW); cpu/channel_stats_cpu.h. On CUDA it is two ATen reductions.
// Autograd and the fake kernel: bsnas/ops/channel_stats.py.
#include <ATen/ops/square.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <tuple>

#include "masked_conv_common.h"

namespace bsnas {

TORCH_LIBRARY_FRAGMENT(bsnas, m) {
  // (sum [C], sumsq [C]), both float64.
  m.def("channel_stats(Tensor z) -> (Tensor, Tensor)");
}

#ifdef BSNAS_WITH_CUDA
namespace {
std::tuple<at::Tensor, at::Tensor> channel_stats_cuda(const at::Tensor& z) {
  TORCH_CHECK(z.defined() && z.dim() == 4, "channel_stats: z must be 4-D [N, C, H, W]");
  check_floating("channel_stats", z);
  return {at::sum(z, {0, 2, 3}, false, at::kDouble),
          at::sum(at::square(z.to(at::kDouble)), {0, 2, 3}, false)};
}
}  // namespace

TORCH_LIBRARY_IMPL(bsnas, CUDA, m) { m.impl("channel_stats", &channel_stats_cuda); }
#endif

}  // namespace bsnas
