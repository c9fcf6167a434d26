// The depthwise convolution engine of the CPU backend, shared by bsnas::masked_dwconv2d
// and the fused bsnas::bn_act_dwconv2d (forward, input gradient, weight gradient).
//
// Nearly every pass first copies what it reads into a zero-padded scratch ("pack"),
// applying a per-value transform on the way (the fused op's BN + activation, or its
// upstream gradient with the statistics terms), so the inner loops have no bounds
// checks. NCHW planes split columns by phase (column mod stride): the taps of a stride-2
// convolution then read consecutive values, like those of a stride-1 one. channels_last
// strips keep the tensor's pixel-major layout over all channels (PixelStrip). The passes
// without a scratch are the plain channels_last ones (no transform of what is read):
// window_pass and direct_pass in dwconv_passes.h, reading the tensor itself.
//
// Register-blocked micro-kernels, all accumulating in vector registers across all k*k
// taps before a single store (GCC vector extensions, BSNAS_VEC_BYTES wide, so the same
// code serves every instruction-set build of kernels_isa.h):
// - Plane (NCHW): lanes run along an output row of one channel; R output rows at once,
//   each tap is one broadcast weight times R loads.
// - Blocked (channels_last): lanes hold BSNAS_VEC_BYTES of consecutive channels; R
//   output pixels at once. window_positions (kernel 3/5/7, dilation 1, stride 1/2): R
//   pixels of one output row, each kernel row's inputs loaded once into registers and
//   reused by its k taps; block_positions (any other case): one load per tap and pixel.
//
// The input gradient is a stride-1 convolution with the flipped filter over the output
// gradient spread by the stride (zeros between values) and padded by
// dil * (k - 1) - pad (masked_dwconv2d's channels_last stride-2 gradient avoids the
// spread: phase_input_grad in dwconv_passes.h); the weight gradient correlates the
// output gradient with the padded input, K accumulators per kernel row.
#pragma once

#include <ATen/Parallel.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../masked_conv_common.h"
#include "memory_policy.h"

#ifndef BSNAS_CPU_ISA
#error "define BSNAS_CPU_ISA (the instruction-set namespace) before including"
#endif
#ifndef BSNAS_VEC_BYTES
#error "define BSNAS_VEC_BYTES (the vector width in bytes) before including"
#endif

namespace bsnas {
namespace cpu {
namespace BSNAS_CPU_ISA {
namespace simd {

// The memory policy (memory_policy.h), ISA-independent, used unqualified below.
using cpu::exceeds_cache_share;
using cpu::kCacheLineBytes;
using cpu::kPlaneGroupBytes;
using cpu::kStripBytes;
using cpu::kWindowBytes;
using cpu::line_span;
using cpu::LineSpan;
using cpu::page_resident;
using cpu::prefetch_input_rows;
using cpu::prefetch_l2;
using cpu::prefetch_lines;
using cpu::stream_output;

// ------------------------------------------------------------------ vectors

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(BSNAS_VEC_BYTES), aligned(4), may_alias));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(BSNAS_VEC_BYTES), aligned(8), may_alias));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kLanes = BSNAS_VEC_BYTES / sizeof(T);

template <typename T>
inline Vec<T> vload(const T* p) { return *reinterpret_cast<const Vec<T>*>(p); }
template <typename T>
inline void vstore(T* p, const Vec<T>& v) { *reinterpret_cast<Vec<T>*>(p) = v; }
// Keeps v in a register from here on. Where a loaded vector feeds several multiply-adds,
// GCC folds the load into each one's memory operand (one load per multiply-add, the
// load ports then the limit) unless the value is pinned like this.
template <typename T>
inline void pin(Vec<T>& v) { asm("" : "+v"(v)); }
template <typename T>
inline Vec<T> vsplat(T s) { return s - Vec<T>{}; }  // x - 0 == x: a plain broadcast
// The first n lanes (0 <= n <= lanes) of p, zero above, reading nothing at or past
// p[n] (n = 0 reads nothing, whatever p points at): one masked load where the
// instruction set has it.
template <typename T>
inline Vec<T> vload_first(const T* p, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__) && BSNAS_VEC_BYTES == 64
  if constexpr (std::is_same_v<T, float>)
    return (Vec<T>)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  else
    return (Vec<T>)_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p);
#elif defined(__x86_64__) && defined(__GNUC__) && BSNAS_VEC_BYTES == 32
  if constexpr (std::is_same_v<T, float>)
    return (Vec<T>)_mm256_maskload_ps(
        p, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  else
    return (Vec<T>)_mm256_maskload_pd(
        p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3)));
#else
  Vec<T> v{};
  for (int64_t l = 0; l < n; ++l) v[l] = p[l];
  return v;
#endif
}
// The same for 0 < n <= lanes, a plain load when n is all of them.
template <typename T>
inline Vec<T> vload_part(const T* p, int64_t n) {
  if (n == kLanes<T>) return vload(p);
  return vload_first(p, n);
}

// Lanes first, first + 2, first + 4, ... of the concatenation (a, b): one permute.
template <typename T, int First>
inline Vec<T> alternate_lanes(const Vec<T>& a, const Vec<T>& b) {
  using Mask = decltype(a < b);  // the integer vector of the same lane count and width
  Mask m{};
  for (int64_t l = 0; l < kLanes<T>; ++l) m[l] = static_cast<decltype(m[0] + 0)>(2 * l + First);
  return __builtin_shuffle(a, b, m);
}
template <typename T>
inline Vec<T> even_lanes(const Vec<T>& a, const Vec<T>& b) { return alternate_lanes<T, 0>(a, b); }
template <typename T>
inline Vec<T> odd_lanes(const Vec<T>& a, const Vec<T>& b) { return alternate_lanes<T, 1>(a, b); }
// Transposes the V x V matrix held in m[0, V) (V = kLanes<T>): lane j of m[i] becomes
// lane i of m[j]. log2(V) rounds of the perfect shuffle, each interleaving row j with
// row j + V/2 (two-source permutes: 64 for a 16 x 16 float matrix).
template <typename T>
inline void transpose_square(Vec<T>* m) {
  constexpr int V = static_cast<int>(kLanes<T>);
  using Mask = decltype(m[0] < m[0]);
  Mask lo{}, hi{};
  for (int l = 0; l < V; ++l) {
    lo[l] = static_cast<decltype(lo[0] + 0)>(l / 2 + (l % 2) * V);
    hi[l] = static_cast<decltype(hi[0] + 0)>(V / 2 + l / 2 + (l % 2) * V);
  }
#pragma GCC unroll 8
  for (int round = 1; round < V; round *= 2) {
    Vec<T> t[V];
#pragma GCC unroll 16
    for (int j = 0; j < V / 2; ++j) {
      t[2 * j] = __builtin_shuffle(m[j], m[j + V / 2], lo);
      t[2 * j + 1] = __builtin_shuffle(m[j], m[j + V / 2], hi);
    }
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) m[j] = t[j];
  }
}

