// Device and host helpers shared by the CUDA depthwise kernels: bsnas::masked_dwconv2d
// (masked_dwconv2d_kernel.cu), the fused bsnas::bn_act_dwconv2d
// (bn_act_dwconv2d_kernel.cu, bn_act_dwconv2d_wgrad_kernel.cu, bn_act_dwconv2d_igrad_kernel.cu) and the
// folded block's depthwise stage (mbconv_folded_kernel.cu).
// Everything here has internal linkage (an unnamed namespace), so each translation unit
// gets its own copies of the kernels it uses.
//
// Conventions (see masked_dwconv2d_kernel.cu for the full description):
// - NCHW flat kernels: one thread per element in a grid-stride loop; NCHW reductions:
//   one block of kThreads per (channel, chunk of positions);
// - channels_last kernels are channel-tiled: threadIdx.x is the channel inside a tile of
//   at most kMaxTileC channels, threadIdx.y (and blockIdx.y) stride over pixels;
// - per-channel reductions are deterministic: fixed-order block reductions, and when the
//   positions are split over gridDim.y, per-split partials in a small buffer summed in
//   split order by sum_splits (no atomics);
// - kernel size k = 3, 5, 7 is a template parameter (KS; 0 = runtime k), indices are
//   int32 when everything fits, int64 otherwise (runtime-k kernels only);
// - the weight-gradient kernels read their operands through a loading policy
//   (PlainLoads: as stored; BnActLoads: the fused op's gyt and act(z * scale + shift)),
//   and optionally in strips of kStrip outputs (ST > 0).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../masked_conv_common.h"
#include "cuda_util.cuh"

