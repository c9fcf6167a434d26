#pragma once
// CPU kernels of bsnas::bn_act and its backward (see ../bn_act.cpp): one elementwise
// pass each, vectorised over the plane (NCHW) or the channels (channels_last). The
// backward's float64 partial sums live per plane (NCHW) or per image x chunk of
// kPixelsPerPart pixels (channels_last) and are reduced in a fixed order, so results do
// not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "channel_stats_kernel.h"
#include "dwconv_passes.h"

namespace bsnas {
namespace cpu {
namespace BSNAS_CPU_ISA {

// The BN-activation backward of one value: returns grad_z = gu * sc and adds the
// grad_scale / grad_shift partials gu * z and gu, for gu = ga * act'(u), u = z * sc + sh
// computed as the forward computes it.
template <int A, typename T>
inline T bn_act_grad(T ga, T zv, T sc, T sh, double& ps, double& pb) {
  const T u = zv * sc + sh;
  const T gu = act_passes(u, A) ? ga : T(0);
  ps += double(gu) * double(zv);
  pb += double(gu);
  return gu * sc;
}

constexpr const char* kBnAct = "bn_act";
constexpr const char* kBnActBack = "_bn_act_backward";
constexpr int64_t kPixelsPerPart = 1024;

template <typename T>
void bn_act_forward_impl(const T* yp, const T* sc, const T* sh, T* hp, int64_t N, int64_t C,
                         int64_t P, bool cl, int64_t act) {
  simd::with_act(act, [&]<int A>() {
    if (cl) {
      at::parallel_for(0, N * P, std::max<int64_t>(1, 16384 / C), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const T* yi = yp + i * C;
          T* hi = hp + i * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) hi[c] = activate(yi[c] * sc[c] + sh[c], A);
        }
      });
    } else {
      at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / P), [&](int64_t b, int64_t e) {
        for (int64_t nc = b; nc < e; ++nc) {
          const T s = sc[nc % C], t = sh[nc % C];
          const T* yi = yp + nc * P;
          T* hi = hp + nc * P;
#pragma omp simd
          for (int64_t i = 0; i < P; ++i) hi[i] = activate(yi[i] * s + t, A);
        }
      });
    }
  });
}

at::Tensor bn_act_forward(const at::Tensor& y_in, const at::Tensor& scale_in,
                          const at::Tensor& shift_in, int64_t act) {
  const BnActArgs a = prepare_bn_act(kBnAct, y_in, scale_in, shift_in, act);
  if (a.out.numel() == 0) return a.out;
  AT_DISPATCH_FLOATING_TYPES(a.y.scalar_type(), kBnAct, [&] {
    bn_act_forward_impl(a.y.const_data_ptr<scalar_t>(), a.scale.const_data_ptr<scalar_t>(),
                        a.shift.const_data_ptr<scalar_t>(), a.out.mutable_data_ptr<scalar_t>(),
                        a.y.size(0), a.y.size(1), a.y.size(2) * a.y.size(3), a.channels_last,
                        act);
  });
  return a.out;
}

// grad_y and the (grad_scale, grad_shift) sums of bn_act.
template <typename T>
void bn_act_backward_impl(const T* gp, const T* yp, const T* sc, const T* sh, T* gyp,
                          T* gscale, T* gshift, int64_t N, int64_t C, int64_t P, bool cl,
                          int64_t act) {
  simd::with_act(act, [&]<int A>() {
    if (cl) {
      const int64_t chunks = (P + kPixelsPerPart - 1) / kPixelsPerPart, parts = N * chunks;
      std::vector<double> ps(static_cast<size_t>(parts * C), 0.0), pb(ps.size(), 0.0);
      at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
        for (int64_t part = b; part < e; ++part) {
          const int64_t n = part / chunks, p0 = (part % chunks) * kPixelsPerPart;
          const int64_t p1 = std::min(P, p0 + kPixelsPerPart);
          double* s = ps.data() + part * C;
          double* q = pb.data() + part * C;
          for (int64_t i = (n * P + p0) * C, end = (n * P + p1) * C; i < end; i += C) {
            const T *yi = yp + i, *gi = gp + i;
            T* go = gyp + i;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c)
              go[c] = bn_act_grad<A>(gi[c], yi[c], sc[c], sh[c], s[c], q[c]);
          }
        }
      });
      reduce_parts(ps, parts, C, C, gscale);
      reduce_parts(pb, parts, C, C, gshift);
    } else {
      std::vector<double> ps(static_cast<size_t>(N * C), 0.0), pb(ps.size(), 0.0);
      at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / P), [&](int64_t b, int64_t e) {
        for (int64_t nc = b; nc < e; ++nc) {
          const T cs = sc[nc % C], t = sh[nc % C];
          const T *yi = yp + nc * P, *gi = gp + nc * P;
          T* go = gyp + nc * P;
          double s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
          for (int64_t i = 0; i < P; ++i) go[i] = bn_act_grad<A>(gi[i], yi[i], cs, t, s, q);
          ps[nc] = s;
          pb[nc] = q;
        }
      });
      reduce_parts(ps, N, C, C, gscale);
      reduce_parts(pb, N, C, C, gshift);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward(
    const at::Tensor& grad_h, const at::Tensor& y_in, const at::Tensor& scale_in,
    const at::Tensor& shift_in, int64_t act) {
  const BnActArgs a = prepare_bn_act(kBnActBack, y_in, scale_in, shift_in, act, &grad_h);
  if (a.y.numel() == 0) return {a.out, a.grad_scale.zero_(), a.grad_shift.zero_()};
  AT_DISPATCH_FLOATING_TYPES(a.y.scalar_type(), kBnActBack, [&] {
    using T = scalar_t;
    bn_act_backward_impl(a.grad_h.const_data_ptr<T>(), a.y.const_data_ptr<T>(),
                         a.scale.const_data_ptr<T>(), a.shift.const_data_ptr<T>(),
                         a.out.mutable_data_ptr<T>(), a.grad_scale.mutable_data_ptr<T>(),
                         a.grad_shift.mutable_data_ptr<T>(), a.y.size(0), a.y.size(1),
                         a.y.size(2) * a.y.size(3), a.channels_last, act);
  });
  return {a.out, a.grad_scale, a.grad_shift};
}

}  // namespace BSNAS_CPU_ISA
}  // namespace cpu
}  // namespace bsnas
