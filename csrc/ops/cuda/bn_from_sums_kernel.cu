// CUDA kernels of the BN-from-sums ops (bn_from_sums.cpp, math in ../bn_from_sums.h) and
// of bsnas::channel_stats. The per-channel ops are one small launch each (one thread per
// channel). channel_stats is two launches and deterministic: per (channel tile, row
// split) partial sums in double, then each channel's partials added in split order.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "../bn_from_sums.h"
#include "bn_from_sums_cuda.h"

namespace bsnas::bn_sums_cuda {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

int sm_count() {
  static std::atomic<int> cached[64] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 64) dev = 63;
  int n = cached[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cached[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

template <typename T>
__global__ void affine_kernel(const double* __restrict__ s, const double* __restrict__ q,
                              double n, const T* __restrict__ w, const T* __restrict__ b,
                              double eps, T* __restrict__ scale, T* __restrict__ shift,
                              int64_t c) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= c) return;
  double a, d;
  bn_sums::affine(s[i], q[i], n, static_cast<double>(w[i]), static_cast<double>(b[i]), eps, a, d);
  scale[i] = static_cast<T>(a);
  shift[i] = static_cast<T>(d);
}

template <typename T>
__global__ void affine_backward_kernel(const T* __restrict__ g_scale,
                                       const T* __restrict__ g_shift,
                                       const double* __restrict__ s,
                                       const double* __restrict__ q, double n,
                                       const T* __restrict__ w, double eps,
                                       double* __restrict__ g_s, double* __restrict__ g_q,
                                       T* __restrict__ g_w, T* __restrict__ g_b, int64_t c,
                                       int64_t c_max) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= c_max) return;
  double gw = 0, gb = 0;
  if (i < c) {
    bn_sums::affine_backward(static_cast<double>(g_scale[i]), static_cast<double>(g_shift[i]),
                             s[i], q[i], n, static_cast<double>(w[i]), eps, g_s[i], g_q[i],
                             gw, gb);
  }
  g_w[i] = static_cast<T>(gw);
  g_b[i] = static_cast<T>(gb);
}

// One block: every thread reads num_batches_tracked before thread 0 increments it.
template <typename T>
__global__ void running_update_kernel(T* __restrict__ mean, T* __restrict__ var,
                                      int64_t* __restrict__ batches,
                                      const double* __restrict__ s,
                                      const double* __restrict__ q, double n,
                                      double momentum, int64_t c) {
  const int64_t after = batches[0] + 1;
  const double f = bn_sums::factor(momentum, after);
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x)
    bn_sums::running_update(s[i], q[i], n, f, mean[i], var[i]);
  __syncthreads();
  if (threadIdx.x == 0) batches[0] = after;
}

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

// NCHW, z [N, C, P]: block (c, split) sums channel c's values with flat index
// j = n * P + p in [split * per, (split + 1) * per), plane by plane.
template <typename T>
__global__ void stats_nchw_kernel(const T* __restrict__ z, int64_t N, int64_t C, int64_t P,
                                  int64_t per, double* __restrict__ part) {
  const int64_t c = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int64_t total = N * P;
  const int64_t j0 = split * per, j1 = std::min(total, j0 + per);
  double a = 0, b = 0;
  for (int64_t n = j0 / P; n * P < j1; ++n) {
    const T* plane = z + (n * C + c) * P;
    const int64_t p0 = std::max<int64_t>(j0 - n * P, 0), p1 = std::min<int64_t>(j1 - n * P, P);
    for (int64_t p = p0 + threadIdx.x; p < p1; p += blockDim.x) {
      const double v = static_cast<double>(plane[p]);
      a += v;
      b += v * v;
    }
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    part[split * C + c] = a;
    part[(splits + split) * C + c] = b;
  }
}

// channels_last, z [R = N * P, C]: block (channel tile of 32, split) with 32 channel
// lanes x 8 row lanes over rows [split * per, (split + 1) * per).
template <typename T>
__global__ void stats_nhwc_kernel(const T* __restrict__ z, int64_t R, int64_t C, int64_t per,
                                  double* __restrict__ part) {
  __shared__ double sa[8][33], sb[8][33];
  const int64_t c = blockIdx.x * 32 + threadIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int64_t r0 = split * per, r1 = std::min(R, r0 + per);
  double a = 0, b = 0;
  if (c < C) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      const double v = static_cast<double>(z[r * C + c]);
      a += v;
      b += v * v;
    }
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