namespace bsnas {
namespace {

constexpr int kThreads = 256;            // flat kernels and the NCHW reductions
constexpr int kWarps = kThreads / 32;
constexpr int kTileThreads = 256;        // channel-tiled (channels_last) kernels, at most
constexpr int64_t kMaxTileC = 64;        // channels per tile, at most
constexpr int kRedBytes = 16 * 1024;     // shared memory of the channels_last reduction

template <typename index_t>
struct Dims {
  index_t N, C, H, W, Ho, Wo, K, stride, pad, dil;
};

template <typename index_t>
Dims<index_t> make_dims(const DwGeometry& g) {
  Dims<index_t> d;
  d.N = static_cast<index_t>(g.N);
  d.C = static_cast<index_t>(g.C);
  d.H = static_cast<index_t>(g.H);
  d.W = static_cast<index_t>(g.W);
  d.Ho = static_cast<index_t>(g.Ho);
  d.Wo = static_cast<index_t>(g.Wo);
  d.K = static_cast<index_t>(g.K);
  d.stride = static_cast<index_t>(g.stride);
  d.pad = static_cast<index_t>(g.pad);
  d.dil = static_cast<index_t>(g.dil);
  return d;
}

// 0 <= v < n with one unsigned comparison.
template <typename index_t>
__device__ __forceinline__ bool in_range(index_t v, index_t n) {
  using U = std::make_unsigned_t<index_t>;
  return static_cast<U>(v) < static_cast<U>(n);
}

// out_index_for_input (masked_conv_common.h): the output index that reads input `i`
// through tap offset `off`, or -1. The int64, runtime-stride case calls the shared
// helper itself; the int32 kernels use the same arithmetic in 32 bits, with the stride a
// compile-time constant when ST > 0 so the division folds away.
template <int ST, typename index_t>
__device__ __forceinline__ index_t gather_index(index_t i, index_t off, index_t stride,
                                                index_t out) {
  if constexpr (std::is_same_v<index_t, int64_t> && ST == 0) {
    return out_index_for_input(i, off, stride, out);
  } else {
    index_t t = i - off;
    if (t < 0) return -1;
    if constexpr (ST != 1) {
      const index_t s = ST > 0 ? index_t(ST) : stride;
      if (t % s != 0) return -1;
      t /= s;
    }
    return t < out ? t : -1;
  }
}

// ----------------------------------------------------------- operand loading policies

// How the weight-gradient kernels read their two operands at flat indices: `g(ch, i)`
// the upstream gradient at output element i, `x(ch, i)` the convolution input at input
// element i; `channel(c)` loads whatever per-channel values they need once.

// bsnas::masked_dwconv2d: both as stored.
template <typename scalar_t>
struct PlainLoads {
  using scalar = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  struct Chan {};
  const scalar_t* __restrict__ gy;
  const scalar_t* __restrict__ xv;
  template <typename index_t>
  __device__ __forceinline__ Chan channel(index_t) const { return {}; }
  template <typename index_t>
  __device__ __forceinline__ acc_t g(const Chan&, index_t i) const {
    return static_cast<acc_t>(gy[i]);
  }
  template <typename index_t>
  __device__ __forceinline__ acc_t x(const Chan&, index_t i) const {
    return static_cast<acc_t>(xv[i]);
  }
};

// bsnas::bn_act_dwconv2d's convolution input a = act(z * scale + shift), read from z.
template <typename scalar_t>
struct BnActInput {
  using scalar = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  struct Chan {
    acc_t scale, shift;
  };
  const scalar_t* __restrict__ z;
  const scalar_t* __restrict__ scale;
  const scalar_t* __restrict__ shift;
  int act;
  template <typename index_t>
  __device__ __forceinline__ Chan channel(index_t c) const {
    return {static_cast<acc_t>(scale[c]), static_cast<acc_t>(shift[c])};
  }
  // u = z * scale + shift at input element i.
  template <typename index_t>
  __device__ __forceinline__ acc_t u(const Chan& ch, index_t i) const {
    return bn_affine(static_cast<acc_t>(z[i]), ch.scale, ch.shift);
  }
  template <typename index_t>
  __device__ __forceinline__ acc_t x(const Chan& ch, index_t i) const {
    return activate(u(ch, i), act);
  }
};

// bsnas::_mbconv_folded_depthwise's convolution input act(z + bias[c]) (BN folded into
// the expand weights), read from z.
template <typename scalar_t>
struct BiasActInput {
  using scalar = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  struct Chan {
    acc_t bias;
  };
  const scalar_t* __restrict__ z;
  const scalar_t* __restrict__ bias;
  int act;
  template <typename index_t>
  __device__ __forceinline__ Chan channel(index_t c) const {
    return {static_cast<acc_t>(bias[c])};
  }
  template <typename index_t>
  __device__ __forceinline__ acc_t x(const Chan& ch, index_t i) const {
    return activate(static_cast<acc_t>(z[i]) + ch.bias, act);
  }
};

// bsnas::bn_act_dwconv2d's backward: the upstream gradient of y including the statistics
// outputs, grad_y + grad_sum[c] + 2 * y * grad_sumsq[c] (y is not read where
// grad_sumsq[c] == 0), and the input through BnActInput.
template <typename scalar_t>
struct BnActLoads {
  using scalar = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  struct Chan {
    acc_t gsum, gsq2;
    typename BnActInput<scalar_t>::Chan in;
  };
  BnActInput<scalar_t> in;
  const scalar_t* __restrict__ gy;
  const scalar_t* __restrict__ y;
  const double* __restrict__ grad_sum;  // float64, as the op's statistics
  const double* __restrict__ grad_sumsq;
  template <typename index_t>
  __device__ __forceinline__ Chan channel(index_t c) const {
    return {static_cast<acc_t>(grad_sum[c]), acc_t(2) * static_cast<acc_t>(grad_sumsq[c]),
            in.channel(c)};
  }
  template <typename index_t>
  __device__ __forceinline__ acc_t g(const Chan& ch, index_t i) const {
    acc_t v = static_cast<acc_t>(gy[i]) + ch.gsum;
    if (ch.gsq2 != acc_t(0)) v += ch.gsq2 * static_cast<acc_t>(y[i]);
    return v;
  }
  template <typename index_t>
  __device__ __forceinline__ acc_t x(const Chan& ch, index_t i) const {
    return in.x(ch.in, i);
  }
};

// ------------------------------------------------------------------------- strips

// Outputs per thread along a row in the strip kernels: for a fixed k, stride ST and
// dilation 1, a thread handles kStrip consecutive outputs of a row, so each input row's
// span of (kStrip - 1) * ST + k values is read (and transformed) once into registers and
// feeds k taps of every output, instead of one read per (output, tap).
constexpr int kStrip = 4;

constexpr int strip_span(int KS, int ST) { return (kStrip - 1) * ST + KS; }

// Positions along a row of Wo outputs: the outputs, or strips of kStrip when ST > 0.
template <int ST, typename index_t>
__host__ __device__ __forceinline__ index_t row_positions(index_t Wo) {
  return ST > 0 ? (Wo + kStrip - 1) / kStrip : Wo;
}

// xs[t] = ld.x(input row xr, column iw0 + t) for t < strip_span(KS, ST), 0 for columns
// outside [0, W); `sw` is the element stride of a column.
template <int KS, int ST, typename index_t, typename Loads, typename acc_t>
__device__ __forceinline__ void load_span(const Loads& ld, const typename Loads::Chan& ch,
                                          const Dims<index_t>& d, index_t xr, index_t sw,
                                          index_t iw0, acc_t (&xs)[strip_span(KS, ST)]) {
#pragma unroll
  for (int t = 0; t < strip_span(KS, ST); ++t) {
    const index_t iw = iw0 + t;
    xs[t] = in_range(iw, d.W) ? ld.x(ch, xr + iw * sw) : acc_t(0);
  }
}

// One output value of channel `ch`: sum over taps of w * in.x(z[n, c, ih, iw]) (the input
// read through a loading policy: BnActInput, BiasActInput); `xb` is the flat index of
// (n, c, 0, 0) and (sh, sw) the element strides of a row and a column. `wr`: the taps in
// registers (fixed k), `wp`: in memory (runtime k).
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

// kStrip consecutive outputs (ow0 .. ow0 + kStrip - 1) of one output row, for a fixed
// k = KS, stride ST and dilation 1: each input row's span of (kStrip - 1) * ST + KS
// values is read and put through the input transform once into registers, then feeds
// KS taps of every output (conv_at does KS * KS reads and transforms per output). The sum
// of each output runs over the taps in the same order as conv_at. Columns outside [0, W)
// read as 0; outputs past the row's end are computed but not stored by the caller.
template <int KS, int ST, typename index_t, typename In, typename acc_t>
__device__ __forceinline__ void conv_strip(const In& in, const typename In::Chan& ch,
                                           const acc_t* wr, const Dims<index_t>& d,
                                           index_t xb, index_t sh, index_t sw, index_t ih0,
                                           index_t iw0, acc_t (&out)[kStrip]) {
#pragma unroll
  for (int j = 0; j < kStrip; ++j) out[j] = 0;
#pragma unroll
  for (int kh = 0; kh < KS; ++kh) {
    const index_t ih = ih0 + kh;
    if (!in_range(ih, d.H)) continue;
    acc_t xs[strip_span(KS, ST)];
    load_span<KS, ST>(in, ch, d, xb + ih * sh, sw, iw0, xs);
#pragma unroll
    for (int j = 0; j < kStrip; ++j) {
#pragma unroll
      for (int kw = 0; kw < KS; ++kw) out[j] += wr[kh * KS + kw] * xs[j * ST + kw];
    }
  }
}

template <typename scalar_t>
BnActLoads<scalar_t> make_bn_act_loads(const at::Tensor& gy, const at::Tensor& gsum,
                                       const at::Tensor& gsq, const at::Tensor& z,
                                       const at::Tensor& scale, const at::Tensor& shift,
                                       const at::Tensor& y, int64_t act) {
  return {{z.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
           shift.const_data_ptr<scalar_t>(), static_cast<int>(act)},
          gy.const_data_ptr<scalar_t>(),
          y.const_data_ptr<scalar_t>(),
          gsum.const_data_ptr<double>(),
          gsq.const_data_ptr<double>()};
}

// ------------------------------------------------------------------ block reductions

// Sums of a and b over a block of kThreads threads (1-D), valid in thread 0. `red`
// holds 2 * kWarps values; no thread may touch it again before a barrier.
template <typename acc_t>
__device__ __forceinline__ void block_sum2(acc_t& a, acc_t& b, acc_t* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, o);
    b += __shfl_down_sync(0xffffffffu, b, o);
  }
  if (lane == 0) {
    red[warp] = a;
    red[kWarps + warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = b = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      a += red[w];
      b += red[kWarps + w];
    }
  }
}

