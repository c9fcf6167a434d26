// CUDA kernels of bsnas::masked_dwconv2d: direct depthwise convolution over the first
// `width` filters of a full-width weight [C_max, 1, k, k], read in place (rows past
// `width` are never touched), NCHW and channels_last, float32/float64/float16/bfloat16
// with float (double for float64) accumulation. Semantics mirror
// cpu/masked_dwconv2d_kernel.h exactly.
//
// Layouts:
// - NCHW kernels are flat: one thread per output (input, for grad_x) element in a
//   grid-stride loop, so a warp covers consecutive columns of a row and the weight
//   reads of a warp are (mostly) one broadcast address; except the forward for k = 3,
//   5, 7 at dilation 1 and stride 1 or 2, which runs in strips (dw_fwd_nchw_strips).
// - channels_last: for k = 3, 5, 7 at dilation 1, the forward (stride 1 or 2) and the
//   stride-1 input gradient run in runs of outputs along a row, several channels per
//   vector load (dwconv_nhwc_runs_kernel.cu). The other channels_last kernels are
//   channel-tiled: threadIdx.x is the channel inside a tile of at most 64 channels
//   (consecutive threads read consecutive addresses) and threadIdx.y/blockIdx.y stride
//   over pixels, so each thread keeps the k*k taps of its one filter in registers for
//   its whole pixel loop.
// grad_x is computed in gather form (one thread per input element, out_index_for_input,
// no atomics). grad_weight is a per-(channel, tap) reduction over N*Ho*Wo: each thread
// accumulates all k*k taps in registers, a block reduction combines them, and when the
// positions are split over gridDim.y the per-split partials go to a small [splits, width,
// k*k] buffer summed afterwards in split order (deterministic, no atomics); for NCHW
// with k = 3, 5, 7, dilation 1 and stride 1 or 2 each thread takes strips of kStrip
// outputs. The weight-gradient kernels, their launcher and the host helpers live in
// dwconv_cuda.cuh, shared with the fused bsnas::bn_act_dwconv2d.
//
// Kernel size is a template parameter for k = 3, 5, 7 (unrolled taps, register weights
// and accumulators); other odd k use the runtime-K kernels. Indices are int32 when every
// index fits (with grid-stride headroom), int64 otherwise (runtime-K kernels only).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "dwconv_cuda.cuh"
#include "dwconv_nhwc_runs_kernel.h"