// Calls f with the compile-time kernel size (3, 5, 7, or 0 for any other).
template <typename F>
inline void with_kernel_size(int64_t K, const F& f) {
  switch (K) {
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

// Calls f(start, integral_constant<R>) over [0, n) in register blocks of 8 and one
// block of the remainder (1..7), so short runs still fill as many accumulators as
// they can.
template <typename F>
inline void for_blocks(int64_t n, const F& f) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) f(i, std::integral_constant<int, 8>{});
  switch (n - i) {
    case 7: f(i, std::integral_constant<int, 7>{}); break;
    case 6: f(i, std::integral_constant<int, 6>{}); break;
    case 5: f(i, std::integral_constant<int, 5>{}); break;
    case 4: f(i, std::integral_constant<int, 4>{}); break;
    case 3: f(i, std::integral_constant<int, 3>{}); break;
    case 2: f(i, std::integral_constant<int, 2>{}); break;
    case 1: f(i, std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

// Longest run of window_pass for kernel size K and stride S: R accumulators, the
// S * (R - 1) + K window slots and a tap fit in the 32 vector registers of AVX-512 at
// R = 12 for K = 3, S = 1 (26 + 1); everything else, and 16 registers, take 8.
template <int K, int S>
constexpr int kWideRun = BSNAS_VEC_BYTES == 64 && K == 3 && S == 1 ? 12 : 8;

// As for_blocks, in runs of Run first.
template <int Run, typename F>
inline void for_wide_blocks(int64_t n, const F& f) {
  int64_t i = 0;
  for (; i + Run <= n; i += Run) f(i, std::integral_constant<int, Run>{});
  for_blocks(n - i, [&](int64_t j, auto R) { f(i + j, R); });
}

// Calls f(start, integral_constant<R>) over [0, n) in ceil(n / Run) runs of as equal
// lengths as can be (R and R + 1), rather than runs of Run and a short remainder: a
// row of 14 takes 7 + 7, not 12 + 2, whose 2 accumulators wait on the multiply-add
// latency.
template <int Run, typename F>
inline void for_balanced_runs(int64_t n, const F& f) {
  if (n <= 0) return;
  const int64_t runs = (n + Run - 1) / Run, base = n / runs, longer = n % runs;
  const auto call = [&](int64_t start, int64_t len) {
    [&]<int... I>(std::integer_sequence<int, I...>) {
      ((len == I + 1 ? (f(start, std::integral_constant<int, I + 1>{}), 0) : 0), ...);
    }(std::make_integer_sequence<int, Run>{});
  };
  int64_t i = 0;
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t len = base + (r < longer ? 1 : 0);
    call(i, len);
    i += len;
  }
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The first vector-aligned element at or after `p`, at most kLanes<T> - 1 further on
// (scratch buffers are allocated kLanes<T> elements longer for it).
template <typename T>
inline T* align_to_vector(T* p) {
  constexpr int64_t V = kLanes<T>;
  return p + (V - static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) / sizeof(T)) % V) % V;
}

// Parallel tasks of about this many multiply-adds.
inline int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work_per_item));
}

// ------------------------------------------------------------------ geometry

// One convolution pass as the micro-kernels see it: a stride-S, dilation-d, k x k
// correlation of a padded source into an Ho x Wo output. The source is an Hs x Ws
// plane whose value (hs, ws) sits at padded position (hs * spread + pad,
// ws * spread + pad); everything else is zero.
struct Pass {
  int64_t K, S, d;          // kernel, stride, dilation
  int64_t Ho, Wo;           // output
  int64_t Hs, Ws;           // source
  int64_t pad, spread;      // source placement (pad may exceed the reach: not read)
  int64_t rows;             // padded rows read: (Ho - 1) * S + (K - 1) * d + 1
  int64_t phase_len;        // columns per phase in the scratch
  int64_t row0 = 0;         // first padded row held (strips of a larger pass)
  int64_t row_len() const { return S * phase_len; }
  int64_t reach() const { return (K - 1) * d / S; }  // largest in-phase tap offset

  // `cols` outputs are computed per phase row chunk: Wo rounded up to whole vectors
  // for the plane kernel (cols_round = lanes), Wo for the blocked one.
  static Pass make(int64_t K, int64_t S, int64_t d, int64_t Ho, int64_t Wo, int64_t Hs,
                   int64_t Ws, int64_t pad, int64_t spread, int64_t cols_round) {
    Pass p{K, S, d, Ho, Wo, Hs, Ws, pad, spread, 0, 0, 0};
    p.rows = (Ho - 1) * S + (K - 1) * d + 1;
    const int64_t cols = (Wo + cols_round - 1) / cols_round * cols_round;
    p.phase_len = cols + p.reach();
    return p;
  }
  // The convolution's own forward pass over an H x W input.
  static Pass forward(const DwGeometry& g, int64_t cols_round) {
    return make(g.K, g.stride, g.dil, g.Ho, g.Wo, g.H, g.W, g.pad, 1, cols_round);
  }
  // The input-gradient pass: grad_out spread by the stride, stride-1 output H x W.
  static Pass input_grad(const DwGeometry& g, int64_t cols_round) {
    return make(g.K, 1, g.dil, g.H, g.W, g.Ho, g.Wo, g.dil * (g.K - 1) - g.pad, g.stride,
                cols_round);
  }
  // Output rows [oh0, oh0 + count) of this pass as a pass of their own (its output row
  // i is row oh0 + i here; it holds only the padded rows those read).
  Pass strip(int64_t oh0, int64_t count) const {
    Pass q = *this;
    q.Ho = count;
    q.row0 = row0 + oh0 * S;
    q.rows = (count - 1) * S + (K - 1) * d + 1;
    return q;
  }
  // Output rows per strip so that a strip's scratch holds about `bytes`, and the rows
  // shared by neighbouring strips are re-packed at most about half the time.
  int64_t strip_rows(int64_t bytes_per_row, int64_t bytes) const {
    const int64_t by_size = bytes / std::max<int64_t>(1, S * bytes_per_row);
    const int64_t by_overlap = (2 * (K - 1) * d + S - 1) / S;
    return std::max<int64_t>(1, std::min(Ho, std::max(by_size, by_overlap)));
  }
  // The source row held in scratch row r (padded row row0 + r), or -1 for padding.
  int64_t source_row(int64_t r) const { return source_index(r + row0, Hs); }
  // The source column at padded column c, or -1 for padding.
  int64_t source_col(int64_t c) const { return source_index(c, Ws); }
  int64_t source_index(int64_t padded, int64_t n) const {
    const int64_t t = padded - pad;
    const int64_t i = t >= 0 && t % spread == 0 ? t / spread : -1;
    return i < n ? i : -1;
  }
  // Offset of tap (kh, kw) in scratch units (values for planes, pixels for blocks).
  int64_t tap_offset(int64_t kh, int64_t kw) const {
    const int64_t c = kw * d;
    return kh * d * row_len() + (c % S) * phase_len + c / S;
  }
  // Every tap's offset, tap t = kh * K + kw.
  std::vector<int64_t> tap_offsets() const {
    std::vector<int64_t> off(static_cast<size_t>(K * K));
    for (int64_t kh = 0; kh < K; ++kh)
      for (int64_t kw = 0; kw < K; ++kw) off[kh * K + kw] = tap_offset(kh, kw);
    return off;
  }
};

