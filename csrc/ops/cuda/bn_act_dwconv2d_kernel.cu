// CUDA kernels of the fused bsnas::bn_act_dwconv2d and its backward,
// float32/float64/float16/bfloat16, NCHW and channels_last, float (double for float64)
// arithmetic and accumulation; the output statistics accumulate in double and are
// returned as float64:
//
//   forward (this file): a = act(z * scale + shift) applied as z is read, y = depthwise
//             conv of a with weight[:width], and the per-channel sum and sum of squares
//             of y (as stored, i.e. rounded to its dtype), all in one kernel;
//   backward (entry point here; kernels in bn_act_dwconv2d_wgrad_kernel.cu and
//             bn_act_dwconv2d_igrad_kernel.cu, separate translation units so they
//             compile in parallel): with gyt = grad_y + grad_sum[c] + 2 * y * grad_sumsq[c] formed
//             where read, grad_weight = the depthwise weight-gradient reduction of gyt
//             against a (read from z through BN + act), and in one gather kernel grad_a
//             at each input position, gu = grad_a * act'(u), grad_z = gu * scale[c] and
//             the per-channel grad_shift = sum(gu), grad_scale = sum(gu * z).
//
// Neither u = z * scale + shift nor a = act(u) is ever stored. u is rounded after the
// product and after the sum (bn_affine), as PyTorch's `z * scale + shift` in float32 /
// float64, and act' is 0 at the kinks (act_passes), as F.relu / F.relu6 autograd.
//
// The per-channel reductions are deterministic: block reductions in a fixed order and,
// when the positions of a channel are split over gridDim.y, per-split partials summed in
// split order by sum_splits (dwconv_cuda.cuh); no atomics. Blocks: NCHW one block of
// kThreads per (channel, chunk of positions), so the channel's taps and BN parameters
// sit in registers; channels_last (channel tile, chunk of pixels) as in
// masked_dwconv2d_kernel.cu. Indices are int32 when everything fits, int64 otherwise.
//
// Strips: applying BN + act (or forming gyt) on every tap read would cost k * k
// transforms per output. For k = 3, 5, 7 with dilation 1 and stride 1 or 2 (forward,
// weight gradient) or stride 1 (input gradient), each thread instead handles kStrip
// consecutive outputs (inputs) of a row and transforms each input (gradient) row span
// once into registers, with the taps unrolled and the filter in registers. Other
// geometries (dilation > 1, stride > 2, other k; rare in MobileNet-like spaces) take
// runtime-k kernels that transform per tap (conv_at, gather_at, point_weight_grad);
// stride-2 input gradients keep a compile-time k and stride.
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

#include <cstdint>
#include <tuple>

#include "bn_act_dwconv2d_kernel.h"
#include "dwconv_cuda.cuh"