// channels_last blocks (ct channels x py pixel lanes): sums of a and b over the py lanes
// of each channel, valid in the threads with threadIdx.y == 0. `red` holds 2 *
// kTileThreads values.
template <typename acc_t>
__device__ __forceinline__ void tile_sum2(acc_t& a, acc_t& b, acc_t* red) {
  const int ct = blockDim.x, nthreads = blockDim.x * blockDim.y;
  const int tid = threadIdx.y * ct + threadIdx.x;
  red[tid] = a;
  red[nthreads + tid] = b;
  __syncthreads();
  if (threadIdx.y == 0) {
    a = b = 0;
    for (int ty = 0; ty < int(blockDim.y); ++ty) {
      a += red[ty * ct + threadIdx.x];
      b += red[nthreads + ty * ct + threadIdx.x];
    }
  }
}

// Stores the two per-channel sums (v0, v1) of one block: into out0/out1 (their dtype)
// when the positions were not split, else into the [splits, 2, C] partial buffer that
// sum_splits reduces.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_pair(scalar_t* out0, scalar_t* out1, acc_t* part,
                                           int64_t split, int64_t C, int64_t c, acc_t v0,
                                           acc_t v1) {
  if (part != nullptr) {
    part[(split * 2) * C + c] = v0;
    part[(split * 2 + 1) * C + c] = v1;
  } else {
    out0[c] = static_cast<scalar_t>(v0);
    out1[c] = static_cast<scalar_t>(v1);
  }
}

