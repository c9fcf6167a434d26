#pragma once
// CPU forward of bsnas::bn_act_dwconv2d in one pass per plane (NCHW) or output row
// (channels_last): BN + activation are applied as the input is read, and the output's
// per-channel sum and sum of squares are accumulated while it is still in cache.
// Partial sums are kept per plane / per row in double and reduced in a fixed order, so
// results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "dwconv_loops.h"

namespace bsnas {
namespace cpu {
namespace BSNAS_CPU_ISA {

constexpr const char* kBnActFwd = "bn_act_dwconv2d";

template <typename T>
struct BnAct {
  const T* scale;
  const T* shift;
  int64_t act;
  T operator()(int64_t c, T v) const { return activate(v * scale[c] + shift[c], act); }
};

template <typename T>
void fused_nchw(const T* z, const T* w, const BnAct<T>& in, T* y, double* psum, double* psq,
                const DwGeometry& g) {
  const int64_t kk = g.K * g.K, hw = g.H * g.W, ohw = g.Ho * g.Wo;
  at::parallel_for(0, g.N * g.C, grain_for(ohw * kk), [&](int64_t b, int64_t e) {
    std::vector<T> a(static_cast<size_t>(hw));  // this plane's BN + act input
    for (int64_t nc = b; nc < e; ++nc) {
      const int64_t c = nc % g.C;
      const T* zp = z + nc * hw;
      for (int64_t i = 0; i < hw; ++i) a[i] = in(c, zp[i]);
      T* yp = y + nc * ohw;
      conv_plane(a.data(), w + c * kk, yp, g);
      double s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
      for (int64_t i = 0; i < ohw; ++i) {
        s += yp[i];
        q += double(yp[i]) * yp[i];
      }
      psum[nc] = s;
      psq[nc] = q;
    }
  });
}

template <typename T>
void fused_nhwc(const T* z, const T* w, const BnAct<T>& in, T* y, double* psum, double* psq,
                const DwGeometry& g) {
  const int64_t C = g.C;
  const std::vector<T> taps = pack_taps(w, C, g.K * g.K);
  at::parallel_for(0, g.N * g.Ho, grain_for(g.Wo * C * g.K * g.K), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      T* yr = y + row * g.Wo * C;
      conv_row_nhwc(z, taps.data(), yr, row / g.Ho, row % g.Ho, g, in);
      double* s = psum + row * C;
      double* q = psq + row * C;
      std::fill(s, s + C, 0.0);
      std::fill(q, q + C, 0.0);
      for (int64_t ow = 0; ow < g.Wo; ++ow)
        for (int64_t c = 0; c < C; ++c) {
          const double v = yr[ow * C + c];
          s[c] += v;
          q[c] += v * v;
        }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_dw_forward(
    const at::Tensor& z_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
    const at::Tensor& weight_in, int64_t width, int64_t stride, int64_t padding,
    int64_t dilation, int64_t act) {
  const DwGeometry g = check_dw_args(kBnActFwd, z_in, weight_in, width, stride, padding, dilation);
  check_affine_act(kBnActFwd, z_in, scale_in, shift_in, width, act);
  const auto fmt = compute_format(z_in);
  const at::Tensor z = z_in.contiguous(fmt);
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  at::Tensor y = at::empty({g.N, g.C, g.Ho, g.Wo}, z.options().memory_format(fmt));
  // Partial sums: one slot per (n, c) plane (NCHW) or per (n, oh) row x channel.
  const int64_t slots = g.channels_last ? g.N * g.Ho : g.N;
  std::vector<double> psum(static_cast<size_t>(slots * g.C)), psq(psum.size());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), kBnActFwd, [&] {
    const BnAct<scalar_t> in{scale.const_data_ptr<scalar_t>(), shift.const_data_ptr<scalar_t>(),
                             act};
    const auto* zp = z.const_data_ptr<scalar_t>();
    const auto* wp = weight.const_data_ptr<scalar_t>();
    auto* yp = y.mutable_data_ptr<scalar_t>();
    if (y.numel() == 0) return;
    if (g.channels_last) fused_nhwc(zp, wp, in, yp, psum.data(), psq.data(), g);
    else fused_nchw(zp, wp, in, yp, psum.data(), psq.data(), g);
  });
  at::Tensor sum = at::empty({g.C}, z.options()), sumsq = at::empty({g.C}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), kBnActFwd, [&] {
    auto* s = sum.mutable_data_ptr<scalar_t>();
    auto* q = sumsq.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < g.C; ++c) {
      double a = 0, b = 0;
      for (int64_t i = 0; i < slots; ++i) {
        a += psum[i * g.C + c];
        b += psq[i * g.C + c];
      }
      s[c] = static_cast<scalar_t>(a);
      q[c] = static_cast<scalar_t>(b);
    }
  });
  return {y, sum, sumsq};
}

}  // namespace BSNAS_CPU_ISA
}  // namespace cpu
}  // namespace bsnas