namespace bsnas {
namespace {

constexpr const char* kFwd = "masked_dwconv2d";
constexpr const char* kBwd = "masked_dwconv2d_backward";

// ------------------------------------------------------------------------ forward

// y[n, c, oh, ow] = sum_{kh, kw} w[c, kh, kw] * x[n, c, oh*s - p + kh*d, ow*s - p + kw*d]
template <typename scalar_t, typename index_t, int KS>
__global__ void __launch_bounds__(kThreads)
    dw_fwd_nchw(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                scalar_t* __restrict__ y, const Dims<index_t> d, const index_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  const index_t step = index_t(blockDim.x) * index_t(gridDim.x);
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const index_t ow = i % d.Wo;
    index_t t = i / d.Wo;
    const index_t oh = t % d.Ho;
    t /= d.Ho;  // n * C + c
    const index_t c = t % d.C;
    const scalar_t* xp = x + t * d.H * d.W;
    const scalar_t* wp = w + c * K * K;
    const index_t ih0 = oh * d.stride - d.pad, iw0 = ow * d.stride - d.pad;
    acc_t s = 0;
#pragma unroll
    for (index_t kh = 0; kh < K; ++kh) {
      const index_t ih = ih0 + kh * d.dil;
      if (!in_range(ih, d.H)) continue;
      const scalar_t* xr = xp + ih * d.W;
#pragma unroll
      for (index_t kw = 0; kw < K; ++kw) {
        const index_t iw = iw0 + kw * d.dil;
        if (in_range(iw, d.W))
          s += static_cast<acc_t>(wp[kh * K + kw]) * static_cast<acc_t>(xr[iw]);
      }
    }
    y[i] = static_cast<scalar_t>(s);
  }
}

// The NCHW forward for k = 3, 5, 7, dilation 1, stride ST = 1 or 2 (dispatch_strips):
// the block layout and strips of the fused kernels (bn_act_dwconv2d_kernel.cu), with the
// input read as stored. Block (kThreads): channel blockIdx.x, its taps in registers;
// strips [q0, q1) of N*Ho*(strips per row), chunk blockIdx.y; each thread computes
// kStrip consecutive outputs of a row from one register span per input row (conv_strip)
// instead of k * k loads per output. Why: the fused NCHW kernel built this way, which
// also applies BN + activation and sums the output statistics, is faster than
// dw_fwd_nchw above on every NCHW shape (docs/performance.md). Taps are summed in
// dw_fwd_nchw's order (kernel rows, then columns); padding columns add w * 0.
template <typename scalar_t, int KS, int ST>
__global__ void __launch_bounds__(kThreads)
    dw_fwd_nchw_strips(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                       scalar_t* __restrict__ y, const Dims<int32_t> d, const int32_t chunk) {
  using index_t = int32_t;
  using acc_t = at::opmath_type<scalar_t>;
  const PlainLoads<scalar_t> in{nullptr, x};
  const typename PlainLoads<scalar_t>::Chan ch{};
  const index_t c = blockIdx.x;
  const index_t HoWo = d.Ho * d.Wo, HW = d.H * d.W;
  const index_t Wq = row_positions<ST>(d.Wo), HoWq = d.Ho * Wq;
  const index_t M = d.N * HoWq;
  const index_t q0 = index_t(blockIdx.y) * chunk;
  const index_t q1 = q0 + (chunk < M - q0 ? chunk : M - q0);
  acc_t wr[KS * KS];
#pragma unroll
  for (int t = 0; t < KS * KS; ++t) wr[t] = static_cast<acc_t>(w[c * KS * KS + t]);
  for (index_t q = q0 + threadIdx.x; q < q1; q += blockDim.x) {
    const index_t n = q / HoWq;
    const index_t r = q - n * HoWq;
    const index_t oh = r / Wq, ow0 = (r - oh * Wq) * kStrip;
    const index_t nc = n * d.C + c;
    acc_t out[kStrip];
    conv_strip<KS, ST>(in, ch, wr, d, nc * HW, d.W, index_t(1), oh * ST - d.pad,
                       ow0 * ST - d.pad, out);
    const index_t yb = nc * HoWo + oh * d.Wo;
#pragma unroll
    for (int j = 0; j < kStrip; ++j)
      if (ow0 + j < d.Wo) y[yb + ow0 + j] = static_cast<scalar_t>(out[j]);
  }
}

template <typename scalar_t, typename index_t, int KS>
__global__ void __launch_bounds__(kTileThreads)
    dw_fwd_nhwc(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                scalar_t* __restrict__ y, const Dims<index_t> d) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kR = KS > 0 ? KS * KS : 1;
  const index_t c = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= d.C) return;  // no barriers in this kernel
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  const scalar_t* wp = w + c * K * K;
  acc_t wr[kR];
  if constexpr (KS > 0) {
#pragma unroll
    for (int t = 0; t < kR; ++t) wr[t] = static_cast<acc_t>(wp[t]);
  }
  const index_t P = d.N * d.Ho * d.Wo;
  const index_t WC = d.W * d.C, HWC = d.H * d.W * d.C;
  const index_t step = index_t(blockDim.y) * index_t(gridDim.y);
  for (index_t p = index_t(blockIdx.y) * blockDim.y + threadIdx.y; p < P; p += step) {
    const index_t ow = p % d.Wo;
    const index_t t = p / d.Wo;
    const index_t oh = t % d.Ho, n = t / d.Ho;
    const scalar_t* xn = x + n * HWC + c;
    const index_t ih0 = oh * d.stride - d.pad, iw0 = ow * d.stride - d.pad;
    acc_t s = 0;
#pragma unroll
    for (index_t kh = 0; kh < K; ++kh) {
      const index_t ih = ih0 + kh * d.dil;
      if (!in_range(ih, d.H)) continue;
      const scalar_t* xr = xn + ih * WC;
#pragma unroll
      for (index_t kw = 0; kw < K; ++kw) {
        const index_t iw = iw0 + kw * d.dil;
        if (!in_range(iw, d.W)) continue;
        acc_t wv;
        if constexpr (KS > 0) wv = wr[kh * KS + kw];
        else wv = static_cast<acc_t>(wp[kh * K + kw]);
        s += wv * static_cast<acc_t>(xr[iw * d.C]);
      }
    }
    y[p * d.C + c] = static_cast<scalar_t>(s);
  }
}

// ------------------------------------------------------------------ grad input (gather)

