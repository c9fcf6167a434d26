// NCHW depthwise convolution of single channel planes through a zero-padded scratch
// copy: with the borders materialised as zeros, every tap is a plain strided saxpy or dot
// product over an output row, with no bounds checks or index divisions in the loops
// (which dominate on the small planes of late stages: 14x14, 7x7). The kernel size is
// a template parameter for 3, 5 and 7 so the tap loops unroll; 0 means "read g.K".
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
namespace plane {

struct Padded {
  int64_t Hp, Wp;
  explicit Padded(const DwGeometry& g) : Hp(g.H + 2 * g.pad), Wp(g.W + 2 * g.pad) {}
  int64_t size() const { return Hp * Wp; }
};

// buf[Hp, Wp] = zero border + in(x[H, W]).
template <typename T, typename In>
inline void pad(const T* x, T* buf, const DwGeometry& g, const Padded& p, const In& in) {
  std::fill(buf, buf + g.pad * p.Wp, T(0));
  for (int64_t h = 0; h < g.H; ++h) {
    T* row = buf + (h + g.pad) * p.Wp;
    std::fill(row, row + g.pad, T(0));
    const T* xr = x + h * g.W;
    for (int64_t w = 0; w < g.W; ++w) row[g.pad + w] = in(xr[w]);
    std::fill(row + g.pad + g.W, row + p.Wp, T(0));
  }
  std::fill(buf + (g.H + g.pad) * p.Wp, buf + p.size(), T(0));
}

// y[Ho, Wo] = depthwise conv of the padded plane with the k*k filter w.
template <int KT, typename T>
inline void conv(const T* buf, const T* w, T* y, const DwGeometry& g, const Padded& p) {
  const int64_t K = KT ? KT : g.K, s = g.stride, d = g.dil, Wo = g.Wo;
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    T* yr = y + oh * Wo;
    std::fill(yr, yr + Wo, T(0));
    for (int64_t kh = 0; kh < K; ++kh) {
      const T* br = buf + (oh * s + kh * d) * p.Wp;
      for (int64_t kw = 0; kw < K; ++kw) {
        const T wv = w[kh * K + kw];
        const T* bs = br + kw * d;
        if (s == 1) {
#pragma omp simd
          for (int64_t ow = 0; ow < Wo; ++ow) yr[ow] += wv * bs[ow];
        } else {
          for (int64_t ow = 0; ow < Wo; ++ow) yr[ow] += wv * bs[ow * s];
        }
      }
    }
  }
}

// gbuf[Hp, Wp] = transposed convolution of gy[Ho, Wo] (the padded input gradient).
template <int KT, typename T>
inline void conv_transpose(const T* gy, const T* w, T* gbuf, const DwGeometry& g,
                           const Padded& p) {
  const int64_t K = KT ? KT : g.K, s = g.stride, d = g.dil, Wo = g.Wo;
  std::fill(gbuf, gbuf + p.size(), T(0));
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    const T* gr = gy + oh * Wo;
    for (int64_t kh = 0; kh < K; ++kh) {
      T* br = gbuf + (oh * s + kh * d) * p.Wp;
      for (int64_t kw = 0; kw < K; ++kw) {
        const T wv = w[kh * K + kw];
        T* bs = br + kw * d;
        if (s == 1) {
#pragma omp simd
          for (int64_t ow = 0; ow < Wo; ++ow) bs[ow] += wv * gr[ow];
        } else {
          for (int64_t ow = 0; ow < Wo; ++ow) bs[ow * s] += wv * gr[ow];
        }
      }
    }
  }
}

// acc[t] += sum over outputs of gy[o] * buf[o * s + off_t] (the weight gradient).
template <int KT, typename T, typename Acc>
inline void correlate(const T* gy, const T* buf, Acc* acc, const DwGeometry& g,
                      const Padded& p) {
  const int64_t K = KT ? KT : g.K, s = g.stride, d = g.dil, Wo = g.Wo;
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    const T* gr = gy + oh * Wo;
    for (int64_t kh = 0; kh < K; ++kh) {
      const T* br = buf + (oh * s + kh * d) * p.Wp;
      for (int64_t kw = 0; kw < K; ++kw) {
        const T* bs = br + kw * d;
        Acc sum = 0;
        if (s == 1) {
#pragma omp simd reduction(+ : sum)
          for (int64_t ow = 0; ow < Wo; ++ow) sum += gr[ow] * bs[ow];
        } else {
#pragma omp simd reduction(+ : sum)
          for (int64_t ow = 0; ow < Wo; ++ow) sum += gr[ow] * bs[ow * s];
        }
        acc[kh * K + kw] += sum;
      }
    }
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

struct Same {
  template <typename T>
  T operator()(T v) const { return v; }
};

inline int64_t grain(int64_t work) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work));
}

template <typename T>
void forward(const T* x, const T* w, T* y, const DwGeometry& g) {
  const Padded p(g);
  const int64_t kk = g.K * g.K;
  with_kernel_size(g.K, [&](auto KT) {
    at::parallel_for(0, g.N * g.C, grain(g.Ho * g.Wo * kk), [&](int64_t b, int64_t e) {
      std::vector<T> buf(static_cast<size_t>(p.size()));
      for (int64_t nc = b; nc < e; ++nc) {
        pad(x + nc * g.H * g.W, buf.data(), g, p, Same{});
        conv<KT()>(buf.data(), w + (nc % g.C) * kk, y + nc * g.Ho * g.Wo, g, p);
      }
    });
  });
}

template <typename T>
void backward_input(const T* gy, const T* w, T* gx, const DwGeometry& g) {
  const Padded p(g);
  const int64_t kk = g.K * g.K;
  with_kernel_size(g.K, [&](auto KT) {
    at::parallel_for(0, g.N * g.C, grain(g.Ho * g.Wo * kk), [&](int64_t b, int64_t e) {
      std::vector<T> buf(static_cast<size_t>(p.size()));
      for (int64_t nc = b; nc < e; ++nc) {
        conv_transpose<KT()>(gy + nc * g.Ho * g.Wo, w + (nc % g.C) * kk, buf.data(), g, p);
        T* gxp = gx + nc * g.H * g.W;
        for (int64_t h = 0; h < g.H; ++h)
          std::copy_n(buf.data() + (h + g.pad) * p.Wp + g.pad, g.W, gxp + h * g.W);
      }
    });
  });
}

// One task owns whole channels (no atomics); fixed summation order per channel.
template <typename T>
void backward_weight(const T* gy, const T* x, T* gw, const DwGeometry& g) {
  const Padded p(g);
  const int64_t kk = g.K * g.K;
  with_kernel_size(g.K, [&](auto KT) {
    at::parallel_for(0, g.C, grain(g.N * g.Ho * g.Wo * kk), [&](int64_t b, int64_t e) {
      std::vector<T> buf(static_cast<size_t>(p.size()));
      std::vector<T> acc(static_cast<size_t>(kk));
      for (int64_t c = b; c < e; ++c) {
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t n = 0; n < g.N; ++n) {
          const int64_t nc = n * g.C + c;
          pad(x + nc * g.H * g.W, buf.data(), g, p, Same{});
          correlate<KT()>(gy + nc * g.Ho * g.Wo, buf.data(), acc.data(), g, p);
        }
        std::copy(acc.begin(), acc.end(), gw + c * kk);
      }
    });
  });
}

}  // namespace plane
}  // namespace BSNAS_CPU_ISA
}  // namespace cpu
}  // namespace bsnas
