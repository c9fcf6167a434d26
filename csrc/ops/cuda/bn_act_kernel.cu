// CUDA kernels of bsnas::bn_act and its backward (../bn_act.cpp), float32/float64/
// float16/bfloat16, NCHW and channels_last, float (double for float64) arithmetic, u =
// y * scale + shift never contracted into an FMA (bn_affine), as PyTorch computes it:
//   forward:  one elementwise launch, h = act(y * scale[c] + shift[c]);
//   backward: grad_y = gu * scale[c] written in the same pass that sums gu * y and gu per
//             channel (gu = grad_h * act'(u), u recomputed), deterministic
//             (channel_sums.cuh: two launches).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../masked_conv_common.h"
#include "channel_sums.cuh"
#include "cuda_util.cuh"

namespace bsnas {
namespace {

constexpr const char* kBnAct = "bn_act";
constexpr const char* kBnActBack = "_bn_act_backward";
constexpr int kThreads = 256;

// Flat grid-stride: value i belongs to channel (i / P) % C (NCHW, P = H * W) or i % C
// (channels_last, P = 1 in this formula). index_t: int32 when every index fits.
template <typename T, typename index_t>
__global__ void bn_act_forward_kernel(const T* __restrict__ y, const T* __restrict__ scale,
                                      const T* __restrict__ shift, T* __restrict__ h,
                                      index_t total, index_t C, index_t P, int act) {
  using acc_t = at::opmath_type<T>;
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
    const index_t c = (i / P) % C;
    const acc_t u = bn_affine(static_cast<acc_t>(y[i]), static_cast<acc_t>(scale[c]),
                              static_cast<acc_t>(shift[c]));
    h[i] = static_cast<T>(activate(u, act));
  }
}

// The backward's work per value: writes grad_y[i], adds gu * y and gu.
template <typename T>
struct BnActGradElem {
  const T* __restrict__ g;
  const T* __restrict__ y;
  const T* __restrict__ scale;
  const T* __restrict__ shift;
  T* __restrict__ gy;
  int act;

  __device__ __forceinline__ void operator()(int64_t i, int64_t c, double& a, double& b) const {
    using acc_t = at::opmath_type<T>;
    const acc_t sc = static_cast<acc_t>(scale[c]), yv = static_cast<acc_t>(y[i]);
    const acc_t u = bn_affine(yv, sc, static_cast<acc_t>(shift[c]));  // as the forward
    const acc_t gu = act_passes(u, act) ? static_cast<acc_t>(g[i]) : acc_t(0);
    gy[i] = static_cast<T>(gu * sc);
    a += static_cast<double>(gu) * static_cast<double>(yv);
    b += static_cast<double>(gu);
  }
};

at::Tensor forward_cuda(const at::Tensor& y_in, const at::Tensor& scale_in,
                        const at::Tensor& shift_in, int64_t act) {
  const c10::cuda::CUDAGuard guard(y_in.device());
  const BnActArgs a = prepare_bn_act(kBnAct, y_in, scale_in, shift_in, act);
  const at::Tensor &y = a.y, &scale = a.scale, &shift = a.shift, &h = a.out;
  const int64_t total = y.numel(), C = y.size(1);
  const int64_t P = a.channels_last ? 1 : y.size(2) * y.size(3);
  if (total == 0) return h;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto blocks = static_cast<unsigned>(std::clamp<int64_t>(
      ceil_div(total, kThreads), 1, int64_t{sm_count(y.get_device())} * 16));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), kBnAct, [&] {
    auto launch = [&](auto index) {
      using index_t = decltype(index);
      bn_act_forward_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
          shift.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(),
          static_cast<index_t>(total), static_cast<index_t>(C), static_cast<index_t>(P),
          static_cast<int>(act));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // int32 indices while i + step cannot overflow.
    if (total + int64_t{blocks} * kThreads <= std::numeric_limits<int32_t>::max()) {
      launch(int32_t{});
    } else {
      launch(int64_t{});
    }
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_h,
                                                             const at::Tensor& y_in,
                                                             const at::Tensor& scale_in,
                                                             const at::Tensor& shift_in,
                                                             int64_t act) {
  const c10::cuda::CUDAGuard guard(y_in.device());
  const BnActArgs a = prepare_bn_act(kBnActBack, y_in, scale_in, shift_in, act, &grad_h);
  const at::Tensor &y = a.y, &g = a.grad_h, &gy = a.out, &gscale = a.grad_scale,
                   &gshift = a.grad_shift;
  const int64_t N = y.size(0), C = y.size(1), P = y.size(2) * y.size(3);
  if (N * P == 0 || C == 0) return {gy, gscale.zero_(), gshift.zero_()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), kBnActBack, [&] {
    using T = scalar_t;
    const BnActGradElem<T> elem{g.const_data_ptr<T>(), y.const_data_ptr<T>(),
                                a.scale.const_data_ptr<T>(), a.shift.const_data_ptr<T>(),
                                gy.mutable_data_ptr<T>(), static_cast<int>(act)};
    channel_sums::run(elem, N, C, P, a.channels_last, y, stream,
                      gscale.mutable_data_ptr<T>(), gshift.mutable_data_ptr<T>());
  });
  return {gy, gscale, gshift};
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, CUDA, m) {
  m.impl("bn_act", &forward_cuda);
  m.impl("_bn_act_backward", &backward_cuda);
}

}  // namespace bsnas