// For every source row that lands in the scratch, calls row(hs, scratch_row_base) and
// for its columns the callback gets (ws, scratch_offset_in_row). Generic over the
// stride/spread combination; the common cases (S = 1, spread = 1 and S = 2, spread =
// 1) take straight loops.
template <typename RowFn>
inline void for_source_rows(const Pass& p, const RowFn& row) {
  for (int64_t hs = 0; hs < p.Hs; ++hs) {
    const int64_t r = hs * p.spread + p.pad - p.row0;
    if (r < 0) continue;
    if (r >= p.rows) break;
    row(hs, r * p.row_len());
  }
}

// Columns: calls col(ws, offset within the scratch row) for every source column held.
template <typename ColFn>
inline void for_source_cols(const Pass& p, const ColFn& col) {
  if (p.S == 1) {
    const int64_t lo = p.pad >= 0 ? 0 : (-p.pad + p.spread - 1) / p.spread;
    for (int64_t ws = lo; ws < p.Ws; ++ws) {
      const int64_t c = ws * p.spread + p.pad;
      if (c >= p.phase_len) break;
      col(ws, c);
    }
    return;
  }
  for (int64_t ws = 0; ws < p.Ws; ++ws) {
    const int64_t c = ws * p.spread + p.pad;
    if (c < 0) continue;
    const int64_t i = c / p.S;
    if (i < p.phase_len) col(ws, (c % p.S) * p.phase_len + i);
  }
}

// ------------------------------------------------------------------ plane kernels (NCHW)

// Scratch of one plane: [rows][S][phase_len] values, with `src(hs * Ws + ws)` at the
// source positions, zero elsewhere.
template <typename T, typename Src>
inline void pack_plane(T* buf, const Pass& p, const Src& src) {
  constexpr int64_t V = kLanes<T>;
  constexpr int64_t kMaxPhases = 8;
  std::fill(buf, buf + p.rows * p.row_len(), T(0));
  // Stride S > 1: source column ws sits at padded column ws + pad, i.e. in phase
  // (ws + pad) % S at index (ws + pad) / S; per phase a run [i0, i1) whose first
  // source column is col0 and whose source step is S. The same for every row.
  struct Run {
    int64_t i0, i1, col0;
  };
  Run runs[kMaxPhases];
  const bool phased = p.spread == 1 && p.S > 1 && p.S <= kMaxPhases;
  if (phased) {
    const int64_t clo = std::max<int64_t>(p.pad, 0);
    const int64_t chi = std::min<int64_t>(p.pad + p.Ws, p.S * p.phase_len);
    for (int64_t ph = 0; ph < p.S; ++ph) {
      const int64_t i0 = std::min(p.phase_len, clo > ph ? (clo - ph + p.S - 1) / p.S : 0);
      const int64_t i1 =
          std::max(i0, std::min(p.phase_len, chi > ph ? (chi - ph + p.S - 1) / p.S : 0));
      runs[ph] = {i0, i1, i0 * p.S + ph - p.pad};
    }
  }
  // Stride 2 over an even-width plane: column parity is index parity, so the whole
  // plane is transformed contiguously and split into its even and odd columns with
  // vector permutes once ([2][half] values), and the rows' runs are plain copies.
  const T* split = nullptr;
  int64_t half = 0;
  if (phased && p.S == 2 && p.Ws % 2 == 0) {
    const int64_t hw = p.Hs * p.Ws, padded = round_up(hw, 2 * V);
    half = padded / 2;
    thread_local std::vector<T> tmp;
    if (tmp.size() < static_cast<size_t>(2 * padded + V)) tmp.resize(2 * padded + V);
    T* t = align_to_vector(tmp.data());
#pragma omp simd
    for (int64_t j = 0; j < hw; ++j) t[j] = src(j);
    for (int64_t j = hw; j < padded; ++j) t[j] = T(0);
    T* even = t + padded;
    T* odd = even + half;
    for (int64_t j = 0; j < padded; j += 2 * V) {
      const Vec<T> a = vload(t + j), b = vload(t + j + V);
      vstore(even + j / 2, even_lanes<T>(a, b));
      vstore(odd + j / 2, odd_lanes<T>(a, b));
    }
    split = even;
  }
  for_source_rows(p, [&](int64_t hs, int64_t base) {
    T* br = buf + base;
    const int64_t off = hs * p.Ws;
    if (p.S == 1 && p.spread == 1) {
      const int64_t lo = std::max<int64_t>(0, -p.pad);
      const int64_t hi = std::min(p.Ws, p.phase_len - p.pad);
      T* dst = br + p.pad;
#pragma omp simd
      for (int64_t ws = lo; ws < hi; ++ws) dst[ws] = src(off + ws);
    } else if (phased) {
      for (int64_t ph = 0; ph < p.S; ++ph) {
        const Run r = runs[ph];
        T* dst = br + ph * p.phase_len;
        if (split != nullptr) {  // stride 2, even width: runs of the split plane
          const T* from = split + (r.col0 & 1) * half + (off + r.col0) / 2;
#pragma omp simd
          for (int64_t i = r.i0; i < r.i1; ++i) dst[i] = from[i - r.i0];
        } else {
          for (int64_t i = r.i0; i < r.i1; ++i) dst[i] = src(off + r.col0 + (i - r.i0) * p.S);
        }
      }
    } else {
      for_source_cols(p, [&](int64_t ws, int64_t o) { br[o] = src(off + ws); });
    }
  });
}

// The first n lanes of v to p (0 < n <= lanes), writing nothing at or past p[n]: one
// masked store where the instruction set has it.
template <typename T>
inline void vstore_part(T* p, const Vec<T>& v, int64_t n) {
  if (n == kLanes<T>) {
    vstore(p, v);
    return;
  }
#if defined(__x86_64__) && defined(__GNUC__) && BSNAS_VEC_BYTES == 64
  if constexpr (std::is_same_v<T, float>)
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), (__m512)v);
  else
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), (__m512d)v);
#elif defined(__x86_64__) && defined(__GNUC__) && BSNAS_VEC_BYTES == 32
  if constexpr (std::is_same_v<T, float>)
    _mm256_maskstore_ps(
        p, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
        (__m256)v);
  else
    _mm256_maskstore_pd(
        p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3)), (__m256d)v);