// out_j[l] = sum over s of part[(s * nout + j) * L + l], s in order (j < nout, nout = 1
// when out1 is null, else 2).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_splits(const acc_t* __restrict__ part, int64_t splits, int64_t L,
               scalar_t* __restrict__ out0, scalar_t* __restrict__ out1) {
  const int64_t nout = out1 != nullptr ? 2 : 1;
  const int64_t step = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nout * L; i += step) {
    const int64_t j = i / L, l = i - j * L;
    acc_t v = 0;
    for (int64_t s = 0; s < splits; ++s) v += part[(s * nout + j) * L + l];
    (j == 0 ? out0 : out1)[l] = static_cast<scalar_t>(v);
  }
}

// ------------------------------------------------------------------ grad weight (reduce)

// One output position's contribution g * x(ih0 + kh * dil, iw0 + kw * dil) to every tap
// (fixed k: acc[kh * KS + kw]) or to the tap (ph, pw) of this pass (runtime k: acc[0]).
template <int KS, typename index_t, typename Loads, typename acc_t>
__device__ __forceinline__ void point_weight_grad(const Loads& ld,
                                                  const typename Loads::Chan& ch,
                                                  const Dims<index_t>& d, acc_t g,
                                                  index_t xb, index_t sh, index_t sw,
                                                  index_t ih0, index_t iw0, index_t ph,
                                                  index_t pw, acc_t* acc) {
  if constexpr (KS > 0) {
#pragma unroll
    for (int kh = 0; kh < KS; ++kh) {
      const index_t ih = ih0 + kh * d.dil;
      if (!in_range(ih, d.H)) continue;
      const index_t xr = xb + ih * sh;
#pragma unroll
      for (int kw = 0; kw < KS; ++kw) {
        const index_t iw = iw0 + kw * d.dil;
        if (in_range(iw, d.W)) acc[kh * KS + kw] += g * ld.x(ch, xr + iw * sw);
      }
    }
  } else {
    const index_t ih = ih0 + ph * d.dil, iw = iw0 + pw * d.dil;
    if (in_range(ih, d.H) && in_range(iw, d.W)) acc[0] += g * ld.x(ch, xb + ih * sh + iw * sw);
  }
}

// acc[kh * KS + kw] += sum over the outputs j < nv (<= kStrip: those before the row's
// end) of a strip of gv[j] * x(ih0 + kh, iw0 + j * ST + kw) (fixed k, stride ST,
// dilation 1). Outputs past the row's end are skipped, not multiplied by a zero
// gradient: 0 * x is NaN where x is NaN or Inf. `xb` is the flat index of the input's
// (n, c, 0, 0), (sh, sw) the element strides of an input row and column.
template <int KS, int ST, typename index_t, typename Loads, typename acc_t>
__device__ __forceinline__ void strip_weight_grad(const Loads& ld,
                                                  const typename Loads::Chan& ch,
                                                  const Dims<index_t>& d,
                                                  const acc_t (&gv)[kStrip], index_t nv,
                                                  index_t xb, index_t sh, index_t sw,
                                                  index_t ih0, index_t iw0,
                                                  acc_t (&acc)[KS * KS]) {
#pragma unroll
  for (int kh = 0; kh < KS; ++kh) {
    const index_t ih = ih0 + kh;
    if (!in_range(ih, d.H)) continue;
    acc_t xs[strip_span(KS, ST)];
    load_span<KS, ST>(ld, ch, d, xb + ih * sh, sw, iw0, xs);
#pragma unroll
    for (int kw = 0; kw < KS; ++kw) {
      acc_t s = 0;
#pragma unroll
      for (int j = 0; j < kStrip; ++j)
        if (j < nv) s += gv[j] * xs[j * ST + kw];
      acc[kh * KS + kw] += s;
    }
  }
}

