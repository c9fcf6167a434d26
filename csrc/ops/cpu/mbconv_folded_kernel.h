#pragma once
// CPU kernel of bsnas::_mbconv_folded_depthwise, the middle stage of the folded spring
// block in inference (mbconv_folded.cpp), on the depthwise engine of dwconv_passes.h:
//
//   h   = act(dwconv(act(z + expand_b), dw_w) + dw_b)   ("same" padding, dilation 1)
//   out = project_b (+ shortcut)                         (what the project GEMM adds to)
//
// act(z + expand_b) is applied as z is packed into the convolution's scratch, and
// act(. + dw_b) to each output while it is in registers (channels_last) or in cache
// (NCHW, right after its plane).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "dwconv_passes.h"

namespace bsnas {
namespace cpu {
namespace BSNAS_CPU_ISA {

constexpr const char* kFoldedDw = "_mbconv_folded_depthwise";

// act(z + b[c]): (channel, offset) for channels_last, and per plane.
template <int A, typename T>
struct BiasAct {
  const T* z;
  const T* b;
  T operator()(int64_t c, int64_t off) const { return activate(z[off] + b[c], A); }
  void prefetch(int64_t off, int64_t n) const { simd::prefetch_l2(z + off, n); }
};
template <int A, typename T>
struct BiasActPlane {
  const T* z;
  T b;
  T operator()(int64_t i) const { return activate(z[i] + b, A); }
};

template <int A, typename T>
void folded_depthwise(const T* z, const T* eb, const T* w, const T* db, T* h,
                      const DwGeometry& g) {
  using namespace simd;
  const int64_t kk = g.K * g.K;
  if (g.channels_last) {
    const Pass p = Pass::forward(g, 1);
    block_pass<T>(p, block_plan<T>(p, g.N, g.C), g.N, g.C, g.H * g.W * g.C, w, false,
                  BiasAct<A, T>{z, eb},
                  [&](int64_t n, int64_t, const ChannelBlock& cb, int64_t oh, int64_t ow,
                      int R, const Vec<T>* acc) {
                    T* d0 = h + ((n * g.Ho + oh) * g.Wo + ow) * g.C + cb.c0;
                    const T* b = db + cb.c0;
                    for (int r = 0; r < R; ++r) {
                      T* d = d0 + r * g.C;
                      const Vec<T>& v = acc[r];
                      for (int64_t l = 0; l < cb.cb; ++l) d[l] = activate(v[l] + b[l], A);
                    }
                  });
  } else {
    const Pass p = Pass::forward(g, kLanes<T>);
    const int64_t ohw = g.Ho * g.Wo;
    plane_pass<T>(
        p, g.N * g.C,
        [&](int64_t nc) { return BiasActPlane<A, T>{z + nc * g.H * g.W, eb[nc % g.C]}; },
        [&](int64_t nc, T* wf) { std::copy_n(w + (nc % g.C) * kk, kk, wf); },
        [&](int64_t nc) { return h + nc * ohw; },
        [&](int64_t nc, T* hp) {
          const T b = db[nc % g.C];
#pragma omp simd
          for (int64_t i = 0; i < ohw; ++i) hp[i] = activate(hp[i] + b, A);
        });
  }
}

// out[n, o, p] = pb[o] (+ s[n, o, p]), in the layout of `out` (NCHW or NHWC).
template <typename T>
void init_out(T* out, const T* pb, const T* s, int64_t N, int64_t C, int64_t P, bool nhwc) {
  at::parallel_for(0, N * (nhwc ? P : C), 1 + (1 << 14) / std::max<int64_t>(1, nhwc ? C : P),
                   [&](int64_t b, int64_t e) {
                     for (int64_t r = b; r < e; ++r) {
                       T* o = out + r * (nhwc ? C : P);
                       const T* sr = s != nullptr ? s + r * (nhwc ? C : P) : nullptr;
                       if (nhwc) {
                         for (int64_t c = 0; c < C; ++c) o[c] = pb[c] + (sr ? sr[c] : T(0));
                       } else {
                         const T v = pb[r % C];
                         for (int64_t i = 0; i < P; ++i) o[i] = v + (sr ? sr[i] : T(0));
                       }
                     }
                   });
}

std::tuple<at::Tensor, at::Tensor> folded_dw_forward(
    const at::Tensor& z_in, const at::Tensor& expand_b, const at::Tensor& dw_w,
    const at::Tensor& dw_b, const at::Tensor& project_b,
    const std::optional<at::Tensor>& shortcut, int64_t stride, int64_t act) {
  const FoldedDwArgs a =
      check_folded_dw_args(kFoldedDw, z_in, expand_b, dw_w, dw_b, project_b, shortcut, stride, act);
  const DwGeometry& g = a.g;
  const auto fmt = compute_format(z_in);
  const at::Tensor z = z_in.contiguous(fmt), w = dw_w.contiguous();
  const at::Tensor eb = expand_b.contiguous(), db = dw_b.contiguous(), pb = project_b.contiguous();
  const bool has_s = shortcut.has_value() && shortcut->defined();
  const at::Tensor s = has_s ? shortcut->contiguous(fmt) : at::Tensor();
  at::Tensor h = at::empty({g.N, g.C, g.Ho, g.Wo}, z.options().memory_format(fmt));
  at::Tensor out = at::empty({g.N, a.cout, g.Ho, g.Wo}, z.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), kFoldedDw, [&] {
    using T = scalar_t;
    if (h.numel() > 0) {
      simd::with_act(act, [&]<int A>() {
        folded_depthwise<A>(z.const_data_ptr<T>(), eb.const_data_ptr<T>(), w.const_data_ptr<T>(),
                            db.const_data_ptr<T>(), h.mutable_data_ptr<T>(), g);
      });
    }
    if (out.numel() > 0)
      init_out(out.mutable_data_ptr<T>(), pb.const_data_ptr<T>(),
               has_s ? s.const_data_ptr<T>() : nullptr, g.N, a.cout, g.Ho * g.Wo,
               g.channels_last);
  });
  return {h, out};
}

}  // namespace BSNAS_CPU_ISA
}  // namespace cpu
}  // namespace bsnas