#else
  for (int64_t l = 0; l < n; ++l) p[l] = v[l];
#endif
}

// A vector store that bypasses the caches (non-temporal) where the instruction set has
// one; p must be vector-aligned. A plain store otherwise.
template <typename T>
inline void vstream(T* p, const Vec<T>& v) {
#if defined(__x86_64__) && defined(__GNUC__) && BSNAS_VEC_BYTES == 64
  if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(p, (__m512)v);
  else _mm512_stream_pd(p, (__m512d)v);
#elif defined(__x86_64__) && defined(__GNUC__) && BSNAS_VEC_BYTES == 32
  if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(p, (__m256)v);
  else _mm256_stream_pd(p, (__m256d)v);
#else
  vstore(p, v);
#endif
}
// Orders a thread's non-temporal stores before what follows (the end of its tasks).
inline void stream_fence() {
#if defined(__x86_64__) && defined(__GNUC__)
  _mm_sfence();
#endif
}
template <typename T>
inline bool vector_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % BSNAS_VEC_BYTES == 0;
}

// R output vectors of one plane at scratch offsets base[r] (values): acc[r] over all
// taps of the filter w [k*k]; positions may span rows, so small planes still fill R
// independent accumulators.
template <int KT, int R, typename T>
inline void plane_positions(const T* buf, const Pass& p, const int64_t* toff,
                            const int64_t* base, const T* w, Vec<T>* acc) {
  const int64_t K = KT ? KT : p.K, kk = K * K;
  const T* b[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = Vec<T>{};
    b[r] = buf + base[r];
  }
  for (int64_t t = 0; t < kk; ++t) {
    const int64_t o = toff[t];
    const Vec<T> wv = vsplat(w[t]);
    for (int r = 0; r < R; ++r) acc[r] += wv * vload(b[r] + o);
  }
}


// The pass over `planes` packed planes (scratch slot i at buf + i * slot) with filters
// w + i * k*k; output plane i [Ho, Wo] at y[i].
template <typename T>
inline void plane_conv(const T* buf, int64_t slot, int64_t planes, const Pass& p, const T* w,
                       const int64_t* toff, T* const* y) {
  constexpr int64_t V = kLanes<T>;
  const int64_t kk = p.K * p.K, rs = p.S * p.row_len(), nvec = (p.Wo + V - 1) / V;
  with_kernel_size(p.K, [&](auto KT) {
    for (int64_t i = 0; i < planes; ++i) {
      int64_t oh = 0, v = 0;  // the next position: row, vector column
      for_blocks(p.Ho * nvec, [&](int64_t, auto R) {
        constexpr int RV = decltype(R)::value;
        int64_t base[RV];
        T* dst[RV];
        int64_t n[RV];
        for (int r = 0; r < RV; ++r) {
          base[r] = i * slot + oh * rs + v * V;
          dst[r] = y[i] + oh * p.Wo + v * V;
          n[r] = std::min(V, p.Wo - v * V);
          if (++v == nvec) {
            v = 0;
            ++oh;
          }
        }
        Vec<T> acc[RV];
        plane_positions<decltype(KT)::value, RV>(buf, p, toff, base, w + i * kk, acc);
        for (int r = 0; r < RV; ++r) vstore_part(dst[r], acc[r], n[r]);
      });
    }
  });
}

// Small stride-1 planes (Wo at most half a vector): the pass's scratch rows are Wo +
// reach long (flat_pass), and vectors run over the flat scratch, so one vector covers
// several output rows (lanes on the halo columns are computed and dropped): 7 of 11
// lanes used for 7x7 k5 instead of 7 of 16. `tmp` holds flat_outputs(p) values.
inline bool use_flat(const Pass& p, int64_t lanes) { return p.S == 1 && 2 * p.Wo <= lanes; }
inline Pass flat_pass(const Pass& p) {
  Pass q = Pass::make(p.K, 1, p.d, p.Ho, p.Wo, p.Hs, p.Ws, p.pad, p.spread, 1);
  q.row0 = p.row0;
  return q;
}
template <typename T>
inline int64_t flat_outputs(const Pass& p) {
  return round_up(p.Ho * p.row_len(), kLanes<T>);
}
// Values a flat scratch slot must hold beyond rows * row_len (the last vector's reads).
template <typename T>
inline int64_t flat_slack(const Pass& p) {
  return kLanes<T> + p.row_len();
}

template <typename T>
inline void plane_conv_flat(const T* buf, int64_t slot, int64_t planes, const Pass& p,
                            const T* w, const int64_t* toff, T* const* y, T* tmp) {
  constexpr int64_t V = kLanes<T>;
  const int64_t kk = p.K * p.K, rs = p.row_len(), nvec = flat_outputs<T>(p) / V;
  with_kernel_size(p.K, [&](auto KT) {
    for (int64_t i = 0; i < planes; ++i) {
      for_blocks(nvec, [&](int64_t v0, auto R) {
        constexpr int RV = decltype(R)::value;
        int64_t base[RV];
        for (int r = 0; r < RV; ++r) base[r] = i * slot + (v0 + r) * V;
        Vec<T> acc[RV];
        plane_positions<decltype(KT)::value, RV>(buf, p, toff, base, w + i * kk, acc);
        for (int r = 0; r < RV; ++r) vstore(tmp + (v0 + r) * V, acc[r]);
      });
      for (int64_t oh = 0; oh < p.Ho; ++oh) {
        const T* src = tmp + oh * rs;
        T* dst = y[i] + oh * p.Wo;
#pragma omp simd
        for (int64_t ow = 0; ow < p.Wo; ++ow) dst[ow] = src[ow];
      }
    }
  });
}

