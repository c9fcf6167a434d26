// CUDA kernels of bsnas::masked_dwconv2d: direct depthwise convolution over the first
// `width` filters of a full-width weight [C_max, 1, k, k], read in place (rows past
// `width` are never touched), NCHW and channels_last, float32/float64/float16/bfloat16
// with float (double for float64) accumulation. Semantics mirror
// cpu/masked_dwconv2d_kernel.cpp exactly.
//
// Layouts:
// - NCHW kernels are flat: one thread per output (input, for grad_x) element in a
//   grid-stride loop, so a warp covers consecutive columns of a row and the weight
//   reads of a warp are (mostly) one broadcast address.
// - channels_last kernels are channel-tiled: threadIdx.x is the channel inside a tile of
//   at most 64 channels (consecutive threads read consecutive addresses) and
//   threadIdx.y/blockIdx.y stride over pixels, so each thread keeps the k*k taps of its
//   one filter in registers for its whole pixel loop.
// grad_x is computed in gather form (one thread per input element, out_index_for_input,
// no atomics). grad_weight is a per-(channel, tap) reduction over N*Ho*Wo: each thread
// accumulates all k*k taps in registers, a block reduction combines them, and when the
// positions are split over gridDim.y the per-split partials go to a small [splits, width,
// k*k] buffer summed afterwards (deterministic, no atomics).
//
// Kernel size is a template parameter for k = 3, 5, 7 (unrolled taps, register weights
// and accumulators); other odd k use the runtime-K kernels. Indices are int32 when every
// index fits (with grid-stride headroom), int64 otherwise (runtime-K kernels only).
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

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../masked_conv_common.h"

