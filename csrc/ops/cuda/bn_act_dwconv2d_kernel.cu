// CUDA kernels of the fused bsnas::bn_act_dwconv2d and its backward,
// float32/float64/float16/bfloat16, NCHW and channels_last, float (double for float64)
// arithmetic and accumulation:
//
//   forward:  a = act(z * scale + shift) applied as z is read, y = depthwise conv of a
//             with weight[:width], and the per-channel sum and sum of squares of y (as
//             stored, i.e. rounded to its dtype), all in one kernel;
//   backward: with gyt = grad_y + grad_sum[c] + 2 * y * grad_sumsq[c] formed where read,
//             grad_weight = the depthwise weight-gradient reduction of gyt against a
//             (read from z through BN + act), and in one gather kernel grad_a at each
//             input position, gu = grad_a * act'(u), grad_z = gu * scale[c] and the
//             per-channel grad_shift = sum(gu), grad_scale = sum(gu * z).
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
// masked_dwconv2d_kernel.cu. k = 3, 5, 7 are compile-time (unrolled taps in registers),
// other odd k take the runtime-k kernels; int64 indices for tensors past int32.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "dwconv_cuda.cuh"

namespace bsnas {
namespace {

constexpr const char* kFwd = "bn_act_dwconv2d";
constexpr const char* kBwd = "bn_act_dwconv2d_backward";

// ------------------------------------------------------------------------ forward

// One output value of channel `ch`: sum over taps of w * a(z[n, c, ih, iw]); `xb` is the
// flat index of (n, c, 0, 0) and (sh, sw) the element strides of a row and a column.
template <int KS, typename index_t, typename In, typename acc_t>
__device__ __forceinline__ acc_t conv_at(const In& in, const typename In::Chan& ch,
                                         const acc_t* wr, const typename In::scalar* wp,
                                         const Dims<index_t>& d, index_t xb, index_t sh,
                                         index_t sw, index_t ih0, index_t iw0) {
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  acc_t s = 0;
#pragma unroll
  for (index_t kh = 0; kh < K; ++kh) {
    const index_t ih = ih0 + kh * d.dil;
    if (!in_range(ih, d.H)) continue;
    const index_t xr = xb + ih * sh;
#pragma unroll
    for (index_t kw = 0; kw < K; ++kw) {
      const index_t iw = iw0 + kw * d.dil;
      if (!in_range(iw, d.W)) continue;
      acc_t wv;
      if constexpr (KS > 0) wv = wr[kh * KS + kw];
      else wv = static_cast<acc_t>(wp[kh * K + kw]);
      s += wv * in.x(ch, xr + iw * sw);
    }
  }
  return s;
}

// Block (kThreads): channel blockIdx.x, output positions [q0, q1) of N*Ho*Wo, chunk
// blockIdx.y.
template <typename scalar_t, typename index_t, int KS>
__global__ void __launch_bounds__(kThreads)
    bnact_fwd_nchw(const BnActInput<scalar_t> in, const scalar_t* __restrict__ w,
                   scalar_t* __restrict__ y, scalar_t* __restrict__ sum,
                   scalar_t* __restrict__ sumsq, at::opmath_type<scalar_t>* __restrict__ part,
                   const Dims<index_t> d, const index_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kR = KS > 0 ? KS * KS : 1;
  __shared__ acc_t red[2 * kWarps];
  const index_t c = blockIdx.x;
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  const index_t HoWo = d.Ho * d.Wo, HW = d.H * d.W;
  const index_t M = d.N * HoWo;
  const index_t q0 = index_t(blockIdx.y) * chunk;
  const index_t q1 = q0 + (chunk < M - q0 ? chunk : M - q0);
  const auto ch = in.channel(c);
  const scalar_t* wp = w + c * K * K;
  acc_t wr[kR];
  if constexpr (KS > 0) {
#pragma unroll
    for (int t = 0; t < kR; ++t) wr[t] = static_cast<acc_t>(wp[t]);
  }
  acc_t s1 = 0, s2 = 0;
  for (index_t q = q0 + threadIdx.x; q < q1; q += blockDim.x) {
    const index_t n = q / HoWo;
    const index_t r = q - n * HoWo;
    const index_t oh = r / d.Wo, ow = r - oh * d.Wo;
    const index_t nc = n * d.C + c;
    const acc_t s = conv_at<KS>(in, ch, wr, wp, d, nc * HW, d.W, index_t(1),
                                oh * d.stride - d.pad, ow * d.stride - d.pad);
    const scalar_t v = static_cast<scalar_t>(s);
    y[nc * HoWo + r] = v;
    const acc_t f = static_cast<acc_t>(v);
    s1 += f;
    s2 += f * f;
  }
  block_sum2(s1, s2, red);
  if (threadIdx.x == 0) store_pair(sum, sumsq, part, blockIdx.y, d.C, c, s1, s2);
}

// Block (ct channels) x (py pixel lanes): channel tile blockIdx.x, output pixels
// [p0, p1) of N*Ho*Wo, chunk blockIdx.y.
template <typename scalar_t, typename index_t, int KS>
__global__ void __launch_bounds__(kTileThreads)
    bnact_fwd_nhwc(const BnActInput<scalar_t> in, const scalar_t* __restrict__ w,
                   scalar_t* __restrict__ y, scalar_t* __restrict__ sum,
                   scalar_t* __restrict__ sumsq, at::opmath_type<scalar_t>* __restrict__ part,
                   const Dims<index_t> d, const index_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kR = KS > 0 ? KS * KS : 1;
  __shared__ acc_t red[2 * kTileThreads];
  const index_t c = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = c < d.C;
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  const index_t P = d.N * d.Ho * d.Wo;
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
  acc_t s1 = 0, s2 = 0;
  if (active) {
    for (index_t p = p0 + threadIdx.y; p < p1; p += blockDim.y) {
      const index_t ow = p % d.Wo;
      const index_t t = p / d.Wo;
      const index_t oh = t % d.Ho, n = t / d.Ho;
      const acc_t s = conv_at<KS>(in, ch, wr, wp, d, n * HWC + c, WC, d.C,
                                  oh * d.stride - d.pad, ow * d.stride - d.pad);
      const scalar_t v = static_cast<scalar_t>(s);
      y[p * d.C + c] = v;
      const acc_t f = static_cast<acc_t>(v);
      s1 += f;
      s2 += f * f;
    }
  }
  tile_sum2(s1, s2, red);
  if (threadIdx.y == 0 && active) store_pair(sum, sumsq, part, blockIdx.y, d.C, c, s1, s2);
}

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

// Block (kThreads): channel blockIdx.x, input positions [q0, q1) of N*H*W, chunk
// blockIdx.y. grad_scale -> out0 / partial 0, grad_shift -> out1 / partial 1.
template <typename scalar_t, typename index_t, int KS, int ST>
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
  const index_t M = d.N * HW;
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
    const index_t n = q / HW;
    const index_t r = q - n * HW;
    const index_t ih = r / d.W, iw = r - ih * d.W;
    const index_t nc = n * d.C + c;
    const index_t zi = nc * HW + r;
    const acc_t zv = static_cast<acc_t>(ld.in.z[zi]);
    acc_t gu = 0;
    if (act_passes(bn_affine(zv, ch.in.scale, ch.in.shift), ld.in.act))
      gu = gather_at<KS, ST>(ld, ch, wr, wp, d, nc * HoWo, d.Wo, index_t(1), ih, iw);
    gz[zi] = static_cast<scalar_t>(gu * ch.in.scale);
    s_scale += gu * zv;
    s_shift += gu;
  }
  block_sum2(s_scale, s_shift, red);
  if (threadIdx.x == 0) store_pair(gscale, gshift, part, blockIdx.y, d.C, c, s_scale, s_shift);
}