// acc[t] += sum over outputs o of g[o] * scratch[o * S + tap t], g packed as [Ho][gl]
// rows with zeros past Wo (gl = Wo rounded up to vectors). Float partials per plane.
// The lanes of a row's last vector past Wo are no outputs: the scratch is not read
// there (a zero gradient times a NaN or Inf input would still make NaN).
template <int KT, typename T, typename Acc>
inline void plane_wgrad_k(const T* buf, const Pass& p, const T* g, int64_t gl,
                          const int64_t* toff, Acc* acc) {
  constexpr int64_t V = kLanes<T>;
  const int64_t K = KT ? KT : p.K, rs = p.S * p.row_len();
  for (int64_t kh = 0; kh < K; ++kh) {
    for (int64_t kw0 = 0; kw0 < K; kw0 += 8) {  // at most 8 accumulators (K > 8: chunks)
      const int64_t nk = std::min<int64_t>(8, K - kw0);
      Vec<T> a[8];
      for (int j = 0; j < 8; ++j) a[j] = Vec<T>{};
      for (int64_t oh = 0; oh < p.Ho; ++oh) {
        const T* gr = g + oh * gl;
        const T* br = buf + oh * rs;
        for (int64_t ow0 = 0; ow0 < gl; ow0 += V) {
          const Vec<T> gv = vload(gr + ow0);
          const int64_t nv = p.Wo - ow0;  // outputs in this vector
          if (nv >= V) {
            if (KT) {
              for (int j = 0; j < (KT < 8 ? KT : 8); ++j)
                a[j] += gv * vload(br + toff[kh * K + kw0 + j] + ow0);
            } else {
              for (int64_t j = 0; j < nk; ++j) a[j] += gv * vload(br + toff[kh * K + kw0 + j] + ow0);
            }
          } else {
            for (int64_t j = 0; j < nk; ++j)
              a[j] += gv * vload_first(br + toff[kh * K + kw0 + j] + ow0, nv);
          }
        }
      }
      for (int64_t j = 0; j < nk; ++j) {
        Acc s = 0;
        for (int64_t l = 0; l < V; ++l) s += a[j][l];
        acc[kh * K + kw0 + j] += s;
      }
    }
  }
}

template <typename T, typename Acc>
inline void plane_wgrad(const T* buf, const Pass& p, const T* g, int64_t gl,
                        const int64_t* toff, Acc* acc) {
  with_kernel_size(p.K, [&](auto KT) {
    plane_wgrad_k<decltype(KT)::value>(buf, p, g, gl, toff, acc);
  });
}

// g [Ho][gl] rows = src(oh * Wo + ow), zero past Wo.
template <typename T, typename Src>
inline void pack_rows(T* g, int64_t Ho, int64_t Wo, int64_t gl, const Src& src) {
  for (int64_t oh = 0; oh < Ho; ++oh) {
    T* gr = g + oh * gl;
    const int64_t off = oh * Wo;
#pragma omp simd
    for (int64_t ow = 0; ow < Wo; ++ow) gr[ow] = src(off + ow);
    std::fill(gr + Wo, gr + gl, T(0));
  }
}


// ------------------------------------------------------------------ blocked kernels (channels_last)

// A block of channels [c0, c0 + cb) of an NHWC tensor with C channels: pixel p's
// values start at p * C + c0.
struct ChannelBlock {
  int64_t c0, cb, C;
};

// Scratch of one channel block of one image: [rows][S][phase_len] pixels of V lanes,
// src(c, off) at the source positions (off = element offset of channel c), lanes past
// cb and everything else zero. `image` is the image's first element offset. Only what
// the sources do not cover is zeroed (the scratch is large on big planes).
template <typename T, typename Src>
inline void pack_block(T* buf, const Pass& p, const ChannelBlock& cb, int64_t image,
                       const Src& src) {
  constexpr int64_t V = kLanes<T>;
  const int64_t rl = p.row_len() * V;
  const auto put = [&](T* dst, int64_t off) {
    if (cb.cb == V) {
#pragma omp simd
      for (int64_t l = 0; l < V; ++l) dst[l] = src(cb.c0 + l, off + l);
    } else {
      for (int64_t l = 0; l < V; ++l) dst[l] = l < cb.cb ? src(cb.c0 + l, off + l) : T(0);
    }
  };
  for (int64_t r = 0; r < p.rows; ++r) {
    T* br = buf + r * rl;
    const int64_t hs = p.source_row(r);
    if (hs < 0) {
      std::fill(br, br + rl, T(0));
      continue;
    }
    const int64_t rowoff = image + hs * p.Ws * cb.C + cb.c0;
    if (p.spread != 1) {
      std::fill(br, br + rl, T(0));
      for_source_cols(p, [&](int64_t ws, int64_t o) { put(br + o * V, rowoff + ws * cb.C); });
      continue;
    }
    // Source column ws sits at padded column ws + pad; per phase a contiguous run.
    const int64_t clo = std::max<int64_t>(p.pad, 0);
    const int64_t chi = std::min<int64_t>(p.pad + p.Ws, p.S * p.phase_len);
    for (int64_t ph = 0; ph < p.S; ++ph) {
      T* seg = br + ph * p.phase_len * V;
      const int64_t i0 = std::min(p.phase_len, clo > ph ? (clo - ph + p.S - 1) / p.S : 0);
      const int64_t i1 =
          std::max(i0, std::min(p.phase_len, chi > ph ? (chi - ph + p.S - 1) / p.S : 0));
      std::fill(seg, seg + i0 * V, T(0));
      for (int64_t i = i0; i < i1; ++i) put(seg + i * V, rowoff + (i * p.S + ph - p.pad) * cb.C);
      std::fill(seg + i1 * V, seg + p.phase_len * V, T(0));
    }
  }
}

// The first channel of block b of C channels in nb blocks of V when the last block ends
// at channel C: b * V, the last one at max(0, C - V), overlapping the block before it
// when V does not divide C (it computes those channels again, bit for bit). Every block
// then holds min(V, C) channels: full vectors whenever C >= V, no masked loads or
// stores for a partial block.
inline int64_t end_aligned_block(int64_t b, int64_t nb, int64_t C, int64_t V) {
  return b + 1 < nb ? b * V : std::max<int64_t>(0, C - V);
}

// Tap-major filters of every channel block: taps[b][t][l] = w[(c0(b) + l) * kk + t],
// zero past C, where block b starts at channel c0(b) = b * V, or end_aligned_block's
// start with `end_aligned`; flip = true reverses the taps (the input-gradient pass).
template <typename T>
inline void pack_taps(T* taps, const T* w, int64_t C, int64_t kk, bool flip,
                      bool end_aligned = false) {
  constexpr int64_t V = kLanes<T>;
  const int64_t nb = (C + V - 1) / V;
  std::fill(taps, taps + nb * kk * V, T(0));
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t c0 = end_aligned ? end_aligned_block(b, nb, C, V) : b * V;
    for (int64_t c = c0; c < std::min(C, c0 + V); ++c)
      for (int64_t t = 0; t < kk; ++t)
        taps[(b * kk + (flip ? kk - 1 - t : t)) * V + c - c0] = w[c * kk + t];
  }
}