namespace bsnas {
namespace {

constexpr const char* kFwd = "bn_act_dwconv2d";
constexpr const char* kBwd = "bn_act_dwconv2d_backward";

// ------------------------------------------------------------------------ forward

// Stores the outputs [ow0, min(ow0 + kStrip, Wo)) of a strip at yb + ow * step and adds
// them (as stored) to the statistics.
template <typename scalar_t, typename index_t, typename acc_t>
__device__ __forceinline__ void store_strip(scalar_t* __restrict__ y, index_t yb, index_t step,
                                            index_t ow0, index_t Wo,
                                            const acc_t (&out)[kStrip], double& s1, double& s2) {
#pragma unroll
  for (int j = 0; j < kStrip; ++j) {
    if (ow0 + j < Wo) {
      const scalar_t v = static_cast<scalar_t>(out[j]);
      y[yb + (ow0 + j) * step] = v;
      const double f = static_cast<double>(static_cast<acc_t>(v));
      s1 += f;
      s2 += f * f;
    }
  }
}

// Block (kThreads): channel blockIdx.x, positions [q0, q1) of N*Ho*(outputs or strips
// per row), chunk blockIdx.y. ST > 0: strips (conv_strip, stride ST, dilation 1).
template <typename scalar_t, typename index_t, int KS, int ST>
__global__ void __launch_bounds__(kThreads)
    bnact_fwd_nchw(const BnActInput<scalar_t> in, const scalar_t* __restrict__ w,
                   scalar_t* __restrict__ y, double* __restrict__ sum,
                   double* __restrict__ sumsq, double* __restrict__ part,
                   const Dims<index_t> d, const index_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kR = KS > 0 ? KS * KS : 1;
  __shared__ double red[2 * kWarps];
  const index_t c = blockIdx.x;
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  const index_t HoWo = d.Ho * d.Wo, HW = d.H * d.W;
  const index_t Wq = row_positions<ST>(d.Wo), HoWq = d.Ho * Wq;
  const index_t M = d.N * HoWq;
  const index_t q0 = index_t(blockIdx.y) * chunk;
  const index_t q1 = q0 + (chunk < M - q0 ? chunk : M - q0);
  const auto ch = in.channel(c);
  const scalar_t* wp = w + c * K * K;
  acc_t wr[kR];
  if constexpr (KS > 0) {
#pragma unroll
    for (int t = 0; t < kR; ++t) wr[t] = static_cast<acc_t>(wp[t]);
  }
  double s1 = 0, s2 = 0;  // the statistics accumulate in double (returned as float64)
  for (index_t q = q0 + threadIdx.x; q < q1; q += blockDim.x) {
    const index_t n = q / HoWq;
    const index_t r = q - n * HoWq;
    const index_t oh = r / Wq, oq = r - oh * Wq;
    const index_t nc = n * d.C + c;
    if constexpr (ST > 0) {
      acc_t out[kStrip];
      const index_t ow0 = oq * kStrip;
      conv_strip<KS, ST>(in, ch, wr, d, nc * HW, d.W, index_t(1), oh * ST - d.pad,
                         ow0 * ST - d.pad, out);
      store_strip(y, nc * HoWo + oh * d.Wo, index_t(1), ow0, d.Wo, out, s1, s2);
    } else {
      const acc_t s = conv_at<KS>(in, ch, wr, wp, d, nc * HW, d.W, index_t(1),
                                  oh * d.stride - d.pad, oq * d.stride - d.pad);
      const scalar_t v = static_cast<scalar_t>(s);
      y[nc * HoWo + r] = v;
      const double f = static_cast<double>(static_cast<acc_t>(v));
      s1 += f;
      s2 += f * f;
    }
  }
  block_sum2(s1, s2, red);
  if (threadIdx.x == 0) store_pair(sum, sumsq, part, blockIdx.y, d.C, c, s1, s2);
}

// Block (ct channels) x (py pixel lanes): channel tile blockIdx.x, positions [p0, p1)
// of N*Ho*(outputs or strips per row), chunk blockIdx.y.
template <typename scalar_t, typename index_t, int KS, int ST>
__global__ void __launch_bounds__(kTileThreads)
    bnact_fwd_nhwc(const BnActInput<scalar_t> in, const scalar_t* __restrict__ w,
                   scalar_t* __restrict__ y, double* __restrict__ sum,
                   double* __restrict__ sumsq, double* __restrict__ part,
                   const Dims<index_t> d, const index_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kR = KS > 0 ? KS * KS : 1;
  __shared__ double red[2 * kTileThreads];
  const index_t c = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = c < d.C;
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  const index_t Wq = row_positions<ST>(d.Wo);
  const index_t P = d.N * d.Ho * Wq;
  const index_t p0 = index_t(blockIdx.y) * chunk;
  const index_t p1 = p0 + (chunk < P - p0 ? chunk : P - p0);
  const index_t cc = active ? c : index_t(0);
  const auto ch = in.channel(cc);
  const scalar_t* wp = w + cc * K * K;
  acc_t wr[kR];
  if constexpr (KS > 0) {
#pragma unroll
    for (int t = 0; t < kR; ++t) wr[t] = static_cast<acc_t>(wp[t]);
  }
  const index_t WC = d.W * d.C, HWC = d.H * WC;
  double s1 = 0, s2 = 0;  // the statistics accumulate in double (returned as float64)
  if (active) {
    for (index_t p = p0 + threadIdx.y; p < p1; p += blockDim.y) {
      const index_t oq = p % Wq;
      const index_t t = p / Wq;  // n * Ho + oh
      const index_t oh = t % d.Ho, n = t / d.Ho;
      if constexpr (ST > 0) {
        acc_t out[kStrip];
        const index_t ow0 = oq * kStrip;
        conv_strip<KS, ST>(in, ch, wr, d, n * HWC + c, WC, d.C, oh * ST - d.pad,
                           ow0 * ST - d.pad, out);
        store_strip(y, t * d.Wo * d.C + c, d.C, ow0, d.Wo, out, s1, s2);
      } else {
        const acc_t s = conv_at<KS>(in, ch, wr, wp, d, n * HWC + c, WC, d.C,
                                    oh * d.stride - d.pad, oq * d.stride - d.pad);
        const scalar_t v = static_cast<scalar_t>(s);
        y[p * d.C + c] = v;
        const double f = static_cast<double>(static_cast<acc_t>(v));
        s1 += f;
        s2 += f * f;
      }
    }
  }
  tile_sum2(s1, s2, red);
  if (threadIdx.y == 0 && active) store_pair(sum, sumsq, part, blockIdx.y, d.C, c, s1, s2);
}

// ------------------------------------------------------------------------------ host

template <typename scalar_t>
void launch_forward(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                    const at::Tensor& weight, int64_t act, at::Tensor& y, at::Tensor& sum,
                    at::Tensor& sumsq, const DwGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(z.get_device());
  const BnActInput<scalar_t> in{z.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
                                shift.const_data_ptr<scalar_t>(), static_cast<int>(act)};
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  double* sump = sum.mutable_data_ptr<double>();
  double* sqp = sumsq.mutable_data_ptr<double>();
  const Tile tile = g.channels_last ? channel_tile(g.C) : Tile{0, 0, 0};
  at::Tensor part;
  dispatch_strips(g, weight.numel(), [&]<typename index_t, int KS, int ST>() {
    const int64_t M = g.N * g.Ho * row_positions<ST>(g.Wo);
    const Split sp = g.channels_last ? split_positions(M, tile.tiles, tile.py, sms)
                                     : split_positions(M, g.C, kThreads, sms);
    double* partp = nullptr;
    if (sp.splits > 1) {
      part = partial_buffer<double>(z, sp.splits, 2, g.C);
      partp = part.mutable_data_ptr<double>();
    }
    const Dims<index_t> d = make_dims<index_t>(g);
    const auto chunk = static_cast<index_t>(sp.chunk);
    if (g.channels_last) {
      const dim3 grid(static_cast<unsigned>(tile.tiles), static_cast<unsigned>(sp.splits));
      bnact_fwd_nhwc<scalar_t, index_t, KS, ST><<<grid, dim3(tile.ct, tile.py), 0, stream>>>(
          in, wp, yp, sump, sqp, partp, d, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const dim3 grid(static_cast<unsigned>(g.C), static_cast<unsigned>(sp.splits));
      bnact_fwd_nchw<scalar_t, index_t, KS, ST><<<grid, kThreads, 0, stream>>>(
          in, wp, yp, sump, sqp, partp, d, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (sp.splits > 1)
      launch_sum_splits<double, double>(partp, sp.splits, g.C, sump, sqp, sms, stream);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& z_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
    const at::Tensor& weight_in, int64_t width, int64_t stride, int64_t padding,
    int64_t dilation, int64_t act) {
  const DwGeometry g = check_dw_args(kFwd, z_in, weight_in, width, stride, padding, dilation);
  check_affine_act(kFwd, z_in, scale_in, shift_in, width, act);
  TORCH_CHECK(z_in.is_cuda(), kFwd, ": expected CUDA tensors, got ", z_in.device());
  const c10::cuda::CUDAGuard guard(z_in.device());
  const auto fmt = compute_format(z_in);
  const at::Tensor z = z_in.contiguous(fmt);
  const at::Tensor weight = weight_in.contiguous();  // a no-op for parameters
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  at::Tensor y = at::empty({g.N, g.C, g.Ho, g.Wo}, z.options().memory_format(fmt));
  const auto f64 = z.options().dtype(at::kDouble);
  at::Tensor sum = at::empty({g.C}, f64), sumsq = at::empty({g.C}, f64);
  if (y.numel() == 0 || z.numel() == 0) {  // no outputs, or every tap reads padding
    y.zero_();
    sum.zero_();
    sumsq.zero_();
    return {y, sum, sumsq};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  z.scalar_type(), kFwd, [&] {
                                    launch_forward<scalar_t>(z, scale, shift, weight, act, y,
                                                             sum, sumsq, g);
                                  });
  return {y, sum, sumsq};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& grad_sum, const at::Tensor& grad_sumsq,
    const at::Tensor& z_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
    const at::Tensor& weight_in, const at::Tensor& y_in, int64_t width, int64_t stride,
    int64_t padding, int64_t dilation, int64_t act) {
  const DwGeometry g =
      check_bn_act_dw_backward_args(kBwd, grad_y, grad_sum, grad_sumsq, z_in, scale_in,
                                    shift_in, weight_in, y_in, width, stride, padding,
                                    dilation, act);
  TORCH_CHECK(z_in.is_cuda(), kBwd, ": expected CUDA tensors, got ", z_in.device());
  const c10::cuda::CUDAGuard guard(z_in.device());
  const auto fmt = compute_format(z_in);
  const at::Tensor z = z_in.contiguous(fmt);
  const at::Tensor gy = grad_y.contiguous(fmt), y = y_in.contiguous(fmt);
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const at::Tensor gsum = grad_sum.contiguous(), gsq = grad_sumsq.contiguous();  // float64
  at::Tensor gz = at::empty_like(z, z.options().memory_format(fmt));
  at::Tensor gscale = at::empty({g.C}, z.options()), gshift = at::empty({g.C}, z.options());
  // Full-width gradient; rows past `width` stay zero.
  at::Tensor gw = weight_grad_outside_zeroed(weight, g.C, g.K * g.K);
  if (z.numel() == 0) {  // a is all padding: every gradient is zero (or empty)
    gscale.zero_();
    gshift.zero_();
    return {gz, gscale, gshift, gw.zero_()};
  }
  bn_act_cuda::weight_grad(gy, gsum, gsq, z, scale, shift, y, act, gw, g);
  bn_act_cuda::input_grad(gy, gsum, gsq, z, scale, shift, y, weight, act, gz, gscale, gshift,
                          g);
  return {gz, gscale, gshift, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, CUDA, m) {
  m.impl("bn_act_dwconv2d", &forward_cuda);
  m.impl("_bn_act_dwconv2d_backward", &backward_cuda);
}

}  // namespace bsnas
