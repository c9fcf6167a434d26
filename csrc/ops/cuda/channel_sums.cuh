// Deterministic per-channel sums on CUDA, shared by bsnas::channel_stats (sum and sum of
// squares of z) and bsnas::_bn_act_backward (sums of gu * y and gu, writing grad_y on
// the way). Two launches, no atomics, the same order of additions on every run: per
// (channel or channel tile, split of the channel's values) partial sums in double, then
// each channel's partials added in split order.
//
// `Elem` is the per-value work: a functor with
//     __device__ void operator()(int64_t i, int64_t c, double& a, double& b) const
// called once for every value (flat memory index i, channel c) that adds its two terms
// to a and b (and may write an output at i).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_util.cuh"

namespace bsnas {
namespace channel_sums {
namespace {  // internal linkage in each translation unit, as dwconv_cuda.cuh

constexpr int kThreads = 256;

// Block sum of two doubles over all threads (blockDim.x * blockDim.y a multiple of 32,
// at most 1024); the result is valid in thread 0.
__device__ inline void block_sum2(double& a, double& b) {
  __shared__ double sa[32], sb[32];
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, o);
    b += __shfl_down_sync(0xffffffffu, b, o);
  }
  const int warps = (blockDim.x * blockDim.y) / 32;
  if ((t & 31) == 0) {
    sa[t >> 5] = a;
    sb[t >> 5] = b;
  }
  __syncthreads();
  if (t == 0) {
    for (int w = 1; w < warps; ++w) {
      a += sa[w];
      b += sb[w];
    }
  }
}

// NCHW [N, C, P]: block (c, split) takes channel c's values with flat index
// j = n * P + p in [split * per, (split + 1) * per), plane by plane.
template <typename Elem>
__global__ void nchw_kernel(Elem elem, int64_t N, int64_t C, int64_t P, int64_t per,
                            double* __restrict__ part) {
  const int64_t c = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int64_t j0 = split * per, j1 = std::min(N * P, j0 + per);
  double a = 0, b = 0;
  for (int64_t n = j0 / P; n * P < j1; ++n) {
    const int64_t base = (n * C + c) * P;
    const int64_t p0 = std::max<int64_t>(j0 - n * P, 0), p1 = std::min<int64_t>(j1 - n * P, P);
    for (int64_t p = p0 + threadIdx.x; p < p1; p += blockDim.x) elem(base + p, c, a, b);
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    part[split * C + c] = a;
    part[(splits + split) * C + c] = b;
  }
}

// channels_last [R = N * P, C]: block (tile of 32 channels, split), 32 channel lanes x 8
// row lanes over rows [split * per, (split + 1) * per).
template <typename Elem>
__global__ void nhwc_kernel(Elem elem, int64_t R, int64_t C, int64_t per,
                            double* __restrict__ part) {
  __shared__ double sa[8][33], sb[8][33];
  const int64_t c = blockIdx.x * 32 + threadIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int64_t r0 = split * per, r1 = std::min(R, r0 + per);
  double a = 0, b = 0;
  if (c < C) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) elem(r * C + c, c, a, b);
  }
  sa[threadIdx.y][threadIdx.x] = a;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int y = 1; y < static_cast<int>(blockDim.y); ++y) {
      a += sa[y][threadIdx.x];
      b += sb[y][threadIdx.x];
    }
    part[split * C + c] = a;
    part[(splits + split) * C + c] = b;
  }
}

template <typename Out>
__global__ void finish_kernel(const double* __restrict__ part, int64_t splits, int64_t C,
                              Out* __restrict__ out_a, Out* __restrict__ out_b) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  double a = 0, b = 0;
  for (int64_t s = 0; s < splits; ++s) {
    a += part[s * C + c];
    b += part[(splits + s) * C + c];
  }
  out_a[c] = static_cast<Out>(a);
  out_b[c] = static_cast<Out>(b);
}

// Runs `elem` over every value of an [N, C, H, W] tensor (P = H * W; channels_last or
// NCHW memory order) on `stream` and writes the two per-channel sums to out_a, out_b [C]
// (converted to Out). `like` gives the device of the partials. N * P and C must be > 0.
template <typename Out, typename Elem>
void run(const Elem& elem, int64_t N, int64_t C, int64_t P, bool channels_last,
         const at::Tensor& like, cudaStream_t stream, Out* out_a, Out* out_b) {
  const int64_t target = 4 * static_cast<int64_t>(sm_count(like.get_device()));
  const int64_t tiles = channels_last ? ceil_div(C, 32) : C;
  const int64_t values = N * P;  // per channel
  // Splits of each channel's values: enough blocks to fill the card, each with at least
  // 2048 values (NCHW) or 64 rows (channels_last) to sum; at most 65535 (grid y).
  const int64_t min_per = channels_last ? 64 : 2048;
  int64_t splits = std::min<int64_t>(ceil_div(target, tiles),
                                     std::max<int64_t>(1, values / min_per));
  splits = std::clamp<int64_t>(splits, 1, 65535);
  const int64_t per = ceil_div(values, splits);
  splits = ceil_div(values, per);
  at::Tensor part = at::empty({2, splits, C}, like.options().dtype(at::kDouble));
  double* pp = part.mutable_data_ptr<double>();
  if (channels_last) {
    nhwc_kernel<<<dim3(tiles, splits), dim3(32, 8), 0, stream>>>(elem, values, C, per, pp);
  } else {
    nchw_kernel<<<dim3(C, splits), kThreads, 0, stream>>>(elem, N, C, P, per, pp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_kernel<<<ceil_div(C, kThreads), kThreads, 0, stream>>>(pp, splits, C, out_a, out_b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace channel_sums
}  // namespace bsnas
