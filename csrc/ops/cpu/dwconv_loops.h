// Depthwise convolution loops of the CPU backend, shared by bsnas::masked_dwconv2d
// and the fused bsnas::bn_act_dwconv2d. Raw-pointer templates over float/double,
// compiled once per instruction set (see kernels_isa.h).
//
// NCHW works plane by plane with row accumulation (for each kernel tap, a contiguous
// saxpy over an output row), which the compiler vectorises at stride 1.
// channels_last works pixel by pixel with the channel loop innermost; the active
// filters are repacked once per call into a tap-major scratch of width*k*k values
// (a few KB) so that loop reads both operands contiguously.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../masked_conv_common.h"

#ifndef BSNAS_CPU_ISA
#error "define BSNAS_CPU_ISA (the instruction-set namespace) before including"
#endif

namespace bsnas {
namespace cpu {
namespace BSNAS_CPU_ISA {

// Planes or rows of about this many multiply-adds make one parallel task.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work_per_item));
}

// Active filters [C, k*k] (rows of the full weight) -> tap-major [k*k, C].
template <typename T>
std::vector<T> pack_taps(const T* w, int64_t C, int64_t kk) {
  std::vector<T> out(static_cast<size_t>(C * kk));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < kk; ++t) out[t * C + c] = w[c * kk + t];
  return out;
}

// A few rows of `len` values computed on demand and kept while they are reused: slot
// key % rows holds the row of `key`, so any `rows` consecutive keys live together.
// get() returns the row of `key`, calling fill(row, key) first if it is not there; the
// pointer is valid until the next get().
template <typename T>
class RowCache {
 public:
  RowCache(int64_t rows, int64_t len)
      : buf_(static_cast<size_t>(rows * len)), tag_(static_cast<size_t>(rows), -1),
        rows_(rows), len_(len) {}
  template <typename Fill>
  const T* get(int64_t key, const Fill& fill) {
    const int64_t slot = key % rows_;
    T* row = buf_.data() + slot * len_;
    if (tag_[slot] != key) {
      fill(row, key);
      tag_[slot] = key;
    }
    return row;
  }
  void clear() { std::fill(tag_.begin(), tag_.end(), int64_t{-1}); }

 private:
  std::vector<T> buf_;
  std::vector<int64_t> tag_;
  int64_t rows_, len_;
};

// One output plane [Ho, Wo] of one channel from its input plane [H, W].
template <typename T>
void conv_plane(const T* xp, const T* wp, T* yp, const DwGeometry& g) {
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    T* yr = yp + oh * g.Wo;
    std::fill(yr, yr + g.Wo, T(0));
    for (int64_t kh = 0; kh < g.K; ++kh) {
      const int64_t ih = oh * g.stride - g.pad + kh * g.dil;
      if (ih < 0 || ih >= g.H) continue;
      const T* xr = xp + ih * g.W;
      for (int64_t kw = 0; kw < g.K; ++kw) {
        const T wv = wp[kh * g.K + kw];
        const int64_t off = kw * g.dil - g.pad;
        int64_t lo, hi;
        valid_out_range(g.W, g.Wo, g.stride, off, &lo, &hi);
        if (g.stride == 1) {
          const T* xs = xr + off;
          for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += wv * xs[ow];
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += wv * xr[ow * g.stride + off];
        }
      }
    }
  }
}

template <typename T>
void forward_nchw(const T* x, const T* w, T* y, const DwGeometry& g) {
  const int64_t kk = g.K * g.K;
  at::parallel_for(0, g.N * g.C, grain_for(g.Ho * g.Wo * kk), [&](int64_t b, int64_t e) {
    for (int64_t nc = b; nc < e; ++nc)
      conv_plane(x + nc * g.H * g.W, w + (nc % g.C) * kk, y + nc * g.Ho * g.Wo, g);
  });
}

struct Identity {
  template <typename T>
  T operator()(int64_t, T v) const { return v; }
};

// One output row (n, oh) of [Wo, C]; `in(c, v)` transforms each input value on read
// (the fused op applies BN + activation there).
// Register tile of the channels_last loops: kOutputs neighbouring outputs x a block of
// 128 bytes of channels, accumulated across all taps before a single store.
template <typename T>
struct NhwcTile {
  static constexpr int64_t kChannels = 128 / sizeof(T);  // 32 floats, 16 doubles
  static constexpr int64_t kOutputs = 4;
};