__global__ void stats_finish_kernel(const double* __restrict__ part, int64_t splits, int64_t C,
                                    double* __restrict__ sum, double* __restrict__ sumsq) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  double a = 0, b = 0;
  for (int64_t s = 0; s < splits; ++s) {
    a += part[s * C + c];
    b += part[(splits + s) * C + c];
  }
  sum[c] = a;
  sumsq[c] = b;
}

}  // namespace

void affine(const at::Tensor& sum, const at::Tensor& sumsq, double n, const at::Tensor& weight,
            const at::Tensor& bias, double eps, at::Tensor& scale, at::Tensor& shift) {
  const int64_t c = sum.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "bn_affine_from_sums", [&] {
    affine_kernel<scalar_t><<<blocks_for(c), kThreads, 0, stream>>>(
        sum.const_data_ptr<double>(), sumsq.const_data_ptr<double>(), n,
        weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), eps,
        scale.mutable_data_ptr<scalar_t>(), shift.mutable_data_ptr<scalar_t>(), c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void affine_backward(const at::Tensor& g_scale, const at::Tensor& g_shift,
                     const at::Tensor& sum, const at::Tensor& sumsq, double n,
                     const at::Tensor& weight, double eps, at::Tensor& g_sum,
                     at::Tensor& g_sumsq, at::Tensor& g_weight, at::Tensor& g_bias) {
  const int64_t c = sum.size(0), c_max = weight.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "_bn_affine_from_sums_backward", [&] {
    affine_backward_kernel<scalar_t><<<blocks_for(c_max), kThreads, 0, stream>>>(
        g_scale.const_data_ptr<scalar_t>(), g_shift.const_data_ptr<scalar_t>(),
        sum.const_data_ptr<double>(), sumsq.const_data_ptr<double>(), n,
        weight.const_data_ptr<scalar_t>(), eps, g_sum.mutable_data_ptr<double>(),
        g_sumsq.mutable_data_ptr<double>(), g_weight.mutable_data_ptr<scalar_t>(),
        g_bias.mutable_data_ptr<scalar_t>(), c, c_max);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void running_update(at::Tensor& running_mean, at::Tensor& running_var, at::Tensor& batches,
                    const at::Tensor& sum, const at::Tensor& sumsq, double n, double momentum) {
  const int64_t c = sum.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(),
                                  "bn_update_running_stats_", [&] {
    running_update_kernel<scalar_t><<<1, 1024, 0, stream>>>(
        running_mean.mutable_data_ptr<scalar_t>(), running_var.mutable_data_ptr<scalar_t>(),
        batches.mutable_data_ptr<int64_t>(), sum.const_data_ptr<double>(),
        sumsq.const_data_ptr<double>(), n, momentum, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void channel_stats(const at::Tensor& z, bool channels_last, at::Tensor& sum,
                   at::Tensor& sumsq) {
  const int64_t N = z.size(0), C = z.size(1), P = z.size(2) * z.size(3);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t target = 4 * static_cast<int64_t>(sm_count());  // blocks to aim for
  const int64_t tiles = channels_last ? (C + 31) / 32 : C;
  const int64_t values = N * P;  // per channel
  if (values == 0 || C == 0) {
    sum.zero_();
    sumsq.zero_();
    return;
  }
  // Splits of each channel's values: enough blocks to fill the card, each with at least
  // 2048 values (NCHW) or 64 rows (channels_last) to sum; at most 65535 (grid y).
  const int64_t min_per = channels_last ? 64 : 2048;
  int64_t splits = std::min<int64_t>((target + tiles - 1) / tiles,
                                     std::max<int64_t>(1, values / min_per));
  splits = std::clamp<int64_t>(splits, 1, 65535);
  const int64_t per = (values + splits - 1) / splits;
  splits = (values + per - 1) / per;
  at::Tensor part = at::empty({2, splits, C}, z.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "channel_stats", [&] {
    if (channels_last) {
      stats_nhwc_kernel<scalar_t><<<dim3(tiles, splits), dim3(32, 8), 0, stream>>>(
          z.const_data_ptr<scalar_t>(), values, C, per, part.mutable_data_ptr<double>());
    } else {
      stats_nchw_kernel<scalar_t><<<dim3(C, splits), kThreads, 0, stream>>>(
          z.const_data_ptr<scalar_t>(), N, C, P, per, part.mutable_data_ptr<double>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  stats_finish_kernel<<<blocks_for(C), kThreads, 0, stream>>>(
      part.const_data_ptr<double>(), splits, C, sum.mutable_data_ptr<double>(),
      sumsq.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace bsnas::bn_sums_cuda
