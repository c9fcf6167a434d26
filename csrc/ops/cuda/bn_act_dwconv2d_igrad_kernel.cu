// grad_z, grad_scale and grad_shift of the fused bsnas::bn_act_dwconv2d on CUDA, in one
// gather kernel per layout: at each input position, grad_a = sum over the taps that read
// it of w * gyt (gyt = grad_y + grad_sum[c] + 2 * y * grad_sumsq[c], formed where read),
// gu = grad_a * act'(u) with u = z * scale + shift recomputed (act' = 0 at the kinks, as
// F.relu / F.relu6 autograd), grad_z = gu * scale[c], and per channel grad_shift =
// sum(gu), grad_scale = sum(gu * z) reduced deterministically (fixed-order block
// reductions, split partials summed in order by sum_splits). Strips of kStrip inputs for
// k = 3, 5, 7 with stride 1 and dilation 1 (each output row span of gyt formed once);
// a compile-time stride 2 for k = 3, 5, 7; runtime k and stride otherwise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "bn_act_dwconv2d_kernel.h"
#include "dwconv_cuda.cuh"

namespace bsnas {
namespace {

// ------------------------------------------------- grad z, grad scale, grad shift

// grad_a at input (ih, iw) of channel `ch`: sum over the taps (kh, kw) with
// ih = oh*s - p + kh*d (same for w) of w * gyt[n, c, oh, ow]; `gb` is the flat index of
// (n, c, 0, 0) in grad_y and (sh, sw) the element strides of an output row and column.
template <int KS, int ST, typename index_t, typename Loads, typename acc_t>
__device__ __forceinline__ acc_t gather_at(const Loads& ld, const typename Loads::Chan& ch,
                                           const acc_t* wr, const typename Loads::scalar* wp,
                                           const Dims<index_t>& d, index_t gb, index_t sh,
                                           index_t sw, index_t ih, index_t iw) {
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  acc_t s = 0;
#pragma unroll
  for (index_t kh = 0; kh < K; ++kh) {
    const index_t oh = gather_index<ST>(ih, kh * d.dil - d.pad, d.stride, d.Ho);
    if (oh < 0) continue;
    const index_t gr = gb + oh * sh;
#pragma unroll
    for (index_t kw = 0; kw < K; ++kw) {
      const index_t ow = gather_index<ST>(iw, kw * d.dil - d.pad, d.stride, d.Wo);
      if (ow < 0) continue;
      acc_t wv;
      if constexpr (KS > 0) wv = wr[kh * KS + kw];
      else wv = static_cast<acc_t>(wp[kh * K + kw]);
      s += wv * ld.g(ch, gr + ow * sw);
    }
  }
  return s;
}

// grad_a at kStrip consecutive inputs (ih, iw0 + j) for a fixed k, stride 1 and
// dilation 1: each output row's span of kStrip + KS - 1 gradients gyt is read and formed
// once into registers and feeds KS taps of every input. Per input, the taps are summed
// in the same order as gather_at (taps that read past the output add 0).
template <int KS, typename index_t, typename Loads, typename acc_t>
__device__ __forceinline__ void gather_strip(const Loads& ld, const typename Loads::Chan& ch,
                                             const acc_t* wr, const Dims<index_t>& d,
                                             index_t gb, index_t sh, index_t sw, index_t ih,
                                             index_t iw0, acc_t (&ga)[kStrip]) {
  constexpr int kSpan = kStrip + KS - 1;
#pragma unroll
  for (int j = 0; j < kStrip; ++j) ga[j] = 0;
  const index_t ow_lo = iw0 + d.pad - (KS - 1);  // the output read by (j, kw) = (0, KS - 1)
#pragma unroll
  for (int kh = 0; kh < KS; ++kh) {
    const index_t oh = ih + d.pad - kh;
    if (!in_range(oh, d.Ho)) continue;
    const index_t gr = gb + oh * sh;
    acc_t gs[kSpan];
#pragma unroll
    for (int t = 0; t < kSpan; ++t) {
      const index_t ow = ow_lo + t;
      gs[t] = in_range(ow, d.Wo) ? ld.g(ch, gr + ow * sw) : acc_t(0);
    }
#pragma unroll
    for (int j = 0; j < kStrip; ++j) {
#pragma unroll
      for (int kw = 0; kw < KS; ++kw) ga[j] += wr[kh * KS + kw] * gs[j + KS - 1 - kw];
    }
  }
}

// The end of the input gradient at one input zi given grad_a: gu = grad_a * act'(u),
// grad_z = gu * scale, and (gu * z, gu) added to the grad_scale / grad_shift sums.
template <typename scalar_t, typename index_t, typename acc_t>
__device__ __forceinline__ void finish_input(const BnActLoads<scalar_t>& ld,
                                             const typename BnActLoads<scalar_t>::Chan& ch,
                                             scalar_t* __restrict__ gz, index_t zi, acc_t ga,
                                             acc_t& s_scale, acc_t& s_shift) {
  const acc_t zv = static_cast<acc_t>(ld.in.z[zi]);
  const acc_t gu =
      act_passes(bn_affine(zv, ch.in.scale, ch.in.shift), ld.in.act) ? ga : acc_t(0);
  gz[zi] = static_cast<scalar_t>(gu * ch.in.scale);
  s_scale += gu * zv;
  s_shift += gu;
}

// Block (kThreads): channel blockIdx.x, input positions [q0, q1) of N*H*W (of N*H*strips
// when SP: fixed k, stride 1, dilation 1), chunk blockIdx.y. grad_scale -> out0 /
// partial 0, grad_shift -> out1 / partial 1.
template <typename scalar_t, typename index_t, int KS, int ST, bool SP>
__global__ void __launch_bounds__(kThreads)
    bnact_bwd_in_nchw(const BnActLoads<scalar_t> ld, const scalar_t* __restrict__ w,
                      scalar_t* __restrict__ gz, scalar_t* __restrict__ gscale,
                      scalar_t* __restrict__ gshift,
                      at::opmath_type<scalar_t>* __restrict__ part, const Dims<index_t> d,
                      const index_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kR = KS > 0 ? KS * KS : 1;
  __shared__ acc_t red[2 * kWarps];
  const index_t c = blockIdx.x;
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  const index_t HoWo = d.Ho * d.Wo, HW = d.H * d.W;
  const index_t Wq = row_positions<SP ? 1 : 0>(d.W), HWq = d.H * Wq;
  const index_t M = d.N * HWq;
  const index_t q0 = index_t(blockIdx.y) * chunk;
  const index_t q1 = q0 + (chunk < M - q0 ? chunk : M - q0);
  const auto ch = ld.channel(c);
  const scalar_t* wp = w + c * K * K;
  acc_t wr[kR];
  if constexpr (KS > 0) {
#pragma unroll
    for (int t = 0; t < kR; ++t) wr[t] = static_cast<acc_t>(wp[t]);
  }
  acc_t s_scale = 0, s_shift = 0;
  for (index_t q = q0 + threadIdx.x; q < q1; q += blockDim.x) {
    const index_t n = q / HWq;
    const index_t r = q - n * HWq;
    const index_t ih = r / Wq, iq = r - ih * Wq;
    const index_t nc = n * d.C + c;
    if constexpr (SP) {
      static_assert(KS > 0 && ST == 1, "strips need a fixed k and stride 1");
      const index_t iw0 = iq * kStrip, zb = nc * HW + ih * d.W;
      acc_t ga[kStrip];
      gather_strip<KS>(ld, ch, wr, d, nc * HoWo, d.Wo, index_t(1), ih, iw0, ga);
#pragma unroll
      for (int j = 0; j < kStrip; ++j)
        if (iw0 + j < d.W) finish_input(ld, ch, gz, zb + iw0 + j, ga[j], s_scale, s_shift);
    } else {
      const index_t zi = nc * HW + r;
      const acc_t zv = static_cast<acc_t>(ld.in.z[zi]);
      acc_t gu = 0;  // the gather is skipped where act' = 0
      if (act_passes(bn_affine(zv, ch.in.scale, ch.in.shift), ld.in.act))
        gu = gather_at<KS, ST>(ld, ch, wr, wp, d, nc * HoWo, d.Wo, index_t(1), ih, iq);
      gz[zi] = static_cast<scalar_t>(gu * ch.in.scale);
      s_scale += gu * zv;
      s_shift += gu;
    }
  }
  block_sum2(s_scale, s_shift, red);
  if (threadIdx.x == 0) store_pair(gscale, gshift, part, blockIdx.y, d.C, c, s_scale, s_shift);
}

// Block (ct channels) x (py pixel lanes): channel tile blockIdx.x, input positions
// [p0, p1) of N*H*W (of N*H*strips when SP), chunk blockIdx.y.
template <typename scalar_t, typename index_t, int KS, int ST, bool SP>
__global__ void __launch_bounds__(kTileThreads)
    bnact_bwd_in_nhwc(const BnActLoads<scalar_t> ld, const scalar_t* __restrict__ w,
                      scalar_t* __restrict__ gz, scalar_t* __restrict__ gscale,
                      scalar_t* __restrict__ gshift,
                      at::opmath_type<scalar_t>* __restrict__ part, const Dims<index_t> d,
                      const index_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kR = KS > 0 ? KS * KS : 1;
  __shared__ acc_t red[2 * kTileThreads];
  const index_t c = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = c < d.C;
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  const index_t Wq = row_positions<SP ? 1 : 0>(d.W);
  const index_t P = d.N * d.H * Wq;
  const index_t p0 = index_t(blockIdx.y) * chunk;
  const index_t p1 = p0 + (chunk < P - p0 ? chunk : P - p0);
  const index_t cc = active ? c : index_t(0);
  const auto ch = ld.channel(cc);
  const scalar_t* wp = w + cc * K * K;
  acc_t wr[kR];
  if constexpr (KS > 0) {
#pragma unroll
    for (int t = 0; t < kR; ++t) wr[t] = static_cast<acc_t>(wp[t]);
  }
  const index_t WoC = d.Wo * d.C, HoWoC = d.Ho * WoC;
  acc_t s_scale = 0, s_shift = 0;
  if (active) {
    for (index_t p = p0 + threadIdx.y; p < p1; p += blockDim.y) {
      const index_t iq = p % Wq;
      const index_t t = p / Wq;  // n * H + ih
      const index_t ih = t % d.H, n = t / d.H;
      if constexpr (SP) {
        static_assert(KS > 0 && ST == 1, "strips need a fixed k and stride 1");
        const index_t iw0 = iq * kStrip, zb = t * d.W * d.C + c;
        acc_t ga[kStrip];
        gather_strip<KS>(ld, ch, wr, d, n * HoWoC + c, WoC, d.C, ih, iw0, ga);
#pragma unroll
        for (int j = 0; j < kStrip; ++j)
          if (iw0 + j < d.W)
            finish_input(ld, ch, gz, zb + (iw0 + j) * d.C, ga[j], s_scale, s_shift);
      } else {
        const index_t zi = p * d.C + c;
        const acc_t zv = static_cast<acc_t>(ld.in.z[zi]);
        acc_t gu = 0;  // the gather is skipped where act' = 0
        if (act_passes(bn_affine(zv, ch.in.scale, ch.in.shift), ld.in.act))
          gu = gather_at<KS, ST>(ld, ch, wr, wp, d, n * HoWoC + c, WoC, d.C, ih, iq);
        gz[zi] = static_cast<scalar_t>(gu * ch.in.scale);
        s_scale += gu * zv;
        s_shift += gu;
      }
    }
  }
  tile_sum2(s_scale, s_shift, red);
  if (threadIdx.y == 0 && active)
    store_pair(gscale, gshift, part, blockIdx.y, d.C, c, s_scale, s_shift);
}

// ------------------------------------------------------------------------------ host

// The gather kernels' variants, fn.template operator()<index_t, KS, ST, SP>(): strips
// (SP) for k = 3, 5, 7, stride 1, dilation 1; per-input gathers with a compile-time
// stride 2 for k = 3, 5, 7; runtime k and stride (int32 or int64 indices) otherwise.
template <typename Fn>
void dispatch_gather(const DwGeometry& g, int64_t weight_numel, const Fn& fn) {
  const bool i32 = fits_int32(g, weight_numel);
  if (i32 && ((g.stride == 1 && g.dil == 1) || g.stride == 2)) {
    const auto by_stride = [&]<int KS>() {
      if (g.stride == 1) fn.template operator()<int32_t, KS, 1, true>();
      else fn.template operator()<int32_t, KS, 2, false>();
    };
    switch (g.K) {
      case 3: return by_stride.template operator()<3>();
      case 5: return by_stride.template operator()<5>();
      case 7: return by_stride.template operator()<7>();
      default: break;
    }
  }
  if (i32) fn.template operator()<int32_t, 0, 0, false>();
  else fn.template operator()<int64_t, 0, 0, false>();
}

template <typename scalar_t>
void launch_input_grad(const BnActLoads<scalar_t>& ld, const at::Tensor& weight,
                       at::Tensor& gz, at::Tensor& gscale, at::Tensor& gshift,
                       const DwGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(gz.get_device());
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  scalar_t* gzp = gz.mutable_data_ptr<scalar_t>();
  scalar_t* gsp = gscale.mutable_data_ptr<scalar_t>();
  scalar_t* gbp = gshift.mutable_data_ptr<scalar_t>();
  const Tile tile = g.channels_last ? channel_tile(g.C) : Tile{0, 0, 0};
  at::Tensor part;
  // Reductions over the N*H*W inputs (or N*H*strips) of each channel.
  dispatch_gather(g, weight.numel(), [&]<typename index_t, int KS, int ST, bool SP>() {
    const int64_t M = g.N * g.H * row_positions<SP ? 1 : 0>(g.W);
    const Split sp = g.channels_last ? split_positions(M, tile.tiles, tile.py, sms)
                                     : split_positions(M, g.C, kThreads, sms);
    acc_t* partp = nullptr;
    if (sp.splits > 1) {
      part = partial_buffer<acc_t>(gz, sp.splits, 2, g.C);
      partp = part.mutable_data_ptr<acc_t>();
    }
    const Dims<index_t> d = make_dims<index_t>(g);
    const auto chunk = static_cast<index_t>(sp.chunk);
    if (g.channels_last) {
      const dim3 grid(static_cast<unsigned>(tile.tiles), static_cast<unsigned>(sp.splits));
      bnact_bwd_in_nhwc<scalar_t, index_t, KS, ST, SP>
          <<<grid, dim3(tile.ct, tile.py), 0, stream>>>(ld, wp, gzp, gsp, gbp, partp, d, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const dim3 grid(static_cast<unsigned>(g.C), static_cast<unsigned>(sp.splits));
      bnact_bwd_in_nchw<scalar_t, index_t, KS, ST, SP><<<grid, kThreads, 0, stream>>>(
          ld, wp, gzp, gsp, gbp, partp, d, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (sp.splits > 1)
      launch_sum_splits<scalar_t, acc_t>(partp, sp.splits, g.C, gsp, gbp, sms, stream);
  });
}

}  // namespace

namespace bn_act_cuda {

void input_grad(const at::Tensor& gy, const at::Tensor& gsum, const at::Tensor& gsq,
                const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                const at::Tensor& y, const at::Tensor& weight, int64_t act, at::Tensor& gz,
                at::Tensor& gscale, at::Tensor& gshift, const DwGeometry& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, z.scalar_type(),
      "bn_act_dwconv2d_backward", [&] {
        launch_input_grad(make_bn_act_loads<scalar_t>(gy, gsum, gsq, z, scale, shift, y, act),
                          weight, gz, gscale, gshift, g);
      });
}

}  // namespace bn_act_cuda
}  // namespace bsnas