// The channels_last scratch of one strip: pixel-major like the tensor, [rows][cols][Cs]
// values, padded pixel (r, c) of the strip at (r * cols + c) * Cs; Cs = the channel
// group's blocks x lanes, lanes past the last channel zero. A k x k tap then reads one
// vector at a fixed offset from the output's pixel, for any stride, and an output
// pixel's channels are produced together, so the tensor's lines are written whole.
struct PixelStrip {
  int64_t cols;  // padded columns read: (Wo - 1) * S + (K - 1) * d + 1
  int64_t Cs;    // values per scratch pixel
  int64_t row_stride() const { return cols * Cs; }
  static int64_t columns(const Pass& p) { return (p.Wo - 1) * p.S + (p.K - 1) * p.d + 1; }
  // Offset of tap t = kh * K + kw, in values.
  std::vector<int64_t> tap_offsets(const Pass& p) const {
    std::vector<int64_t> off(static_cast<size_t>(p.K * p.K));
    for (int64_t kh = 0; kh < p.K; ++kh)
      for (int64_t kw = 0; kw < p.K; ++kw)
        off[kh * p.K + kw] = kh * p.d * row_stride() + kw * p.d * Cs;
    return off;
  }
};

// Packs padded rows [p.row0, p.row0 + p.rows) of channels [c0, c1) of one image into a
// PixelStrip scratch: src(c, off) at the source positions (off = the element offset of
// channel c of the NHWC source with C channels, `image` its first element), zero
// elsewhere.
template <typename T, typename Src>
inline void pack_strip(T* buf, const Pass& p, const PixelStrip& ps, int64_t C, int64_t c0,
                       int64_t c1, int64_t image, const Src& src) {
  const int64_t rs = ps.row_stride(), nc = c1 - c0;
  for (int64_t r = 0; r < p.rows; ++r) {
    T* br = buf + r * rs;
    const int64_t hs = p.source_row(r);
    if (hs < 0) {
      std::fill(br, br + rs, T(0));
      continue;
    }
    const int64_t rowoff = image + hs * p.Ws * C;
    for (int64_t c = 0; c < ps.cols; ++c) {
      T* dst = br + c * ps.Cs;
      const int64_t ws = p.source_col(c);
      if (ws < 0) {
        std::fill(dst, dst + ps.Cs, T(0));
        continue;
      }
      const int64_t off = rowoff + ws * C;
      T* d = dst - c0;
#pragma omp simd
      for (int64_t ch = c0; ch < c1; ++ch) d[ch] = src(ch, off + ch);
      std::fill(dst + nc, dst + ps.Cs, T(0));
    }
  }
}

// R output vectors of one channel block: acc[r] = sum over taps t < ntaps of
// taps[t] * src[base[r] + toff[t]] (vectors of `lanes` valid values; a partial block's
// loads are masked). Not inlined: inside the passes' loops GCC spills the R row
// pointers and reloads one per multiply-add.
template <int R, bool Part, typename T>
__attribute__((noinline)) void block_positions(const T* src, int64_t ntaps, const T* taps,
                                               const int64_t* toff, const int64_t* base,
                                               int64_t lanes, Vec<T>* acc) {
  constexpr int64_t V = kLanes<T>;
  const T* b[R];
  Vec<T> a[R];  // not acc itself: it may alias the source (may_alias vectors)
  for (int r = 0; r < R; ++r) {
    a[r] = Vec<T>{};
    b[r] = src + base[r];
  }
  for (int64_t t = 0; t < ntaps; ++t) {
    const Vec<T> wv = vload(taps + t * V);
    const int64_t o = toff[t];
    for (int r = 0; r < R; ++r) a[r] += wv * (Part ? vload_part(b[r] + o, lanes) : vload(b[r] + o));
  }
  for (int r = 0; r < R; ++r) acc[r] = a[r];
}

// How a register window's loads are masked: kNoMask (every slot inside the row, a full
// channel block), kTailMask (every slot inside the row, a partial block: one mask of
// lanes[0] lanes for all of them), kSlotMask (slot i reads its first lanes[i] values,
// 0 where it lies in the padding).
enum WindowMask : int { kNoMask = 0, kTailMask = 1, kSlotMask = 2 };

// Register-window slot i of a row at `p` (slot stride ps) under mask mode M.
template <int M, typename T>
inline Vec<T> window_load(const T* p, int64_t i, int64_t ps, const int64_t* lanes) {
  Vec<T> v = M == kNoMask ? vload(p + i * ps)
                          : vload_first(p + i * ps, M == kTailMask ? lanes[0] : lanes[i]);
  pin<T>(v);
  return v;
}

// Where a register-window run's R result vectors go: an array (the caller takes them
// from there), or straight into a tensor: vector r to d + r * stride, its first
// `lanes` values; with `stream`, full vectors at vector-aligned addresses bypass the
// caches (vstream; the pass then ends its tasks with stream_fence) when the stride
// keeps every run's vectors on whole lines (pixels of a multiple of 64 bytes: the
// vectors of one pixel's channel blocks then fill its lines).
template <typename T>
struct RunStore {
  T* d;
  int64_t stride;
  int64_t lanes;
  bool stream = false;
};
template <int R, typename T>
inline void put_run(Vec<T>* acc, const Vec<T>* a) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = a[r];
}
template <int R, typename T>
inline void put_run(const RunStore<T>& o, const Vec<T>* a) {
  if (o.stream && o.lanes == kLanes<T> && vector_aligned(o.d) &&
      (o.stride * int64_t(sizeof(T))) % kCacheLineBytes == 0) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) vstream(o.d + r * o.stride, a[r]);
  } else if (o.lanes == kLanes<T>) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) vstore(o.d + r * o.stride, a[r]);
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) vstore_part(o.d + r * o.stride, a[r], o.lanes);
  }
}

// R consecutive output pixels of one output row of a channel block, stride S,
// dilation 1, over kernel rows [kh0, kh1): src is the input pixel under tap (kh0, 0)
// of the first output, ps / rs the pixel / row strides (values). Each kernel row's
// NI = S * (R - 1) + K inputs are loaded once and reused by its K taps (a register
// window), so a multiply-add costs well under one load; with a load per multiply-add
// (block_positions) the loads were the limit. Masked (M, lanes: see WindowMask), the
// kernel runs on the tensor itself at its borders and in a partial channel block. The
// results go to `out` (put_run): stored from here into a tensor, the R vectors do not
// make a round trip through the caller's stack.
template <int R, int K, int S, int M, typename T, typename Out>
__attribute__((noinline)) void window_positions(const T* src, int64_t ps, int64_t rs,
                                                int64_t kh0, int64_t kh1, const T* taps,
                                                const int64_t* lanes, Out out) {
  constexpr int64_t V = kLanes<T>;
  constexpr int NI = S * (R - 1) + K;
  Vec<T> a[R];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) a[r] = Vec<T>{};
#pragma GCC unroll 1
  for (int64_t kh = kh0; kh < kh1; ++kh) {
    const T* row = src + (kh - kh0) * rs;
    const T* tk = taps + kh * K * V;
    Vec<T> in[NI];
#pragma GCC unroll 32
    for (int i = 0; i < NI; ++i) in[i] = window_load<M>(row, i, ps, lanes);
#pragma GCC unroll 32
    for (int kw = 0; kw < K; ++kw) {
      const Vec<T> wv = vload(tk + kw * V);
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) a[r] += wv * in[r * S + kw];
    }
  }
  put_run<R, T>(out, a);
}

