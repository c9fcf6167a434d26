#pragma once
// CPU kernels of bsnas::bn_act_dwconv2d and its backward, on the depthwise engine of
// dwconv_passes.h, fused like the CUDA ones.
//
// Forward: BN + activation are applied as the input is packed into the convolution's
// scratch, and the output's per-channel sum and sum of squares are accumulated (in
// double, and returned as float64) while it is still in cache.
//
// Backward: the upstream gradient gyt = grad_y + grad_sum[c] + 2 * y * grad_sumsq[c] is
// formed while packing, and the input a = act(z * scale + shift) again for the weight
// gradient: never as tensors. The input-gradient pass ends in the BN-activation
// backward: grad_z = gu * scale with gu = grad_a * act'(u), and the grad_scale /
// grad_shift partials sum(gu * z), sum(gu).
//
// Partial sums live per plane (NCHW) or per (image, channel block) (channels_last) in
// double and are reduced in a fixed order, so results do not depend on the number of
// threads.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "bn_act_kernel.h"
#include "channel_stats_kernel.h"
#include "dwconv_passes.h"

namespace bsnas {
namespace cpu {
namespace BSNAS_CPU_ISA {

constexpr const char* kBnActFwd = "bn_act_dwconv2d";
constexpr const char* kBnActBwd = "bn_act_dwconv2d_backward";

// a = act(z * scale[c] + shift[c]): (c, offset) for channels_last, and per plane.
template <int A, typename T>
struct BnAct {
  const T* z;
  const T* scale;
  const T* shift;
  T operator()(int64_t c, int64_t off) const { return activate(z[off] * scale[c] + shift[c], A); }
  void prefetch(int64_t off, int64_t n) const { simd::prefetch_l2(z + off, n); }
};
template <int A, typename T>
struct BnActPlane {
  const T* z;
  T sc, sh;
  T operator()(int64_t i) const { return activate(z[i] * sc + sh, A); }
};

// The upstream gradient of y including the statistics outputs: grad_y + grad_sum[c] +
// gsq2[c] * y with gsq2 = 2 * grad_sumsq (y is not read when every gsq2 is 0).
template <bool UseY, typename T>
struct GradY {
  const T* gy;
  const T* y;
  const T* gsum;
  const T* gsq2;
  T operator()(int64_t c, int64_t off) const {
    if constexpr (UseY) return gy[off] + gsum[c] + gsq2[c] * y[off];
    else return gy[off] + gsum[c];
  }
  void prefetch(int64_t off, int64_t n) const {
    simd::prefetch_l2(gy + off, n);
    if constexpr (UseY) simd::prefetch_l2(y + off, n);
  }
};
template <bool UseY, typename T>
struct GradYPlane {
  const T* gy;
  const T* y;
  T gs, g2;
  T operator()(int64_t i) const {
    if constexpr (UseY) return gy[i] + gs + g2 * y[i];
    else return gy[i] + gs;
  }
};

// y = conv(act(z * scale + shift)) and y's per-channel sum and sum of squares (double).
template <typename T>
void fused_forward(const T* z, const T* scale, const T* shift, const T* w, T* y, int64_t act,
                   double* sum, double* sumsq, const DwGeometry& g) {
  using namespace simd;
  constexpr int64_t V = kLanes<T>;
  const int64_t kk = g.K * g.K;
  with_act(act, [&]<int A>() {
    if (g.channels_last) {
      const Pass p = Pass::forward(g, 1);
      const BlockPlan bp = block_plan<T>(p, g.N, g.C);
      std::vector<double> psum(static_cast<size_t>(bp.slots(g.N) * V), 0.0), psq(psum.size(), 0.0);
      block_pass<T>(p, bp, g.N, g.C, g.H * g.W * g.C, w, false, BnAct<A, T>{z, scale, shift},
                    [&](int64_t n, int64_t slot, const ChannelBlock& cb, int64_t oh, int64_t ow,
                        int R, const Vec<T>* acc) {
                      store_run(y, cb, (n * g.Ho + oh) * g.Wo + ow, R, acc);
                      double* s = psum.data() + slot * V;
                      double* q = psq.data() + slot * V;
                      for (int r = 0; r < R; ++r) {
                        const Vec<T>& v = acc[r];
#pragma omp simd
                        for (int64_t l = 0; l < V; ++l) {
                          const double d = v[l];
                          s[l] += d;
                          q[l] += d * d;
                        }
                      }
                    });
      reduce_parts(psum, bp.parts(g.N), bp.nb * V, g.C, sum);
      reduce_parts(psq, bp.parts(g.N), bp.nb * V, g.C, sumsq);
    } else {
      const Pass p = Pass::forward(g, V);
      const int64_t ohw = g.Ho * g.Wo;
      std::vector<double> psum(static_cast<size_t>(g.N * g.C), 0.0), psq(psum.size(), 0.0);
      plane_pass<T>(
          p, g.N * g.C,
          [&](int64_t nc) {
            const int64_t c = nc % g.C;
            return BnActPlane<A, T>{z + nc * g.H * g.W, scale[c], shift[c]};
          },
          [&](int64_t nc, T* wf) { std::copy_n(w + (nc % g.C) * kk, kk, wf); },
          [&](int64_t nc) { return y + nc * ohw; },
          [&](int64_t nc, const T* yp) { sum_sumsq(yp, ohw, psum[nc], psq[nc]); });
      reduce_parts(psum, g.N, g.C, g.C, sum);
      reduce_parts(psq, g.N, g.C, g.C, sumsq);
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
  const auto f64 = z.options().dtype(at::kDouble);
  at::Tensor sum = at::empty({g.C}, f64), sumsq = at::empty({g.C}, f64);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), kBnActFwd, [&] {
    using T = scalar_t;
    auto* s = sum.mutable_data_ptr<double>();
    auto* q = sumsq.mutable_data_ptr<double>();
    if (y.numel() > 0)
      fused_forward(z.const_data_ptr<T>(), scale.const_data_ptr<T>(), shift.const_data_ptr<T>(),
                    weight.const_data_ptr<T>(), y.mutable_data_ptr<T>(), act, s, q, g);
    else
      std::fill(s, s + g.C, 0.0), std::fill(q, q + g.C, 0.0);
  });
  return {y, sum, sumsq};
}

// ------------------------------------------------------------------------ backward

template <int A, bool UseY, typename T>
void fused_backward(const T* gy, const T* y, const T* gsum, const T* gsq2, const T* z,
                    const T* scale, const T* shift, const T* w, T* gz, T* gw, T* gscale,
                    T* gshift, const DwGeometry& g) {
  using namespace simd;
  constexpr int64_t V = kLanes<T>;
  const int64_t kk = g.K * g.K, hw = g.H * g.W, ohw = g.Ho * g.Wo;
  if (g.channels_last) {
    const Pass p = Pass::input_grad(g, 1);
    const BlockPlan bp = block_plan<T>(p, g.N, g.C);
    std::vector<double> ps(static_cast<size_t>(bp.slots(g.N) * V), 0.0), pb(ps.size(), 0.0);
    const GradY<UseY, T> gyt{gy, y, gsum, gsq2};
    block_pass<T>(p, bp, g.N, g.C, ohw * g.C, w, true, gyt,
                  [&](int64_t n, int64_t slot, const ChannelBlock& cb, int64_t ih, int64_t iw,
                      int R, const Vec<T>* acc) {
                    const int64_t o0 = ((n * g.H + ih) * g.W + iw) * g.C + cb.c0;
                    double* s = ps.data() + slot * V;
                    double* b = pb.data() + slot * V;
                    const T *sc = scale + cb.c0, *sh = shift + cb.c0;
                    for (int r = 0; r < R; ++r) {
                      const Vec<T>& v = acc[r];
                      const T* zo = z + o0 + r * g.C;
                      T* go = gz + o0 + r * g.C;
                      if (cb.cb == V) {  // a whole vector: one fixed-length vector loop
#pragma omp simd
                        for (int64_t l = 0; l < V; ++l)
                          go[l] = bn_act_grad<A>(v[l], zo[l], sc[l], sh[l], s[l], b[l]);
                      } else {
                        for (int64_t l = 0; l < cb.cb; ++l)
                          go[l] = bn_act_grad<A>(v[l], zo[l], sc[l], sh[l], s[l], b[l]);
                      }
                    }
                  });
    reduce_parts(ps, bp.parts(g.N), bp.nb * V, g.C, gscale);
    reduce_parts(pb, bp.parts(g.N), bp.nb * V, g.C, gshift);
    block_weight_grad(g, BnAct<A, T>{z, scale, shift}, gyt, gw);
  } else {
    std::vector<double> ps(static_cast<size_t>(g.N * g.C), 0.0), pb(ps.size(), 0.0);
    const Pass p = Pass::input_grad(g, V);
    plane_pass<T>(
        p, g.N * g.C,
        [&](int64_t nc) {
          const int64_t c = nc % g.C;
          return GradYPlane<UseY, T>{gy + nc * ohw, y + nc * ohw, gsum[c], gsq2[c]};
        },
        [&](int64_t nc, T* wf) {
          const T* wc = w + (nc % g.C) * kk;
          for (int64_t t = 0; t < kk; ++t) wf[t] = wc[kk - 1 - t];
        },
        [&](int64_t nc) { return gz + nc * hw; },  // grad_a first, then grad_z in place
        [&](int64_t nc, T* gp) {
          const int64_t c = nc % g.C;
          const T* zp = z + nc * hw;
          const T sc = scale[c], sh = shift[c];
          double s = 0, b = 0;
#pragma omp simd reduction(+ : s, b)
          for (int64_t i = 0; i < hw; ++i) gp[i] = bn_act_grad<A>(gp[i], zp[i], sc, sh, s, b);
          ps[nc] = s;
          pb[nc] = b;
        });
    reduce_parts(ps, g.N, g.C, g.C, gscale);
    reduce_parts(pb, g.N, g.C, g.C, gshift);
    plane_weight_grad(
        g,
        [&](int64_t nc) {
          const int64_t c = nc % g.C;
          return BnActPlane<A, T>{z + nc * hw, scale[c], shift[c]};
        },
        [&](int64_t nc) {
          const int64_t c = nc % g.C;
          return GradYPlane<UseY, T>{gy + nc * ohw, y + nc * ohw, gsum[c], gsq2[c]};
        },
        gw);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_dw_backward(
    const at::Tensor& grad_y, const at::Tensor& grad_sum, const at::Tensor& grad_sumsq,
    const at::Tensor& z_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
    const at::Tensor& weight_in, const at::Tensor& y_in, int64_t width, int64_t stride,
    int64_t padding, int64_t dilation, int64_t act) {
  const DwGeometry g =
      check_bn_act_dw_backward_args(kBnActBwd, grad_y, grad_sum, grad_sumsq, z_in, scale_in,
                                    shift_in, weight_in, y_in, width, stride, padding,
                                    dilation, act);
  const auto fmt = compute_format(z_in);
  const at::Tensor z = z_in.contiguous(fmt);
  const at::Tensor gy = grad_y.contiguous(fmt), y = y_in.contiguous(fmt);
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const at::Tensor gsum64 = grad_sum.contiguous(), gsq64 = grad_sumsq.contiguous();
  at::Tensor gz = at::empty_like(z, z.options().memory_format(fmt));
  at::Tensor gscale = at::empty({g.C}, z.options()), gshift = at::empty({g.C}, z.options());
  // Full-width gradient; the passes write rows [0, width) in full.
  at::Tensor gw = weight_grad_outside_zeroed(weight, g.C, g.K * g.K);
  if (z.numel() == 0) return {gz, gscale.zero_(), gshift.zero_(), gw.zero_()};  // all padding
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), kBnActBwd, [&] {
    using T = scalar_t;
    // The float64 statistics' gradients in z's dtype, doubled for the sum of squares
    // (plain loops over [C]: no ATen casts on the host path); the accumulated gradients
    // of scale and shift start at zero.
    const double* gs64 = gsum64.const_data_ptr<double>();
    const double* gq64 = gsq64.const_data_ptr<double>();
    std::vector<T> gsum_t(static_cast<size_t>(g.C)), gsq2(gsum_t.size());
    bool use_y = false;
    for (int64_t c = 0; c < g.C; ++c) {
      gsum_t[c] = static_cast<T>(gs64[c]);
      gsq2[c] = T(2) * static_cast<T>(gq64[c]);
      use_y = use_y || gsq2[c] != T(0);
    }
    std::fill_n(gscale.mutable_data_ptr<T>(), g.C, T(0));
    std::fill_n(gshift.mutable_data_ptr<T>(), g.C, T(0));
    simd::with_act(act, [&]<int A>() {
      const auto run = [&]<bool UseY>() {
        fused_backward<A, UseY>(gy.const_data_ptr<T>(), y.const_data_ptr<T>(),
                                gsum_t.data(), gsq2.data(), z.const_data_ptr<T>(),
                                scale.const_data_ptr<T>(), shift.const_data_ptr<T>(),
                                weight.const_data_ptr<T>(), gz.mutable_data_ptr<T>(),
                                gw.mutable_data_ptr<T>(), gscale.mutable_data_ptr<T>(),
                                gshift.mutable_data_ptr<T>(), g);
      };
      if (use_y) run.template operator()<true>();
      else run.template operator()<false>();
    });
  });
  return {gz, gscale, gshift, gw};
}

}  // namespace BSNAS_CPU_ISA
}  // namespace cpu
}  // namespace bsnas
