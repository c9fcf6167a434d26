// CUDA kernels of the BN-from-sums ops (bn_from_sums.cpp, math in ../bn_from_sums.h) and
// of bsnas::channel_stats. The per-channel ops are one small launch each (one thread per
// channel). channel_stats is two launches and deterministic (channel_sums.cuh).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../bn_from_sums.h"
#include "bn_from_sums_kernel.h"
#include "channel_sums.cuh"

namespace bsnas::bn_sums_cuda {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

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

// grad_z += grad_sum[c] + 2 z grad_sumsq[c], in z's dtype as autograd's composite was;
// grid-stride over the values, c from the index (channels innermost, or planes of P).
template <typename T>
__global__ void stats_grad_add_kernel(T* __restrict__ g, const T* __restrict__ z,
                                      const double* __restrict__ gs,
                                      const double* __restrict__ gq, int64_t total, int64_t C,
                                      int64_t P, bool channels_last) {
  using acc_t = at::opmath_type<T>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += step) {
    const int64_t c = channels_last ? i % C : (i / P) % C;
    const acc_t a = static_cast<acc_t>(static_cast<T>(gs[c]));
    const acc_t b = static_cast<acc_t>(static_cast<T>(2 * gq[c]));
    g[i] = static_cast<T>(static_cast<acc_t>(g[i]) + a + static_cast<acc_t>(z[i]) * b);
  }
}

// channel_stats' work per value: its value and its square.
template <typename T>
struct StatsElem {
  const T* __restrict__ z;
  __device__ __forceinline__ void operator()(int64_t i, int64_t, double& a, double& b) const {
    const double v = static_cast<double>(z[i]);
    a += v;
    b += v * v;
  }
};

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
  if (N * P == 0 || C == 0) {
    sum.zero_();
    sumsq.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "channel_stats", [&] {
    channel_sums::run(StatsElem<scalar_t>{z.const_data_ptr<scalar_t>()}, N, C, P, channels_last,
                      z, stream, sum.mutable_data_ptr<double>(), sumsq.mutable_data_ptr<double>());
  });
}

void stats_grad_add(at::Tensor& grad_z, const at::Tensor& z, bool channels_last,
                    const at::Tensor& grad_sum, const at::Tensor& grad_sumsq) {
  const int64_t total = z.numel();
  if (total == 0) return;
  const int64_t C = z.size(1), P = z.size(2) * z.size(3);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads,
                                                        int64_t{1} << 16));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(),
                                  "_channel_stats_grad_add_", [&] {
    stats_grad_add_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        grad_z.mutable_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
        grad_sum.const_data_ptr<double>(), grad_sumsq.const_data_ptr<double>(), total, C, P,
        channels_last);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace bsnas::bn_sums_cuda