// One tile: outputs [ow0, ow0 + OB) x channels [c0, c0 + CB) of row (n, oh); CB/OB are
// the full tile sizes at compile time (the common case) or 0 for the ragged edges.
template <int64_t CBT, int64_t OBT, typename T, typename In>
inline void nhwc_tile(const T* x, const T* taps, T* yr, int64_t n, int64_t oh, int64_t ow0,
                      int64_t c0, int64_t cb_rt, int64_t ob_rt, const DwGeometry& g,
                      const In& in) {
  constexpr int64_t CBM = NhwcTile<T>::kChannels, OBM = NhwcTile<T>::kOutputs;
  const int64_t cb = CBT ? CBT : cb_rt, ob = OBT ? OBT : ob_rt, C = g.C;
  T acc[OBM][CBM];
  for (int64_t j = 0; j < OBM; ++j)
    for (int64_t c = 0; c < CBM; ++c) acc[j][c] = T(0);
  for (int64_t kh = 0; kh < g.K; ++kh) {
    const int64_t ih = oh * g.stride - g.pad + kh * g.dil;
    if (ih < 0 || ih >= g.H) continue;
    const T* xr = x + (n * g.H + ih) * g.W * C + c0;
    for (int64_t kw = 0; kw < g.K; ++kw) {
      const T* wt = taps + (kh * g.K + kw) * C + c0;
      for (int64_t j = 0; j < ob; ++j) {
        const int64_t iw = (ow0 + j) * g.stride + kw * g.dil - g.pad;
        if (iw < 0 || iw >= g.W) continue;
        const T* xp = xr + iw * C;
#pragma omp simd
        for (int64_t c = 0; c < cb; ++c) acc[j][c] += wt[c] * in(c0 + c, xp[c]);
      }
    }
  }
  for (int64_t j = 0; j < ob; ++j) {
    T* yp = yr + (ow0 + j) * C + c0;
    for (int64_t c = 0; c < cb; ++c) yp[c] = acc[j][c];
  }
}

// One output row (n, oh) of [Wo, C]; `in(c, v)` transforms each input value on read
// (the fused op applies BN + activation there).
template <typename T, typename In>
void conv_row_nhwc(const T* x, const T* taps, T* yr, int64_t n, int64_t oh,
                   const DwGeometry& g, const In& in) {
  constexpr int64_t CB = NhwcTile<T>::kChannels, OB = NhwcTile<T>::kOutputs;
  for (int64_t c0 = 0; c0 < g.C; c0 += CB) {
    const int64_t cb = std::min(CB, g.C - c0);
    for (int64_t ow0 = 0; ow0 < g.Wo; ow0 += OB) {
      const int64_t ob = std::min(OB, g.Wo - ow0);
      if (cb == CB && ob == OB)
        nhwc_tile<CB, OB>(x, taps, yr, n, oh, ow0, c0, cb, ob, g, in);
      else
        nhwc_tile<0, 0>(x, taps, yr, n, oh, ow0, c0, cb, ob, g, in);
    }
  }
}

template <typename T>
void forward_nhwc(const T* x, const T* w, T* y, const DwGeometry& g) {
  const std::vector<T> taps = pack_taps(w, g.C, g.K * g.K);
  at::parallel_for(0, g.N * g.Ho, grain_for(g.Wo * g.C * g.K * g.K), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row)
      conv_row_nhwc(x, taps.data(), y + row * g.Wo * g.C, row / g.Ho, row % g.Ho, g, Identity{});
  });
}

// grad_x[n, c, i] = sum over taps t with i = o * s + off_t of w[c, t] * gy[n, c, o], for
// one plane: gyp [Ho, Wo] -> gxp [H, W] (overwritten).
template <typename T>
void grad_input_plane(const T* gyp, const T* wp, T* gxp, const DwGeometry& g) {
  std::fill(gxp, gxp + g.H * g.W, T(0));
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    const T* gyr = gyp + oh * g.Wo;
    for (int64_t kh = 0; kh < g.K; ++kh) {
      const int64_t ih = oh * g.stride - g.pad + kh * g.dil;
      if (ih < 0 || ih >= g.H) continue;
      T* gxr = gxp + ih * g.W;
      for (int64_t kw = 0; kw < g.K; ++kw) {
        const T wv = wp[kh * g.K + kw];
        const int64_t off = kw * g.dil - g.pad;
        int64_t lo, hi;
        valid_out_range(g.W, g.Wo, g.stride, off, &lo, &hi);
        if (g.stride == 1) {
          T* gxs = gxr + off;
          for (int64_t ow = lo; ow < hi; ++ow) gxs[ow] += wv * gyr[ow];
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) gxr[ow * g.stride + off] += wv * gyr[ow];
        }
      }
    }
  }
}

template <typename T>
void backward_input_nchw(const T* gy, const T* w, T* gx, const DwGeometry& g) {
  const int64_t kk = g.K * g.K;
  at::parallel_for(0, g.N * g.C, grain_for(g.Ho * g.Wo * kk), [&](int64_t b, int64_t e) {
    for (int64_t nc = b; nc < e; ++nc)
      grad_input_plane(gy + nc * g.Ho * g.Wo, w + (nc % g.C) * kk, gx + nc * g.H * g.W, g);
  });
}