// Calls f(std::integral_constant<int, M>, slot_lanes) for a register window of NI
// slots whose slot 0 is source column c0 of a row of W pixels, in a channel block of
// `lanes` of V lanes, M the cheapest WindowMask that reads nothing outside the tensor
// (slot_lanes: nullptr for kNoMask, {lanes} for kTailMask, per slot for kSlotMask).
template <int NI, typename F>
inline void with_window_slots(int64_t c0, int64_t W, int64_t lanes, int64_t V, const F& f) {
  if (c0 >= 0 && c0 + NI <= W) {
    if (lanes == V) {
      f(std::integral_constant<int, kNoMask>{}, static_cast<const int64_t*>(nullptr));
    } else {
      f(std::integral_constant<int, kTailMask>{}, static_cast<const int64_t*>(&lanes));
    }
  } else {
    int64_t slot_lanes[NI];
    for (int i = 0; i < NI; ++i) slot_lanes[i] = c0 + i >= 0 && c0 + i < W ? lanes : 0;
    f(std::integral_constant<int, kSlotMask>{}, static_cast<const int64_t*>(slot_lanes));
  }
}

// Kernel rows a weight-gradient run (window_wgrad_run) takes at once: as many as keep
// its 8 gradient vectors, one kernel row's window (S * 7 + K inputs) and KH * K
// accumulators within the 32 vector registers of AVX-512 (K = 3: all 3 rows at stride
// 1, 2 at stride 2; K = 5: 2 at stride 1; otherwise 1), one with 16 registers. More
// rows per run, more independent multiply-add chains: with one row, each of the K
// accumulators took R dependent multiply-adds in turn, and the run waited on their
// latency.
template <int K, int S>
constexpr int kWgradRows =
    BSNAS_VEC_BYTES == 64 ? std::max(1, std::min(K, (32 - 8 - (S * 7 + K)) / K)) : 1;

// One run of R output pixels of a weight gradient over KH consecutive kernel rows: the
// R output-gradient vectors g[r] (pixel stride ps) are loaded once, then for each
// kernel row kh the S * (R - 1) + K inputs of the run's window in row src + kh * rs,
// and a[kh * K + kw] += sum_r g[r] * in[r * S + kw]. Masked (M, lanes: see WindowMask):
// the gradient vectors hold their first `glanes` values.
template <int R, int K, int S, int KH, int M, typename T>
__attribute__((noinline)) void window_wgrad_run(const T* src, int64_t rs, const T* g,
                                                int64_t ps, const int64_t* lanes,
                                                int64_t glanes, Vec<T>* a) {
  constexpr int NI = S * (R - 1) + K;
  Vec<T> gv[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    gv[r] = M == kNoMask ? vload(g + r * ps) : vload_first(g + r * ps, glanes);
    pin<T>(gv[r]);
  }
#pragma GCC unroll 8
  for (int kh = 0; kh < KH; ++kh) {
    Vec<T> in[NI];
#pragma GCC unroll 32
    for (int i = 0; i < NI; ++i) in[i] = window_load<M>(src + kh * rs, i, ps, lanes);
#pragma GCC unroll 8
    for (int kw = 0; kw < K; ++kw) {
      Vec<T> s = a[kh * K + kw];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) s += gv[r] * in[r * S + kw];
      a[kh * K + kw] = s;
    }
  }
}

// acc[j][l] += a[j][l] for the J float sums of one output row over one or more kernel
// rows of a register-window weight gradient (acc: those kernel rows' J x V doubles).
template <int J, typename T>
inline void add_row_sums(double* acc, const Vec<T>* a) {
  constexpr int64_t V = kLanes<T>;
  for (int j = 0; j < J; ++j)
    for (int64_t l = 0; l < V; ++l) acc[j * V + l] += a[j][l];
}

// Calls f(kh0, integral_constant<G>) for the kernel rows [0, K) in groups of KH
// consecutive rows (G = KH, and the rest in a last group).
template <int K, int KH, typename F>
inline void for_row_groups(const F& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (f(I * KH, std::integral_constant<int, std::min(KH, K - I * KH)>{}), ...);
  }(std::make_integer_sequence<int, (K + KH - 1) / KH>{});
}

// The weight gradient of one image of a channel block from zero-padded scratch:
// sb [rows][cols][V] (padded input rows and columns, every tap inside) and the output
// gradient gb [Ho][Wo][V], stride S, dilation 1; each output row's runs through
// window_wgrad_run, kWgradRows kernel rows at a time, float sums per output row added
// into acc [K*K][V].
template <int K, int S, typename T>
inline void padded_window_wgrad(const T* sb, int64_t cols, const T* gb, int64_t Ho,
                                int64_t Wo, double* acc) {
  constexpr int64_t V = kLanes<T>;
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const T* grow = gb + oh * Wo * V;
    for_row_groups<K, kWgradRows<K, S>>([&](int kh0, auto GC) {
      constexpr int G = decltype(GC)::value;
      Vec<T> a[G * K] = {};
      const T* srow = sb + (oh * S + kh0) * cols * V;
      for_blocks(Wo, [&](int64_t ow0, auto R) {
        window_wgrad_run<decltype(R)::value, K, S, G, kNoMask>(srow + ow0 * S * V, cols * V,
                                                              grow + ow0 * V, V, nullptr, V, a);
      });
      add_row_sums<G * K, T>(acc + kh0 * K * V, a);
    });
  }
}

// Calls f(integral_constant<K>, integral_constant<S>) and returns true where
// window_positions serves the pass (kernel 3, 5 or 7, stride 1 or 2, dilation 1);
// returns false otherwise.
template <typename F>
inline bool with_window(int64_t K, int64_t S, int64_t d, const F& f) {
  if (d != 1 || (S != 1 && S != 2)) return false;
  bool done = false;
  with_kernel_size(K, [&](auto KT) {
    if constexpr (decltype(KT)::value != 0) {
      if (S == 1) f(KT, std::integral_constant<int, 1>{});
      else f(KT, std::integral_constant<int, 2>{});
      done = true;
    }
  });
  return done;
}

