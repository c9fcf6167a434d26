#pragma once
// CPU kernels of bsnas::bn_act_dwconv2d and its backward, fused like the CUDA ones.
//
// Forward: one pass per plane (NCHW) or output row (channels_last): BN + activation are
// applied as the input is read, and the output's per-channel sum and sum of squares are
// accumulated while it is still in cache.
//
// Backward: the upstream gradient gyt = grad_y + grad_sum[c] + 2 * y * grad_sumsq[c] and
// the input a = act(z * scale + shift) are formed where read, into per-task scratch
// (a plane, or a few rows kept in a RowCache), never as tensors. NCHW: one task per
// plane computes its grad_weight partial, grad_a (scatter within the plane), grad_z and
// the grad_scale / grad_shift partials. channels_last: tasks over input rows compute
// grad_a in gather form, then grad_z and per-row grad_scale / grad_shift partials;
// tasks over channel blocks reduce grad_weight over every pixel.
//
// Partial sums are kept per plane / row in double and reduced in a fixed order (per
// channel, the order never depends on how work is split), so results do not depend on
// the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "dwconv_loops.h"

namespace bsnas {
namespace cpu {
namespace BSNAS_CPU_ISA {

constexpr const char* kBnActFwd = "bn_act_dwconv2d";
constexpr const char* kBnActBwd = "bn_act_dwconv2d_backward";

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

// ------------------------------------------------------------------------ backward

// Calls fn.template operator()<A>() with the activation code as a compile-time constant.
template <typename Fn>
void with_act(int64_t act, const Fn& fn) {
  if (act == kActReLU) fn.template operator()<kActReLU>();
  else if (act == kActReLU6) fn.template operator()<kActReLU6>();
  else fn.template operator()<kActIdentity>();
}

// The upstream gradient of y including the statistics outputs: grad_y + grad_sum[c] +
// gsq2[c] * y with gsq2 = 2 * grad_sumsq (y is not read when every gsq2 is 0).
template <typename T>
struct GradY {
  const T* gsum;
  const T* gsq2;
  bool use_y;
  // `n` values of channels c0, c0 + 1, ... (channels_last) or of channel c0 (NCHW:
  // cstep = 0) from grad_y / y at gyp / yp into dst.
  void fill(T* dst, const T* gyp, const T* yp, int64_t n, int64_t c0, int64_t cstep) const {
    if (use_y) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t c = c0 + i * cstep;
        dst[i] = gyp[i] + gsum[c] + gsq2[c] * yp[i];
      }
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = gyp[i] + gsum[c0 + i * cstep];
    }
  }
};

// grad_z = gu * scale and the (grad_scale, grad_shift) partials += (gu * z, gu) over `n`
// inputs, where gu = ga * act'(z * scale + shift): of channel c0 (CS = 0, one partial
// pair) or of channels c0, c0 + 1, ... (CS = 1, one partial pair per channel).
template <int A, int CS, typename T>
void bn_act_input_grad(const T* ga, const T* zp, const BnAct<T>& in, T* gzp, double* ps,
                       double* pb, int64_t n, int64_t c0) {
  if constexpr (CS == 0) {
    const T sc = in.scale[c0], sh = in.shift[c0];
    double s = 0, b = 0;
    for (int64_t i = 0; i < n; ++i) {
      const T zv = zp[i];
      const T u = zv * sc + sh;  // as BnAct computes it
      const T gu = act_passes(u, A) ? ga[i] : T(0);
      gzp[i] = gu * sc;
      s += double(gu) * double(zv);
      b += double(gu);
    }
    *ps += s;
    *pb += b;
  } else {
    const T* sc = in.scale + c0;
    const T* sh = in.shift + c0;
    for (int64_t i = 0; i < n; ++i) {
      const T zv = zp[i];
      const T u = zv * sc[i] + sh[i];
      const T gu = act_passes(u, A) ? ga[i] : T(0);
      gzp[i] = gu * sc[i];
      ps[i] += double(gu) * double(zv);
      pb[i] += double(gu);
    }
  }
}

// NCHW: one task per plane (n, c). Writes grad_z and the plane's partials: pw [N*C, kk]
// (grad_weight), ps / pb [N*C] (grad_scale / grad_shift).
template <typename T>
void bn_act_bwd_nchw(const T* gy, const T* y, const T* z, const T* w, const BnAct<T>& in,
                     const GradY<T>& gyt, T* gz, double* pw, double* ps, double* pb,
                     const DwGeometry& g) {
  const int64_t kk = g.K * g.K, hw = g.H * g.W, ohw = g.Ho * g.Wo;
  at::parallel_for(0, g.N * g.C, grain_for(2 * ohw * kk), [&](int64_t b, int64_t e) {
    std::vector<T> gt(static_cast<size_t>(ohw)), a(static_cast<size_t>(hw)),
        ga(static_cast<size_t>(hw));
    std::vector<double> acc(static_cast<size_t>(kk));
    for (int64_t nc = b; nc < e; ++nc) {
      const int64_t c = nc % g.C;
      const T* zp = z + nc * hw;
      gyt.fill(gt.data(), gy + nc * ohw, y + nc * ohw, ohw, c, 0);
      for (int64_t i = 0; i < hw; ++i) a[i] = in(c, zp[i]);
      std::fill(acc.begin(), acc.end(), 0.0);
      weight_grad_plane(gt.data(), a.data(), acc.data(), g);
      std::copy(acc.begin(), acc.end(), pw + nc * kk);
      grad_input_plane(gt.data(), w + c * kk, ga.data(), g);
      ps[nc] = pb[nc] = 0.0;
      with_act(in.act, [&]<int A>() {
        bn_act_input_grad<A, 0>(ga.data(), zp, in, gz + nc * hw, ps + nc, pb + nc, hw, c);
      });
    }
  });
}

// channels_last grad_z and the per-input-row partials ps / pb [N*H, C]: one task per
// input row (n, ih), grad_a in gather form from a RowCache of gyt output rows.
template <typename T>
void bn_act_bwd_input_nhwc(const T* gy, const T* y, const T* z, const T* w,
                           const BnAct<T>& in, const GradY<T>& gyt, T* gz, double* ps,
                           double* pb, const DwGeometry& g) {
  const int64_t kk = g.K * g.K, C = g.C;
  const std::vector<T> taps = pack_taps(w, C, kk);
  // The output rows read by one input row are consecutive, at most this many.
  const int64_t cache_rows = (g.K - 1) * g.dil / g.stride + 2;
  at::parallel_for(0, g.N * g.H, grain_for(g.W * C * kk), [&](int64_t b, int64_t e) {
    RowCache<T> rows(cache_rows, g.Wo * C);
    std::vector<T> ga(static_cast<size_t>(g.W * C));
    const auto fill = [&](T* dst, int64_t key) {  // key = n * Ho + oh
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        const int64_t o = (key * g.Wo + ow) * C;
        gyt.fill(dst + ow * C, gy + o, y + o, C, 0, 1);
      }
    };
    for (int64_t row = b; row < e; ++row) {
      const int64_t n = row / g.H, ih = row % g.H;
      std::fill(ga.begin(), ga.end(), T(0));
      for (int64_t kh = 0; kh < g.K; ++kh) {
        const int64_t oh = out_index_for_input(ih, kh * g.dil - g.pad, g.stride, g.Ho);
        if (oh < 0) continue;
        const T* gr = rows.get(n * g.Ho + oh, fill);
        for (int64_t kw = 0; kw < g.K; ++kw) {
          const T* wt = taps.data() + (kh * g.K + kw) * C;
          const int64_t off = kw * g.dil - g.pad;
          for (int64_t iw = 0; iw < g.W; ++iw) {
            const int64_t ow = out_index_for_input(iw, off, g.stride, g.Wo);
            if (ow < 0) continue;
            const T* gp = gr + ow * C;
            T* gap = ga.data() + iw * C;
            for (int64_t c = 0; c < C; ++c) gap[c] += wt[c] * gp[c];
          }
        }
      }
      double* s = ps + row * C;
      double* bb = pb + row * C;
      std::fill(s, s + C, 0.0);
      std::fill(bb, bb + C, 0.0);
      const T* zr = z + row * g.W * C;
      T* gzr = gz + row * g.W * C;
      with_act(in.act, [&]<int A>() {
        for (int64_t iw = 0; iw < g.W; ++iw)
          bn_act_input_grad<A, 1>(ga.data() + iw * C, zr + iw * C, in, gzr + iw * C, s, bb, C,
                                  0);
      });
    }
  });
}