// Stores one reduced (channel, tap) value: into grad_weight (its dtype) when the
// positions were not split, else into the [splits, width, k*k] partial buffer.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_gw(scalar_t* gw, acc_t* part, int64_t split,
                                         int64_t C, int64_t KK, int64_t c, int64_t tap,
                                         acc_t v) {
  if (part != nullptr) part[(split * C + c) * KK + tap] = v;
  else gw[c * KK + tap] = static_cast<scalar_t>(v);
}

// gw[c, kh, kw] = sum over n, oh, ow of g[n, c, oh, ow] * x[n, c, ih, iw], the operands
// read through `Loads` (PlainLoads, BnActLoads).
// Block (kThreads threads): channel blockIdx.x, positions [q0, q1) of N*Ho*Wo (or of
// N*Ho*strips when ST > 0: fixed k, stride ST, dilation 1), chunk blockIdx.y. Fixed-K:
// all taps accumulate in registers in one pass; runtime-K: one pass (and one block
// reduction) per tap.
template <typename scalar_t, typename index_t, int KS, typename Loads, int ST = 0>
__global__ void __launch_bounds__(kThreads)
    dw_bwd_w_nchw(const Loads ld, scalar_t* __restrict__ gw,
                  at::opmath_type<scalar_t>* __restrict__ part, const Dims<index_t> d,
                  const index_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kR = KS > 0 ? KS * KS : 1;
  __shared__ acc_t red[kR * kWarps];
  const index_t c = blockIdx.x;
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  const index_t KK = K * K;
  const index_t HoWo = d.Ho * d.Wo, HW = d.H * d.W;
  const index_t Wq = row_positions<ST>(d.Wo), HoWq = d.Ho * Wq;
  const index_t M = d.N * HoWq;
  const index_t q0 = index_t(blockIdx.y) * chunk;
  const index_t q1 = q0 + (chunk < M - q0 ? chunk : M - q0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const auto ch = ld.channel(c);
  const index_t passes = KS > 0 ? 1 : KK;
  for (index_t pass = 0; pass < passes; ++pass) {
    acc_t acc[kR];
#pragma unroll
    for (int r = 0; r < kR; ++r) acc[r] = 0;
    index_t ph = 0, pw = 0;  // runtime-K: this pass's tap
    if constexpr (KS == 0) {
      ph = pass / K;
      pw = pass % K;
    }
    for (index_t q = q0 + threadIdx.x; q < q1; q += blockDim.x) {
      const index_t n = q / HoWq;
      const index_t r = q - n * HoWq;
      const index_t oh = r / Wq, oq = r - oh * Wq;
      const index_t nc = n * d.C + c;
      if constexpr (ST > 0) {
        static_assert(KS > 0, "strips need a fixed k");
        const index_t ow0 = oq * kStrip, gb = nc * HoWo + oh * d.Wo;
        acc_t gv[kStrip];
#pragma unroll
        for (int j = 0; j < kStrip; ++j) gv[j] = ow0 + j < d.Wo ? ld.g(ch, gb + ow0 + j) : acc_t(0);
        strip_weight_grad<KS, ST>(ld, ch, d, gv, d.Wo - ow0, nc * HW, d.W, index_t(1),
                                  oh * ST - d.pad, ow0 * ST - d.pad, acc);
      } else {
        point_weight_grad<KS>(ld, ch, d, ld.g(ch, nc * HoWo + r), nc * HW, d.W, index_t(1),
                              oh * d.stride - d.pad, oq * d.stride - d.pad, ph, pw, acc);
      }
    }
    // Block reduction: warp shuffles, then one thread per tap sums the warps.
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      acc_t v = acc[r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
      if (lane == 0) red[r * kWarps + warp] = v;
    }
    __syncthreads();
    for (int r = threadIdx.x; r < kR; r += blockDim.x) {
      acc_t v = 0;
#pragma unroll
      for (int wi = 0; wi < kWarps; ++wi) v += red[r * kWarps + wi];
      store_gw(gw, part, blockIdx.y, d.C, KK, c, KS > 0 ? index_t(r) : pass, v);
    }
    __syncthreads();  // `red` is reused by the next pass
  }
}

// channels_last: block (ct channels) x (py pixel lanes); channel tile blockIdx.x,
// pixels [p0, p1) of N*Ho*Wo (or strips of N*Ho*strips, ST > 0), chunk blockIdx.y. Each
// thread accumulates its channel's taps over its pixels; the py partial sums of each
// (channel, tap) are then added in shared memory, G taps at a time.
template <typename scalar_t, typename index_t, int KS, typename Loads, int ST = 0>
__global__ void __launch_bounds__(kTileThreads)
    dw_bwd_w_nhwc(const Loads ld, scalar_t* __restrict__ gw,
                  at::opmath_type<scalar_t>* __restrict__ part, const Dims<index_t> d,
                  const index_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kR = KS > 0 ? KS * KS : 1;
  constexpr int kG0 = kRedBytes / (kTileThreads * int(sizeof(acc_t)));
  constexpr int kG = kR < kG0 ? kR : kG0;  // taps per shared-memory round
  __shared__ acc_t red[kG * kTileThreads];
  const int ct = blockDim.x, nthreads = blockDim.x * blockDim.y;
  const int tid = threadIdx.y * ct + threadIdx.x;
  const index_t c = index_t(blockIdx.x) * ct + threadIdx.x;
  const bool active = c < d.C;
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  const index_t KK = K * K;
  const index_t Wq = row_positions<ST>(d.Wo);
  const index_t P = d.N * d.Ho * Wq;
  const index_t WC = d.W * d.C, HWC = d.H * d.W * d.C;
  const index_t p0 = index_t(blockIdx.y) * chunk;
  const index_t p1 = p0 + (chunk < P - p0 ? chunk : P - p0);
  const auto ch = ld.channel(active ? c : index_t(0));
  const index_t passes = KS > 0 ? 1 : KK;
  for (index_t pass = 0; pass < passes; ++pass) {
    acc_t acc[kR];
#pragma unroll
    for (int r = 0; r < kR; ++r) acc[r] = 0;
    index_t ph = 0, pw = 0;
    if constexpr (KS == 0) {
      ph = pass / K;
      pw = pass % K;
    }
    if (active) {
      for (index_t p = p0 + threadIdx.y; p < p1; p += blockDim.y) {
        const index_t oq = p % Wq;
        const index_t t = p / Wq;  // n * Ho + oh
        const index_t oh = t % d.Ho, n = t / d.Ho;
        if constexpr (ST > 0) {
          static_assert(KS > 0, "strips need a fixed k");
          const index_t ow0 = oq * kStrip, gb = t * d.Wo * d.C + c;
          acc_t gv[kStrip];
#pragma unroll
          for (int j = 0; j < kStrip; ++j)
            gv[j] = ow0 + j < d.Wo ? ld.g(ch, gb + (ow0 + j) * d.C) : acc_t(0);
          strip_weight_grad<KS, ST>(ld, ch, d, gv, d.Wo - ow0, n * HWC + c, WC, d.C,
                                    oh * ST - d.pad, ow0 * ST - d.pad, acc);
        } else {
          point_weight_grad<KS>(ld, ch, d, ld.g(ch, p * d.C + c), n * HWC + c, WC, d.C,
                                oh * d.stride - d.pad, oq * d.stride - d.pad, ph, pw, acc);
        }
      }
    }
#pragma unroll
    for (int r0 = 0; r0 < kR; r0 += kG) {
#pragma unroll
      for (int j = 0; j < kG; ++j)
        if (r0 + j < kR) red[j * nthreads + tid] = acc[r0 + j];
      __syncthreads();
      for (int o = tid; o < kG * ct; o += nthreads) {
        const int j = o / ct, tx = o - j * ct;
        const index_t co = index_t(blockIdx.x) * ct + tx;
        if (r0 + j >= kR || co >= d.C) continue;
        acc_t v = 0;
        for (int ty = 0; ty < int(blockDim.y); ++ty) v += red[j * nthreads + ty * ct + tx];
        store_gw(gw, part, blockIdx.y, d.C, KK, co, KS > 0 ? index_t(r0 + j) : pass, v);
      }
      __syncthreads();
    }
  }
}

// ------------------------------------------------------------------------------ host

// Grid of a flat grid-stride kernel: enough blocks for a couple of waves, no more.
inline unsigned flat_blocks(int64_t total, int sms) {
  return static_cast<unsigned>(
      std::clamp<int64_t>(ceil_div(total, kThreads), 1, int64_t{sms} * 16));
}

// channels_last tile: `tiles` tiles of `ct` channels (as even as possible, <= 64), with
// `py` pixel lanes so a block has about kTileThreads threads.
struct Tile {
  int ct, py;
  int64_t tiles;
};

inline Tile channel_tile(int64_t C) {
  const int64_t tiles = ceil_div(C, kMaxTileC);
  const int ct = static_cast<int>(ceil_div(C, tiles));
  return {ct, std::max(1, kTileThreads / ct), tiles};
}

// gridDim.y of a channel-tiled grid-stride kernel over `pixels`.
inline unsigned tile_blocks_y(int64_t pixels, const Tile& t, int sms) {
  const int64_t want = std::max<int64_t>(1, int64_t{sms} * 16 / t.tiles);
  return static_cast<unsigned>(std::clamp<int64_t>(
      std::min(ceil_div(pixels, t.py), want), 1, 65535));
}

// How the M positions reduced per channel (tile) split over gridDim.y: enough blocks
// (`groups` channels or tiles along gridDim.x) to fill the device, at least 4
// positions per thread of a `threads`-thread block, no empty chunk.
struct Split {
  int64_t splits, chunk;
};

inline Split split_positions(int64_t M, int64_t groups, int64_t threads, int sms) {
  const int64_t want = ceil_div(int64_t{sms} * 8, groups);
  int64_t splits = std::clamp<int64_t>(std::min(want, M / (threads * 4)), 1, 65535);
  const int64_t chunk = ceil_div(std::max<int64_t>(M, 1), splits);
  splits = ceil_div(std::max<int64_t>(M, 1), chunk);
  return {splits, chunk};
}

// Whether every index the kernels form fits int32, with headroom for the grid-stride
// increments (< 2^25) and the split-chunk arithmetic.
inline bool fits_int32(const DwGeometry& g, int64_t weight_numel) {
  constexpr int64_t lim = std::numeric_limits<int32_t>::max() - (int64_t{1} << 26);
  const int64_t xs = g.N * g.C * g.H * g.W, ys = g.N * g.C * g.Ho * g.Wo;
  const int64_t span = std::max(g.H, g.W) + 2 * g.pad + g.dil * g.K + g.stride;
  return xs <= lim && ys <= lim && weight_numel <= lim && span <= (int64_t{1} << 29) &&
         g.stride <= (int64_t{1} << 29) && g.dil <= (int64_t{1} << 20);
}

// Calls fn.template operator()<index_t, KS>(): int32 indices with k = 3/5/7 fixed or
// runtime k, int64 indices with runtime k.
template <typename Fn>
void dispatch_index_k(const DwGeometry& g, int64_t weight_numel, const Fn& fn) {
  if (!fits_int32(g, weight_numel)) {
    fn.template operator()<int64_t, 0>();
    return;
  }
  switch (g.K) {
    case 3: fn.template operator()<int32_t, 3>(); break;
    case 5: fn.template operator()<int32_t, 5>(); break;
    case 7: fn.template operator()<int32_t, 7>(); break;
    default: fn.template operator()<int32_t, 0>(); break;
  }
}

// Stride 1 or 2 as a compile-time constant for the int32 fixed-k gather kernels.
template <typename index_t, int KS, typename Fn>
void dispatch_stride(int64_t stride, const Fn& fn) {
  if constexpr (std::is_same_v<index_t, int32_t> && KS > 0) {
    if (stride == 1) return fn.template operator()<1>();
    if (stride == 2) return fn.template operator()<2>();
  }
  fn.template operator()<0>();
}

// Whether dispatch_strips picks a strip variant (ST > 0) for this geometry.
inline bool uses_strips(const DwGeometry& g, int64_t weight_numel) {
  return fits_int32(g, weight_numel) && g.dil == 1 && (g.stride == 1 || g.stride == 2) &&
         (g.K == 3 || g.K == 5 || g.K == 7);
}

// The fused kernels' variants: strips (ST > 0, the hot path) for k = 3, 5, 7 with
// dilation 1 and stride ST = 1 or 2, int32 indices; otherwise the runtime-k, per-tap
// kernels (ST = 0), int32 or int64 indices. Calls fn.template operator()<index_t, KS,
// ST>().
template <typename Fn>
void dispatch_strips(const DwGeometry& g, int64_t weight_numel, const Fn& fn) {
  if (uses_strips(g, weight_numel)) {
    const auto by_stride = [&]<int KS>() {
      if (g.stride == 1) fn.template operator()<int32_t, KS, 1>();
      else fn.template operator()<int32_t, KS, 2>();
    };
    switch (g.K) {
      case 3: return by_stride.template operator()<3>();
      case 5: return by_stride.template operator()<5>();
      default: return by_stride.template operator()<7>();
    }
  }
  if (fits_int32(g, weight_numel)) fn.template operator()<int32_t, 0, 0>();
  else fn.template operator()<int64_t, 0, 0>();
}

// A [splits, rows, L] buffer of per-split partial sums in the accumulation type.
template <typename acc_t>
at::Tensor partial_buffer(const at::Tensor& like, int64_t splits, int64_t rows, int64_t L) {
  return at::empty({splits, rows, L},
                   like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// Launches sum_splits over a [splits, nout, L] partial buffer (nout = 2 when out1 is
// given).
template <typename scalar_t, typename acc_t>
void launch_sum_splits(const acc_t* part, int64_t splits, int64_t L, scalar_t* out0,
                       scalar_t* out1, int sms, cudaStream_t stream) {
  const int64_t total = (out1 != nullptr ? 2 : 1) * L;
  sum_splits<scalar_t, acc_t><<<flat_blocks(total, sms), kThreads, 0, stream>>>(
      part, splits, L, out0, out1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// grad_weight rows [0, width) of the depthwise convolution into the full-width `gwp`, its
// operands read through the loading policy `ld`: a reduction over the N*Ho*Wo outputs
// (or N*Ho*strips) of each channel, in strips (ST > 0) where dispatch_strips picks them
// and `strips` allows, per-tap reads otherwise. `like` gives the partials' device.
template <typename scalar_t, typename Loads>
void launch_weight_grad(const Loads& ld, scalar_t* gwp, const at::Tensor& like,
                        const DwGeometry& g, int64_t weight_numel, bool strips,
                        cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int sms = sm_count(like.get_device());
  const int64_t KK = g.K * g.K;
  const Tile tile = g.channels_last ? channel_tile(g.C) : Tile{0, 0, 0};
  at::Tensor part;
  const auto run = [&]<typename index_t, int KS, int ST>() {
    const int64_t M = g.N * g.Ho * row_positions<ST>(g.Wo);
    const Split sp = g.channels_last ? split_positions(M, tile.tiles, tile.py, sms)
                                     : split_positions(M, g.C, kThreads, sms);
    acc_t* partp = nullptr;
    if (sp.splits > 1) {
      part = partial_buffer<acc_t>(like, sp.splits, g.C, KK);
      partp = part.mutable_data_ptr<acc_t>();
    }
    const Dims<index_t> d = make_dims<index_t>(g);
    const auto chunk = static_cast<index_t>(sp.chunk);
    if (g.channels_last) {
      const dim3 grid(static_cast<unsigned>(tile.tiles), static_cast<unsigned>(sp.splits));
      dw_bwd_w_nhwc<scalar_t, index_t, KS, Loads, ST>
          <<<grid, dim3(tile.ct, tile.py), 0, stream>>>(ld, gwp, partp, d, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const dim3 grid(static_cast<unsigned>(g.C), static_cast<unsigned>(sp.splits));
      dw_bwd_w_nchw<scalar_t, index_t, KS, Loads, ST>
          <<<grid, kThreads, 0, stream>>>(ld, gwp, partp, d, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (sp.splits > 1)
      launch_sum_splits<scalar_t, acc_t>(partp, sp.splits, g.C * KK, gwp, nullptr, sms,
                                         stream);
  };
  if (strips) {
    dispatch_strips(g, weight_numel, run);
  } else {
    dispatch_index_k(g, weight_numel, [&]<typename index_t, int KS>() {
      run.template operator()<index_t, KS, 0>();
    });
  }
}

}  // namespace
}  // namespace bsnas