// gx[n, c, ih, iw] = sum over taps (kh, kw) with ih = oh*s - p + kh*d (same for w) of
// w[c, kh, kw] * gy[n, c, oh, ow].
template <typename scalar_t, typename index_t, int KS, int ST>
__global__ void __launch_bounds__(kThreads)
    dw_bwd_in_nchw(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ w,
                   scalar_t* __restrict__ gx, const Dims<index_t> d, const index_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  const index_t step = index_t(blockDim.x) * index_t(gridDim.x);
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const index_t iw = i % d.W;
    index_t t = i / d.W;
    const index_t ih = t % d.H;
    t /= d.H;  // n * C + c
    const index_t c = t % d.C;
    const scalar_t* gyp = gy + t * d.Ho * d.Wo;
    const scalar_t* wp = w + c * K * K;
    acc_t s = 0;
#pragma unroll
    for (index_t kh = 0; kh < K; ++kh) {
      const index_t oh = gather_index<ST>(ih, kh * d.dil - d.pad, d.stride, d.Ho);
      if (oh < 0) continue;
      const scalar_t* gyr = gyp + oh * d.Wo;
#pragma unroll
      for (index_t kw = 0; kw < K; ++kw) {
        const index_t ow = gather_index<ST>(iw, kw * d.dil - d.pad, d.stride, d.Wo);
        if (ow >= 0) s += static_cast<acc_t>(wp[kh * K + kw]) * static_cast<acc_t>(gyr[ow]);
      }
    }
    gx[i] = static_cast<scalar_t>(s);
  }
}

template <typename scalar_t, typename index_t, int KS, int ST>
__global__ void __launch_bounds__(kTileThreads)
    dw_bwd_in_nhwc(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ w,
                   scalar_t* __restrict__ gx, const Dims<index_t> d) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kR = KS > 0 ? KS * KS : 1;
  const index_t c = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= d.C) return;  // no barriers in this kernel
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  const scalar_t* wp = w + c * K * K;
  acc_t wr[kR];
  if constexpr (KS > 0) {
#pragma unroll
    for (int t = 0; t < kR; ++t) wr[t] = static_cast<acc_t>(wp[t]);
  }
  const index_t P = d.N * d.H * d.W;
  const index_t WoC = d.Wo * d.C, HoWoC = d.Ho * d.Wo * d.C;
  const index_t step = index_t(blockDim.y) * index_t(gridDim.y);
  for (index_t p = index_t(blockIdx.y) * blockDim.y + threadIdx.y; p < P; p += step) {
    const index_t iw = p % d.W;
    const index_t t = p / d.W;
    const index_t ih = t % d.H, n = t / d.H;
    const scalar_t* gyn = gy + n * HoWoC + c;
    acc_t s = 0;
#pragma unroll
    for (index_t kh = 0; kh < K; ++kh) {
      const index_t oh = gather_index<ST>(ih, kh * d.dil - d.pad, d.stride, d.Ho);
      if (oh < 0) continue;
      const scalar_t* gyr = gyn + oh * WoC;
#pragma unroll
      for (index_t kw = 0; kw < K; ++kw) {
        const index_t ow = gather_index<ST>(iw, kw * d.dil - d.pad, d.stride, d.Wo);
        if (ow < 0) continue;
        acc_t wv;
        if constexpr (KS > 0) wv = wr[kh * KS + kw];
        else wv = static_cast<acc_t>(wp[kh * K + kw]);
        s += wv * static_cast<acc_t>(gyr[ow * d.C]);
      }
    }
    gx[p * d.C + c] = static_cast<scalar_t>(s);
  }
}

// ------------------------------------------------------------------------------ host