// channels_last grad_weight: tasks own blocks of channels and accumulate, per output
// row, a tap-major [k*k, block] tile in T from a gyt row and a RowCache of input rows
// a = act(z * scale + shift), added into a double tile after each row.
template <typename T>
void bn_act_bwd_weight_nhwc(const T* gy, const T* y, const T* z, const BnAct<T>& in,
                            const GradY<T>& gyt, T* gw, const DwGeometry& g) {
  const int64_t kk = g.K * g.K, C = g.C;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block = std::max<int64_t>(8, (C + 2 * threads - 1) / (2 * threads));
  const int64_t nblocks = (C + block - 1) / block;
  at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
    std::vector<double> acc(static_cast<size_t>(kk * block));
    std::vector<T> racc(static_cast<size_t>(kk * block)), gr(static_cast<size_t>(g.Wo * block));
    // The input rows of one output row are consecutive, (K - 1) * dil + 1 of them.
    RowCache<T> rows((g.K - 1) * g.dil + 1, g.W * block);
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t c0 = blk * block, cb = std::min(block, C - c0);
      std::fill(acc.begin(), acc.end(), 0.0);
      rows.clear();
      const auto fill = [&](T* dst, int64_t key) {  // key = n * H + ih
        const T* zr = z + key * g.W * C + c0;
        for (int64_t iw = 0; iw < g.W; ++iw)
          for (int64_t c = 0; c < cb; ++c) dst[iw * block + c] = in(c0 + c, zr[iw * C + c]);
      };
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          const int64_t orow = (n * g.Ho + oh) * g.Wo;
          for (int64_t ow = 0; ow < g.Wo; ++ow)
            gyt.fill(gr.data() + ow * block, gy + (orow + ow) * C + c0,
                     y + (orow + ow) * C + c0, cb, c0, 1);
          std::fill(racc.begin(), racc.end(), T(0));
          for (int64_t kh = 0; kh < g.K; ++kh) {
            const int64_t ih = oh * g.stride - g.pad + kh * g.dil;
            if (ih < 0 || ih >= g.H) continue;
            const T* ar = rows.get(n * g.H + ih, fill);
            for (int64_t kw = 0; kw < g.K; ++kw) {
              const int64_t off = kw * g.dil - g.pad;
              int64_t lo, hi;
              valid_out_range(g.W, g.Wo, g.stride, off, &lo, &hi);
              T* ta = racc.data() + (kh * g.K + kw) * block;
              for (int64_t ow = lo; ow < hi; ++ow) {
                const T* gp = gr.data() + ow * block;
                const T* xp = ar + (ow * g.stride + off) * block;
                for (int64_t c = 0; c < cb; ++c) ta[c] += gp[c] * xp[c];
              }
            }
          }
          for (int64_t i = 0; i < kk * block; ++i) acc[i] += racc[i];
        }
      }
      for (int64_t c = 0; c < cb; ++c)
        for (int64_t t = 0; t < kk; ++t)
          gw[(c0 + c) * kk + t] = static_cast<T>(acc[t * block + c]);
    }
  });
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
  const at::Tensor gsum = grad_sum.contiguous(), gsq = grad_sumsq.contiguous();
  at::Tensor gz = at::empty_like(z, z.options().memory_format(fmt));
  at::Tensor gscale = at::zeros({g.C}, z.options()), gshift = at::zeros({g.C}, z.options());
  // Full-width gradient; rows past `width` stay zero.
  at::Tensor gw = at::zeros(weight.sizes(), weight.options());
  if (z.numel() == 0) return {gz, gscale, gshift, gw};  // a is all padding
  const int64_t kk = g.K * g.K;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), kBnActBwd, [&] {
    using T = scalar_t;
    const BnAct<T> in{scale.const_data_ptr<T>(), shift.const_data_ptr<T>(), act};
    const T* gsq_p = gsq.const_data_ptr<T>();
    std::vector<T> gsq2(static_cast<size_t>(g.C));
    bool use_y = false;
    for (int64_t c = 0; c < g.C; ++c) {
      gsq2[c] = T(2) * gsq_p[c];
      use_y = use_y || gsq2[c] != T(0);
    }
    const GradY<T> gyt{gsum.const_data_ptr<T>(), gsq2.data(), use_y};
    const T* gyp = gy.const_data_ptr<T>();
    const T* yp = y.const_data_ptr<T>();
    const T* zp = z.const_data_ptr<T>();
    const T* wp = weight.const_data_ptr<T>();
    T* gzp = gz.mutable_data_ptr<T>();
    T* gwp = gw.mutable_data_ptr<T>();
    T* gsp = gscale.mutable_data_ptr<T>();
    T* gbp = gshift.mutable_data_ptr<T>();
    // Partial rows: one per plane (NCHW) or input row (channels_last), C channels each.
    const int64_t slots = g.channels_last ? g.N * g.H : g.N;
    std::vector<double> ps(static_cast<size_t>(slots * g.C)), pb(ps.size());
    if (g.channels_last) {
      bn_act_bwd_input_nhwc(gyp, yp, zp, wp, in, gyt, gzp, ps.data(), pb.data(), g);
      bn_act_bwd_weight_nhwc(gyp, yp, zp, in, gyt, gwp, g);
    } else {
      std::vector<double> pw(static_cast<size_t>(g.N * g.C * kk));
      bn_act_bwd_nchw(gyp, yp, zp, wp, in, gyt, gzp, pw.data(), ps.data(), pb.data(), g);
      for (int64_t c = 0; c < g.C; ++c)
        for (int64_t t = 0; t < kk; ++t) {
          double v = 0;
          for (int64_t n = 0; n < g.N; ++n) v += pw[(n * g.C + c) * kk + t];
          gwp[c * kk + t] = static_cast<T>(v);
        }
    }
    for (int64_t c = 0; c < g.C; ++c) {
      double s = 0, b = 0;
      for (int64_t i = 0; i < slots; ++i) {
        s += ps[i * g.C + c];
        b += pb[i * g.C + c];
      }
      gsp[c] = static_cast<T>(s);
      gbp[c] = static_cast<T>(b);
    }
  });
  return {gz, gscale, gshift, gw};
}

}  // namespace BSNAS_CPU_ISA
}  // namespace cpu
}  // namespace bsnas
