// The CUDA kernels of bsnas::channel_stats and _channel_stats_grad_add_ (schema in
// channel_stats.cpp): the argument checks of masked_conv_common.h, then the launches of
// cuda/bn_from_sums_kernel.cu. A C++ file, compiled only in a CUDA build.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../masked_conv_common.h"
#include "bn_from_sums_kernel.h"

namespace bsnas {

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

}  // namespace bsnas