template <typename scalar_t>
void launch_forward(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y,
                    const DwGeometry& g) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x.get_device());
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  if (!g.channels_last && uses_strips(g, weight.numel())) {
    dispatch_strips(g, weight.numel(), [&]<typename index_t, int KS, int ST>() {
      if constexpr (ST > 0) {
        const Split sp = split_positions(g.N * g.Ho * row_positions<ST>(g.Wo), g.C, kThreads, sms);
        const dim3 grid(static_cast<unsigned>(g.C), static_cast<unsigned>(sp.splits));
        dw_fwd_nchw_strips<scalar_t, KS, ST><<<grid, kThreads, 0, stream>>>(
            xp, wp, yp, make_dims<int32_t>(g), static_cast<int32_t>(sp.chunk));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    return;
  }
  dispatch_index_k(g, weight.numel(), [&]<typename index_t, int KS>() {
    const Dims<index_t> d = make_dims<index_t>(g);
    if (g.channels_last) {
      const Tile t = channel_tile(g.C);
      const dim3 block(t.ct, t.py);
      const dim3 grid(static_cast<unsigned>(t.tiles), tile_blocks_y(g.N * g.Ho * g.Wo, t, sms));
      dw_fwd_nhwc<scalar_t, index_t, KS><<<grid, block, 0, stream>>>(xp, wp, yp, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t total = y.numel();
      dw_fwd_nchw<scalar_t, index_t, KS><<<flat_blocks(total, sms), kThreads, 0, stream>>>(
          xp, wp, yp, d, static_cast<index_t>(total));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

template <typename scalar_t>
void launch_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight,
                     at::Tensor& gx, at::Tensor& gw, const DwGeometry& g) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x.get_device());
  const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  const Tile tile = g.channels_last ? channel_tile(g.C) : Tile{0, 0, 0};
  // grad_x
  if (dw_runs::handles_input_grad(g, weight.numel())) {
    dw_runs::run_input_grad(gy, weight, gx, g);
  } else {
    dispatch_index_k(g, weight.numel(), [&]<typename index_t, int KS>() {
      const Dims<index_t> d = make_dims<index_t>(g);
      dispatch_stride<index_t, KS>(g.stride, [&]<int ST>() {
        if (g.channels_last) {
          const dim3 block(tile.ct, tile.py);
          const dim3 grid(static_cast<unsigned>(tile.tiles),
                          tile_blocks_y(g.N * g.H * g.W, tile, sms));
          dw_bwd_in_nhwc<scalar_t, index_t, KS, ST><<<grid, block, 0, stream>>>(gyp, wp, gxp, d);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          const int64_t total = x.numel();
          dw_bwd_in_nchw<scalar_t, index_t, KS, ST>
              <<<flat_blocks(total, sms), kThreads, 0, stream>>>(gyp, wp, gxp, d,
                                                                 static_cast<index_t>(total));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  }
  // grad_weight, rows [0, width) of the full-width gradient. NCHW in strips where they
  // apply: the fused op's backward in strips, doing more work, is faster than per-tap
  // reads on NCHW shapes from 14x14 up; this takes the weight-gradient half of that.
  // channels_last keeps per-tap reads (strips do not pay there; docs/performance.md).
  launch_weight_grad(PlainLoads<scalar_t>{gyp, x.const_data_ptr<scalar_t>()},
                     gw.mutable_data_ptr<scalar_t>(), x, g, weight.numel(),
                     /*strips=*/!g.channels_last, stream);
}

at::Tensor forward_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, int64_t width,
                        int64_t stride, int64_t padding, int64_t dilation) {
  const DwGeometry g = check_dw_args(kFwd, x_in, weight_in, width, stride, padding, dilation);
  TORCH_CHECK(x_in.is_cuda(), kFwd, ": expected CUDA tensors, got ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = compute_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor weight = weight_in.contiguous();  // a no-op for parameters
  at::Tensor y = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  if (x.numel() == 0) return y.zero_();  // every tap reads padding
  if (dw_runs::handles_forward(g, weight.numel())) {
    dw_runs::run_forward(x, weight, y, g);
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  x.scalar_type(), kFwd,
                                  [&] { launch_forward<scalar_t>(x, weight, y, g); });
  return y;
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_out,
                                                 const at::Tensor& x_in,
                                                 const at::Tensor& weight_in, int64_t width,
                                                 int64_t stride, int64_t padding,
                                                 int64_t dilation) {
  const DwGeometry g = check_dw_args(kBwd, x_in, weight_in, width, stride, padding, dilation);
  check_grad_out(kBwd, grad_out, x_in, {g.N, g.C, g.Ho, g.Wo});
  TORCH_CHECK(x_in.is_cuda(), kBwd, ": expected CUDA tensors, got ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = compute_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor gy = grad_out.contiguous(fmt);
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor gx = at::empty_like(x, x.options().memory_format(fmt));
  // Full-width gradient; rows past `width` stay zero.
  at::Tensor gw = weight_grad_outside_zeroed(weight, g.C, g.K * g.K);
  if (x.numel() == 0) return {gx.zero_(), gw.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  x.scalar_type(), kBwd,
                                  [&] { launch_backward<scalar_t>(gy, x, weight, gx, gw, g); });
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, CUDA, m) {
  m.impl("masked_dwconv2d", &forward_cuda);
  m.impl("_masked_dwconv2d_backward", &backward_cuda);
}

}  // namespace bsnas