// Block (ct channels) x (py pixel lanes): channel tile blockIdx.x, input pixels
// [p0, p1) of N*H*W, chunk blockIdx.y.
template <typename scalar_t, typename index_t, int KS, int ST>
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
  const index_t P = d.N * d.H * d.W;
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
      const index_t iw = p % d.W;
      const index_t t = p / d.W;
      const index_t ih = t % d.H, n = t / d.H;
      const index_t zi = p * d.C + c;
      const acc_t zv = static_cast<acc_t>(ld.in.z[zi]);
      acc_t gu = 0;
      if (act_passes(bn_affine(zv, ch.in.scale, ch.in.shift), ld.in.act))
        gu = gather_at<KS, ST>(ld, ch, wr, wp, d, n * HoWoC + c, WoC, d.C, ih, iw);
      gz[zi] = static_cast<scalar_t>(gu * ch.in.scale);
      s_scale += gu * zv;
      s_shift += gu;
    }
  }
  tile_sum2(s_scale, s_shift, red);
  if (threadIdx.y == 0 && active)
    store_pair(gscale, gshift, part, blockIdx.y, d.C, c, s_scale, s_shift);
}

// ------------------------------------------------------------------------------ host

template <typename acc_t>
at::Tensor partial_buffer(const at::Tensor& like, int64_t splits, int64_t rows, int64_t L) {
  return at::empty({splits, rows, L}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

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
  scalar_t* sump = sum.mutable_data_ptr<scalar_t>();
  scalar_t* sqp = sumsq.mutable_data_ptr<scalar_t>();
  const int64_t M = g.N * g.Ho * g.Wo;
  const Tile tile = g.channels_last ? channel_tile(g.C) : Tile{0, 0, 0};
  const Split sp = g.channels_last ? split_positions(M, tile.tiles, tile.py, sms)
                                   : split_positions(M, g.C, kThreads, sms);
  const int64_t splits = sp.splits, chunk = sp.chunk;
  at::Tensor part;
  acc_t* partp = nullptr;
  if (splits > 1) {
    part = partial_buffer<acc_t>(z, splits, 2, g.C);
    partp = part.mutable_data_ptr<acc_t>();
  }
  dispatch_index_k(g, weight.numel(), [&]<typename index_t, int KS>() {
    const Dims<index_t> d = make_dims<index_t>(g);
    if (g.channels_last) {
      const dim3 grid(static_cast<unsigned>(tile.tiles), static_cast<unsigned>(splits));
      bnact_fwd_nhwc<scalar_t, index_t, KS><<<grid, dim3(tile.ct, tile.py), 0, stream>>>(
          in, wp, yp, sump, sqp, partp, d, static_cast<index_t>(chunk));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const dim3 grid(static_cast<unsigned>(g.C), static_cast<unsigned>(splits));
      bnact_fwd_nchw<scalar_t, index_t, KS><<<grid, kThreads, 0, stream>>>(
          in, wp, yp, sump, sqp, partp, d, static_cast<index_t>(chunk));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (splits > 1) launch_sum_splits<scalar_t, acc_t>(partp, splits, g.C, sump, sqp, sms, stream);
}

template <typename scalar_t>
void launch_backward(const at::Tensor& gy, const at::Tensor& gsum, const at::Tensor& gsq,
                     const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                     const at::Tensor& weight, const at::Tensor& y, int64_t act,
                     at::Tensor& gz, at::Tensor& gscale, at::Tensor& gshift, at::Tensor& gw,
                     const DwGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(z.get_device());
  const BnActLoads<scalar_t> ld{
      {z.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
       shift.const_data_ptr<scalar_t>(), static_cast<int>(act)},
      gy.const_data_ptr<scalar_t>(),
      y.const_data_ptr<scalar_t>(),
      gsum.const_data_ptr<scalar_t>(),
      gsq.const_data_ptr<scalar_t>()};
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  scalar_t* gzp = gz.mutable_data_ptr<scalar_t>();
  scalar_t* gsp = gscale.mutable_data_ptr<scalar_t>();
  scalar_t* gbp = gshift.mutable_data_ptr<scalar_t>();
  scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
  const int64_t KK = g.K * g.K;
  // The weight gradient reduces over the N*Ho*Wo outputs, grad_scale / grad_shift over
  // the N*H*W inputs of each channel.
  const int64_t Mw = g.N * g.Ho * g.Wo, Mi = g.N * g.H * g.W;
  const Tile tile = g.channels_last ? channel_tile(g.C) : Tile{0, 0, 0};
  const int64_t groups = g.channels_last ? tile.tiles : g.C;
  const int64_t threads = g.channels_last ? tile.py : kThreads;
  const Split sw = split_positions(Mw, groups, threads, sms);
  const Split si = split_positions(Mi, groups, threads, sms);
  at::Tensor part_w, part_i;
  acc_t* pwp = nullptr;
  acc_t* pip = nullptr;
  if (sw.splits > 1) {
    part_w = partial_buffer<acc_t>(z, sw.splits, g.C, KK);
    pwp = part_w.mutable_data_ptr<acc_t>();
  }
  if (si.splits > 1) {
    part_i = partial_buffer<acc_t>(z, si.splits, 2, g.C);
    pip = part_i.mutable_data_ptr<acc_t>();
  }
  dispatch_index_k(g, weight.numel(), [&]<typename index_t, int KS>() {
    const Dims<index_t> d = make_dims<index_t>(g);
    // grad_weight
    if (g.channels_last) {
      const dim3 grid(static_cast<unsigned>(tile.tiles), static_cast<unsigned>(sw.splits));
      dw_bwd_w_nhwc<scalar_t, index_t, KS><<<grid, dim3(tile.ct, tile.py), 0, stream>>>(
          ld, gwp, pwp, d, static_cast<index_t>(sw.chunk));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const dim3 grid(static_cast<unsigned>(g.C), static_cast<unsigned>(sw.splits));
      dw_bwd_w_nchw<scalar_t, index_t, KS><<<grid, kThreads, 0, stream>>>(
          ld, gwp, pwp, d, static_cast<index_t>(sw.chunk));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // grad_z, grad_scale, grad_shift
    dispatch_stride<index_t, KS>(g.stride, [&]<int ST>() {
      if (g.channels_last) {
        const dim3 grid(static_cast<unsigned>(tile.tiles), static_cast<unsigned>(si.splits));
        bnact_bwd_in_nhwc<scalar_t, index_t, KS, ST>
            <<<grid, dim3(tile.ct, tile.py), 0, stream>>>(ld, wp, gzp, gsp, gbp, pip, d,
                                                          static_cast<index_t>(si.chunk));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const dim3 grid(static_cast<unsigned>(g.C), static_cast<unsigned>(si.splits));
        bnact_bwd_in_nchw<scalar_t, index_t, KS, ST><<<grid, kThreads, 0, stream>>>(
            ld, wp, gzp, gsp, gbp, pip, d, static_cast<index_t>(si.chunk));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  // Rows [0, width) of the full-width weight gradient (rows past `width` stay zero).
  if (sw.splits > 1)
    launch_sum_splits<scalar_t, acc_t>(pwp, sw.splits, g.C * KK, gwp, nullptr, sms, stream);
  if (si.splits > 1)
    launch_sum_splits<scalar_t, acc_t>(pip, si.splits, g.C, gsp, gbp, sms, stream);
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
  at::Tensor sum = at::empty({g.C}, z.options()), sumsq = at::empty({g.C}, z.options());
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
  const at::Tensor gsum = grad_sum.contiguous(), gsq = grad_sumsq.contiguous();
  at::Tensor gz = at::empty_like(z, z.options().memory_format(fmt));
  at::Tensor gscale = at::empty({g.C}, z.options()), gshift = at::empty({g.C}, z.options());
  // Full-width gradient; rows past `width` stay zero.
  at::Tensor gw = at::zeros(weight.sizes(), weight.options());
  if (z.numel() == 0) {  // a is all padding: every gradient is zero (or empty)
    gscale.zero_();
    gshift.zero_();
    return {gz, gscale, gshift, gw};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  z.scalar_type(), kBwd, [&] {
                                    launch_backward<scalar_t>(gy, gsum, gsq, z, scale, shift,
                                                              weight, y, act, gz, gscale,
                                                              gshift, gw, g);
                                  });
  return {gz, gscale, gshift, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, CUDA, m) {
  m.impl("bn_act_dwconv2d", &forward_cuda);
  m.impl("_bn_act_dwconv2d_backward", &backward_cuda);
}

}  // namespace bsnas