// The pass over a packed strip of channel blocks [b0, b1) (taps of every block, as
// pack_taps lays them out). out(block, oh, ow, R, acc) receives the R output vectors of
// pixels (oh, ow), (oh, ow + 1), ... of a block; between(step, steps) is called after
// each run, steps times in all.
// - K = 3, 5, 7 at dilation 1 and stride 1 or 2: block by block, each output row in
//   runs of up to 8 pixels through the register window (window_positions);
// - otherwise: runs of up to 8 pixels in raster order (a run may span rows, so small
//   planes still fill 8 accumulators), each run through every block, one tap load per
//   multiply-add (block_positions), handed out one vector at a time.
template <typename T, typename Out, typename Between>
inline void strip_conv(const T* buf, const Pass& p, const PixelStrip& ps, int64_t b0,
                       int64_t b1, const T* taps, const int64_t* toff, const Out& out,
                       const Between& between) {
  constexpr int64_t V = kLanes<T>;
  const int64_t kk = p.K * p.K, rs = p.S * ps.row_stride(), cs = p.S * ps.Cs;
  const bool done = with_window(p.K, p.S, p.d, [&](auto KT, auto ST) {
    constexpr int K = decltype(KT)::value, S = decltype(ST)::value;
    const int64_t steps = (p.Wo + 7) / 8 * p.Ho * (b1 - b0);
    int64_t step = 0;
    for (int64_t bi = b0; bi < b1; ++bi) {
      const T* bb = buf + (bi - b0) * V;
      const T* tb = taps + bi * kk * V;
      for (int64_t oh = 0; oh < p.Ho; ++oh) {
        for_blocks(p.Wo, [&](int64_t ow0, auto R) {
          constexpr int RV = decltype(R)::value;
          Vec<T> acc[RV];
          window_positions<RV, K, S, kNoMask>(bb + oh * rs + ow0 * cs, ps.Cs,
                                              ps.row_stride(), 0, K, tb, nullptr, acc);
          out(bi, oh, ow0, RV, acc);
          between(step++, steps);
        });
      }
    }
  });
  if (done) return;
  const int64_t runs = (p.Ho * p.Wo + 7) / 8;
  int64_t ph = 0, pw = 0;  // the next position
  for_blocks(p.Ho * p.Wo, [&](int64_t i, auto R) {
    constexpr int RV = decltype(R)::value;
    int64_t base[RV], oh[RV], ow[RV];
    for (int r = 0; r < RV; ++r) {
      oh[r] = ph;
      ow[r] = pw;
      base[r] = ph * rs + pw * cs;
      if (++pw == p.Wo) {
        pw = 0;
        ++ph;
      }
    }
    for (int64_t bi = b0; bi < b1; ++bi) {
      Vec<T> acc[RV];
      block_positions<RV, false>(buf + (bi - b0) * V, kk, taps + bi * kk * V, toff, base, V,
                                 acc);
      for (int r = 0; r < RV; ++r) out(bi, oh[r], ow[r], 1, acc + r);
    }
    between(i / 8, runs);
  });
}

// acc[t][l] += sum over the outputs o of g[o][l] * scratch[o * S + tap t][l]; g packed
// as [Ho][Wo][V]. Float partials per output row, added into the double accumulator.
template <int KT, typename T>
inline void block_wgrad_k(const T* buf, const Pass& p, const T* g, const int64_t* toff,
                          double* acc) {
  constexpr int64_t V = kLanes<T>;
  const int64_t K = KT ? KT : p.K, rs = p.S * p.row_len();
  for (int64_t kh = 0; kh < K; ++kh) {
    for (int64_t kw0 = 0; kw0 < K; kw0 += 8) {
      const int64_t nk = std::min<int64_t>(8, K - kw0);
      const int64_t* to = toff + kh * K + kw0;
      for (int64_t oh = 0; oh < p.Ho; ++oh) {
        Vec<T> a[8];
        for (int j = 0; j < 8; ++j) a[j] = Vec<T>{};
        const T* gr = g + oh * p.Wo * V;
        const T* br = buf + oh * rs * V;
        for (int64_t ow = 0; ow < p.Wo; ++ow) {
          const Vec<T> gv = vload(gr + ow * V);
          const T* bp = br + ow * V;
          if (KT) {
            for (int j = 0; j < (KT < 8 ? KT : 8); ++j) a[j] += gv * vload(bp + to[j] * V);
          } else {
            for (int64_t j = 0; j < nk; ++j) a[j] += gv * vload(bp + to[j] * V);
          }
        }
        for (int64_t j = 0; j < nk; ++j) {
          double* d = acc + (kh * K + kw0 + j) * V;
#pragma omp simd
          for (int64_t l = 0; l < V; ++l) d[l] += a[j][l];
        }
      }
    }
  }
}

// Kernel 3, 5 or 7 at stride 1, dilation 1 (the scratch then holds plain padded rows:
// tap (kh, kw) at kh * row_len + kw), output rows of at least kWindowWgradCols pixels:
// through the register window (padded_window_wgrad); any other pass by block_wgrad_k.
// Shorter rows (7x7: one run of 7 per output row) are slower through the window.
constexpr int64_t kWindowWgradCols = 14;

template <typename T>
inline void block_wgrad(const T* buf, const Pass& p, const T* g, const int64_t* toff,
                        double* acc) {
  with_kernel_size(p.K, [&](auto KT) {
    constexpr int K = decltype(KT)::value;
    if constexpr (K != 0) {
      if (p.S == 1 && p.d == 1 && p.Wo >= kWindowWgradCols) {
        padded_window_wgrad<K, 1>(buf, p.row_len(), g, p.Ho, p.Wo, acc);
        return;
      }
    }
    block_wgrad_k<K>(buf, p, g, toff, acc);
  });
}

// g [Ho][Wo][V] = src(c, off) of the block's output pixels, zero past cb.
template <typename T, typename Src>
inline void pack_block_rows(T* g, int64_t Ho, int64_t Wo, const ChannelBlock& cb,
                            int64_t image, const Src& src) {
  constexpr int64_t V = kLanes<T>;
  for (int64_t i = 0; i < Ho * Wo; ++i) {
    T* dst = g + i * V;
    const int64_t off = image + i * cb.C + cb.c0;
    if (cb.cb == V) {
#pragma omp simd
      for (int64_t l = 0; l < V; ++l) dst[l] = src(cb.c0 + l, off + l);
    } else {
      for (int64_t l = 0; l < V; ++l) dst[l] = l < cb.cb ? src(cb.c0 + l, off + l) : T(0);
    }
  }
}

// Channel blocks of C channels.
template <typename T>
inline int64_t num_blocks(int64_t C) { return (C + kLanes<T> - 1) / kLanes<T>; }
template <typename T>
inline ChannelBlock block_of(int64_t b, int64_t C) {
  const int64_t c0 = b * kLanes<T>;
  return {c0, std::min(kLanes<T>, C - c0), C};
}

// Images per weight-gradient partial of the blocked kernels: a fixed number, so the
// summation order (and the rounding) never depends on the thread count.
constexpr int64_t kImagesPerPartial = 4;

}  // namespace simd
}  // namespace BSNAS_CPU_ISA
}  // namespace cpu
}  // namespace bsnas