namespace bsnas {
namespace {

constexpr const char* kFwd = "masked_dwconv2d";
constexpr const char* kBwd = "masked_dwconv2d_backward";

constexpr int kThreads = 256;            // flat kernels and the NCHW weight reduction
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

// ------------------------------------------------------------------ grad weight (reduce)

// Stores one reduced (channel, tap) value: into grad_weight (its dtype) when the
// positions were not split, else into the [splits, width, k*k] partial buffer.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_gw(scalar_t* gw, acc_t* part, int64_t split,
                                         int64_t C, int64_t KK, int64_t c, int64_t tap,
                                         acc_t v) {
  if (part != nullptr) part[(split * C + c) * KK + tap] = v;
  else gw[c * KK + tap] = static_cast<scalar_t>(v);
}

// gw[c, kh, kw] = sum over n, oh, ow of gy[n, c, oh, ow] * x[n, c, ih, iw].
// Block (kThreads threads): channel blockIdx.x, positions [q0, q1) of N*Ho*Wo, chunk
// blockIdx.y. Fixed-K: all taps accumulate in registers in one pass; runtime-K: one pass
// (and one block reduction) per tap.
template <typename scalar_t, typename index_t, int KS>
__global__ void __launch_bounds__(kThreads)
    dw_bwd_w_nchw(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                  scalar_t* __restrict__ gw, at::opmath_type<scalar_t>* __restrict__ part,
                  const Dims<index_t> d, const index_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kR = KS > 0 ? KS * KS : 1;
  __shared__ acc_t red[kR * kWarps];
  const index_t c = blockIdx.x;
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  const index_t KK = K * K;
  const index_t HoWo = d.Ho * d.Wo, HW = d.H * d.W;
  const index_t M = d.N * HoWo;
  const index_t q0 = index_t(blockIdx.y) * chunk;
  const index_t q1 = q0 + (chunk < M - q0 ? chunk : M - q0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
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
      const index_t n = q / HoWo;
      const index_t r = q - n * HoWo;
      const index_t oh = r / d.Wo, ow = r - oh * d.Wo;
      const index_t nc = n * d.C + c;
      const acc_t g = static_cast<acc_t>(gy[nc * HoWo + r]);
      const scalar_t* xp = x + nc * HW;
      const index_t ih0 = oh * d.stride - d.pad, iw0 = ow * d.stride - d.pad;
      if constexpr (KS > 0) {
#pragma unroll
        for (int kh = 0; kh < KS; ++kh) {
          const index_t ih = ih0 + kh * d.dil;
          if (!in_range(ih, d.H)) continue;
          const scalar_t* xr = xp + ih * d.W;
#pragma unroll
          for (int kw = 0; kw < KS; ++kw) {
            const index_t iw = iw0 + kw * d.dil;
            if (in_range(iw, d.W)) acc[kh * KS + kw] += g * static_cast<acc_t>(xr[iw]);
          }
        }
      } else {
        const index_t ih = ih0 + ph * d.dil, iw = iw0 + pw * d.dil;
        if (in_range(ih, d.H) && in_range(iw, d.W))
          acc[0] += g * static_cast<acc_t>(xp[ih * d.W + iw]);
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
// pixels [p0, p1) of N*Ho*Wo, chunk blockIdx.y. Each thread accumulates its channel's
// taps over its pixels; the py partial sums of each (channel, tap) are then added in
// shared memory, G taps at a time.
template <typename scalar_t, typename index_t, int KS>
__global__ void __launch_bounds__(kTileThreads)
    dw_bwd_w_nhwc(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                  scalar_t* __restrict__ gw, at::opmath_type<scalar_t>* __restrict__ part,
                  const Dims<index_t> d, const index_t chunk) {
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
  const index_t P = d.N * d.Ho * d.Wo;
  const index_t WC = d.W * d.C, HWC = d.H * d.W * d.C;
  const index_t p0 = index_t(blockIdx.y) * chunk;
  const index_t p1 = p0 + (chunk < P - p0 ? chunk : P - p0);
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
        const index_t ow = p % d.Wo;
        const index_t t = p / d.Wo;
        const index_t oh = t % d.Ho, n = t / d.Ho;
        const acc_t g = static_cast<acc_t>(gy[p * d.C + c]);
        const scalar_t* xn = x + n * HWC + c;
        const index_t ih0 = oh * d.stride - d.pad, iw0 = ow * d.stride - d.pad;
        if constexpr (KS > 0) {
#pragma unroll
          for (int kh = 0; kh < KS; ++kh) {
            const index_t ih = ih0 + kh * d.dil;
            if (!in_range(ih, d.H)) continue;
            const scalar_t* xr = xn + ih * WC;
#pragma unroll
            for (int kw = 0; kw < KS; ++kw) {
              const index_t iw = iw0 + kw * d.dil;
              if (in_range(iw, d.W)) acc[kh * KS + kw] += g * static_cast<acc_t>(xr[iw * d.C]);
            }
          }
        } else {
          const index_t ih = ih0 + ph * d.dil, iw = iw0 + pw * d.dil;
          if (in_range(ih, d.H) && in_range(iw, d.W))
            acc[0] += g * static_cast<acc_t>(xn[ih * WC + iw * d.C]);
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

int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= int(cache.size())) device = 0;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    v = std::max(v, 1);
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid of a flat grid-stride kernel: enough blocks for a couple of waves, no more.
unsigned flat_blocks(int64_t total, int sms) {
  return static_cast<unsigned>(
      std::clamp<int64_t>(ceil_div(total, kThreads), 1, int64_t{sms} * 16));
}

// channels_last tile: `tiles` tiles of `ct` channels (as even as possible, <= 64), with
// `py` pixel lanes so a block has about kTileThreads threads.
struct Tile {
  int ct, py;
  int64_t tiles;
};

Tile channel_tile(int64_t C) {
  const int64_t tiles = ceil_div(C, kMaxTileC);
  const int ct = static_cast<int>(ceil_div(C, tiles));
  return {ct, std::max(1, kTileThreads / ct), tiles};
}

// gridDim.y of a channel-tiled grid-stride kernel over `pixels`.
unsigned tile_blocks_y(int64_t pixels, const Tile& t, int sms) {
  const int64_t want = std::max<int64_t>(1, int64_t{sms} * 16 / t.tiles);
  return static_cast<unsigned>(std::clamp<int64_t>(
      std::min(ceil_div(pixels, t.py), want), 1, 65535));
}

// Whether every index the kernels form fits int32, with headroom for the grid-stride
// increments (< 2^25) and the split-chunk arithmetic.
bool fits_int32(const DwGeometry& g, int64_t weight_numel) {
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

template <typename scalar_t>
void launch_forward(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y,
                    const DwGeometry& g) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x.get_device());
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
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
  using acc_t = at::opmath_type<scalar_t>;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x.get_device());
  const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
  const int64_t KK = g.K * g.K;
  const int64_t M = g.N * g.Ho * g.Wo;  // positions reduced per (channel, tap)

  // How the N*Ho*Wo positions of each channel (tile) split over gridDim.y: enough blocks
  // to fill the device, at least 4 positions per thread.
  int64_t splits, chunk;
  Tile tile{0, 0, 0};
  if (g.channels_last) {
    tile = channel_tile(g.C);
    const int64_t want = ceil_div(int64_t{sms} * 8, tile.tiles);
    splits = std::clamp<int64_t>(std::min(want, M / (int64_t{tile.py} * 4)), 1, 65535);
  } else {
    const int64_t want = ceil_div(int64_t{sms} * 8, g.C);
    splits = std::clamp<int64_t>(std::min(want, M / (int64_t{kThreads} * 4)), 1, 65535);
  }
  chunk = ceil_div(M, splits);
  splits = ceil_div(M, chunk);  // no empty chunks
  at::Tensor part;
  acc_t* partp = nullptr;
  if (splits > 1) {
    part = at::empty({splits, g.C, KK},
                     x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    partp = part.mutable_data_ptr<acc_t>();
  }

  dispatch_index_k(g, weight.numel(), [&]<typename index_t, int KS>() {
    const Dims<index_t> d = make_dims<index_t>(g);
    // grad_x
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
    // grad_weight
    if (g.channels_last) {
      const dim3 block(tile.ct, tile.py);
      const dim3 grid(static_cast<unsigned>(tile.tiles), static_cast<unsigned>(splits));
      dw_bwd_w_nhwc<scalar_t, index_t, KS><<<grid, block, 0, stream>>>(
          gyp, xp, gwp, partp, d, static_cast<index_t>(chunk));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const dim3 grid(static_cast<unsigned>(g.C), static_cast<unsigned>(splits));
      dw_bwd_w_nchw<scalar_t, index_t, KS><<<grid, kThreads, 0, stream>>>(
          gyp, xp, gwp, partp, d, static_cast<index_t>(chunk));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (splits > 1) {
    // Rows past `width` keep their zeros.
    gw.view({g.c_max, KK}).narrow(0, 0, g.C).copy_(part.sum(0));
  }
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
  at::Tensor gw = at::zeros(weight.sizes(), weight.options());
  if (x.numel() == 0) return {gx.zero_(), gw};
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