// Gather form: each input row is owned by one task, so no two tasks write one value.
template <typename T>
void backward_input_nhwc(const T* gy, const T* w, T* gx, const DwGeometry& g) {
  const int64_t kk = g.K * g.K, C = g.C;
  const std::vector<T> taps = pack_taps(w, C, kk);
  at::parallel_for(0, g.N * g.H, grain_for(g.W * C * kk), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t n = row / g.H, ih = row % g.H;
      T* gxr = gx + row * g.W * C;
      std::fill(gxr, gxr + g.W * C, T(0));
      for (int64_t kh = 0; kh < g.K; ++kh) {
        const int64_t oh = out_index_for_input(ih, kh * g.dil - g.pad, g.stride, g.Ho);
        if (oh < 0) continue;
        const T* gyr = gy + (n * g.Ho + oh) * g.Wo * C;
        for (int64_t kw = 0; kw < g.K; ++kw) {
          const T* wt = taps.data() + (kh * g.K + kw) * C;
          const int64_t off = kw * g.dil - g.pad;
          for (int64_t iw = 0; iw < g.W; ++iw) {
            const int64_t ow = out_index_for_input(iw, off, g.stride, g.Wo);
            if (ow < 0) continue;
            const T* gyp = gyr + ow * C;
            T* gxp = gxr + iw * C;
            for (int64_t c = 0; c < C; ++c) gxp[c] += wt[c] * gyp[c];
          }
        }
      }
    }
  });
}

// acc[t] += sum over the outputs o of one plane of gy[o] * x[o * s + off_t]: each
// (output row, tap) is summed in T, then added to the accumulator (T or double).
template <typename T, typename Acc>
void weight_grad_plane(const T* gyp, const T* xp, Acc* acc, const DwGeometry& g) {
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    const T* gyr = gyp + oh * g.Wo;
    for (int64_t kh = 0; kh < g.K; ++kh) {
      const int64_t ih = oh * g.stride - g.pad + kh * g.dil;
      if (ih < 0 || ih >= g.H) continue;
      const T* xr = xp + ih * g.W;
      for (int64_t kw = 0; kw < g.K; ++kw) {
        const int64_t off = kw * g.dil - g.pad;
        int64_t lo, hi;
        valid_out_range(g.W, g.Wo, g.stride, off, &lo, &hi);
        T s = 0;
        if (g.stride == 1) {
          const T* xs = xr + off;
#pragma omp simd reduction(+ : s)
          for (int64_t ow = lo; ow < hi; ++ow) s += gyr[ow] * xs[ow];
        } else {
#pragma omp simd reduction(+ : s)
          for (int64_t ow = lo; ow < hi; ++ow) s += gyr[ow] * xr[ow * g.stride + off];
        }
        acc[kh * g.K + kw] += s;
      }
    }
  }
}

// grad_w[c, t] = sum over n and outputs o of gy[n, c, o] * x[n, c, o * s + off_t].
// One task owns whole channels, so the reduction needs no atomics.
template <typename T>
void backward_weight_nchw(const T* gy, const T* x, T* gw, const DwGeometry& g) {
  const int64_t kk = g.K * g.K;
  at::parallel_for(0, g.C, grain_for(g.N * g.Ho * g.Wo * kk), [&](int64_t b, int64_t e) {
    std::vector<T> acc(static_cast<size_t>(kk));
    for (int64_t c = b; c < e; ++c) {
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t n = 0; n < g.N; ++n)
        weight_grad_plane(gy + (n * g.C + c) * g.Ho * g.Wo, x + (n * g.C + c) * g.H * g.W,
                          acc.data(), g);
      for (int64_t t = 0; t < kk; ++t) gw[c * kk + t] = acc[t];
    }
  });
}

// channels_last: tasks own blocks of channels; each accumulates a tap-major
// [k*k, block] tile over every pixel, channel loop innermost.
template <typename T>
void backward_weight_nhwc(const T* gy, const T* x, T* gw, const DwGeometry& g) {
  const int64_t kk = g.K * g.K, C = g.C;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block = std::max<int64_t>(8, (C + 2 * threads - 1) / (2 * threads));
  const int64_t nblocks = (C + block - 1) / block;
  at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
    std::vector<T> acc(static_cast<size_t>(kk * block));
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t c0 = blk * block, cb = std::min(block, C - c0);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          const T* gyr = gy + ((n * g.Ho + oh) * g.Wo) * C + c0;
          for (int64_t kh = 0; kh < g.K; ++kh) {
            const int64_t ih = oh * g.stride - g.pad + kh * g.dil;
            if (ih < 0 || ih >= g.H) continue;
            const T* xr = x + ((n * g.H + ih) * g.W) * C + c0;
            for (int64_t kw = 0; kw < g.K; ++kw) {
              const int64_t off = kw * g.dil - g.pad;
              int64_t lo, hi;
              valid_out_range(g.W, g.Wo, g.stride, off, &lo, &hi);
              T* a = acc.data() + (kh * g.K + kw) * block;
              for (int64_t ow = lo; ow < hi; ++ow) {
                const T* gyp = gyr + ow * C;
                const T* xp = xr + (ow * g.stride + off) * C;
                for (int64_t c = 0; c < cb; ++c) a[c] += gyp[c] * xp[c];
              }
            }
          }
        }
      }
      for (int64_t c = 0; c < cb; ++c)
        for (int64_t t = 0; t < kk; ++t) gw[(c0 + c) * kk + t] = acc[t * block + c];
    }
  });
}

}  // namespace BSNAS_CPU_ISA
}  // namespace cpu
}  // namespace bsnas
