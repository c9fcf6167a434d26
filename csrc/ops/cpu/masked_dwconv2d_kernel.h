#pragma once
// CPU kernels of bsnas::masked_dwconv2d: direct depthwise convolution over the first
// `width` filters of a full-width weight, NCHW and channels_last, float32/float64.
// Tensor-level entry points; the passes live in dwconv_passes.h. Compiled once per
// instruction set (kernels_isa.h), like everything this header includes.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "dwconv_passes.h"

namespace bsnas {
namespace cpu {
namespace BSNAS_CPU_ISA {

constexpr const char* kDwFwd = "masked_dwconv2d";
constexpr const char* kDwBwd = "masked_dwconv2d_backward";

// Reads a tensor as is: (index within a plane) for NCHW, (channel, offset) for NHWC.
template <typename T>
struct Plain {
  const T* p;
  T operator()(int64_t off) const { return p[off]; }
  T operator()(int64_t, int64_t off) const { return p[off]; }
  void prefetch(int64_t off, int64_t n) const { simd::prefetch_l2(p + off, n); }
};

template <typename T>
void dw_forward_impl(const T* x, const T* w, T* y, const DwGeometry& g) {
  using namespace simd;
  const int64_t kk = g.K * g.K;
  if (g.channels_last) {
    const Pass p = Pass::forward(g, 1);
    // Kernel 3/5/7, stride 1/2, dilation 1: the register window straight from the
    // tensor (faster than the packed strip at stride 1 and than direct_pass at stride
    // 2: nothing is copied). Otherwise the packed
    // strip at stride 1, direct_pass (no scratch: packing would copy S*S inputs per
    // output) at larger strides.
    if (window_pass<T>(p, g.N, g.C, x, w, false, y)) return;
    if (g.stride > 1) {
      direct_pass<T>(p, g.N, g.C, x, w, false,
                     [&](int64_t n, int64_t bi, int64_t oh, int64_t ow, const Vec<T>& v) {
                       store_block(y, block_of<T>(bi, g.C), (n * g.Ho + oh) * g.Wo + ow, v);
                     });
    } else {
      block_pass<T>(p, block_plan<T>(p, g.N, g.C), g.N, g.C, g.H * g.W * g.C, w, false,
                    Plain<T>{x},
                    [&](int64_t n, int64_t, const ChannelBlock& cb, int64_t oh, int64_t ow,
                        int R, const Vec<T>* acc) {
                      store_run(y, cb, (n * g.Ho + oh) * g.Wo + ow, R, acc);
                    });
    }
  } else {
    if (blocked_plane_pass<T>(Pass::forward(g, 1), g.N, g.C, x, w, false, y)) return;
    const Pass p = Pass::forward(g, kLanes<T>);
    plane_pass<T>(
        p, g.N * g.C, [&](int64_t nc) { return Plain<T>{x + nc * g.H * g.W}; },
        [&](int64_t nc, T* wf) { std::copy_n(w + (nc % g.C) * kk, kk, wf); },
        [&](int64_t nc) { return y + nc * g.Ho * g.Wo; }, [](int64_t, const T*) {});
  }
}

template <typename T>
void dw_backward_impl(const T* gy, const T* x, const T* w, T* gx, T* gw, const DwGeometry& g) {
  using namespace simd;
  const int64_t kk = g.K * g.K;
  if (g.channels_last) {
    const Pass p = Pass::input_grad(g, 1);
    // Stride 1: the window over gy; stride 2: by phases (no zero-spread copy of gy).
    if (!window_pass<T>(p, g.N, g.C, gy, w, true, gx) &&
        !phase_input_grad<T>(g, gy, w, gx)) {
      block_pass<T>(p, block_plan<T>(p, g.N, g.C), g.N, g.C, g.Ho * g.Wo * g.C, w, true,
                    Plain<T>{gy},
                    [&](int64_t n, int64_t, const ChannelBlock& cb, int64_t ih, int64_t iw,
                        int R, const Vec<T>* acc) {
                      store_run(gx, cb, (n * g.H + ih) * g.W + iw, R, acc);
                    });
    }
    if (!window_weight_grad<T>(g, x, gy, gw))
      block_weight_grad(g, Plain<T>{x}, Plain<T>{gy}, gw);
  } else {
    if (!blocked_plane_pass<T>(Pass::input_grad(g, 1), g.N, g.C, gy, w, true, gx)) {
      plane_pass<T>(
          Pass::input_grad(g, kLanes<T>), g.N * g.C,
          [&](int64_t nc) { return Plain<T>{gy + nc * g.Ho * g.Wo}; },
          [&](int64_t nc, T* wf) {
            const T* wc = w + (nc % g.C) * kk;
            for (int64_t t = 0; t < kk; ++t) wf[t] = wc[kk - 1 - t];
          },
          [&](int64_t nc) { return gx + nc * g.H * g.W; }, [](int64_t, const T*) {});
    }
    if (!blocked_weight_grad<T>(g, x, gy, gw)) {
      plane_weight_grad(
          g, [&](int64_t nc) { return Plain<T>{x + nc * g.H * g.W}; },
          [&](int64_t nc) { return Plain<T>{gy + nc * g.Ho * g.Wo}; }, gw);
    }
  }
}

at::Tensor dw_forward(const at::Tensor& x_in, const at::Tensor& weight_in, int64_t width,
                       int64_t stride, int64_t padding, int64_t dilation) {
  const DwGeometry g = check_dw_args(kDwFwd, x_in, weight_in, width, stride, padding, dilation);
  const auto fmt = compute_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor weight = weight_in.contiguous();  // a no-op for parameters
  at::Tensor y = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kDwFwd, [&] {
    const auto* xp = x.const_data_ptr<scalar_t>();
    const auto* wp = weight.const_data_ptr<scalar_t>();
    auto* yp = y.mutable_data_ptr<scalar_t>();
    dw_forward_impl(xp, wp, yp, g);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> dw_backward(const at::Tensor& grad_out,
                                                const at::Tensor& x_in,
                                                const at::Tensor& weight_in, int64_t width,
                                                int64_t stride, int64_t padding,
                                                int64_t dilation) {
  const DwGeometry g = check_dw_args(kDwBwd, x_in, weight_in, width, stride, padding, dilation);
  check_grad_out(kDwBwd, grad_out, x_in, {g.N, g.C, g.Ho, g.Wo});
  const auto fmt = compute_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor gy = grad_out.contiguous(fmt);
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor gx = at::empty_like(x, x.options().memory_format(fmt));
  // Full-width gradient; the passes write rows [0, width) in full.
  at::Tensor gw = weight_grad_outside_zeroed(weight, g.C, g.K * g.K);
  if (x.numel() == 0) return {gx.zero_(), gw.zero_()};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kDwBwd, [&] {
    const auto* xp = x.const_data_ptr<scalar_t>();
    const auto* wp = weight.const_data_ptr<scalar_t>();
    const auto* gyp = gy.const_data_ptr<scalar_t>();
    auto* gxp = gx.mutable_data_ptr<scalar_t>();
    auto* gwp = gw.mutable_data_ptr<scalar_t>();
    dw_backward_impl(gyp, xp, wp, gxp, gwp, g);
  });
  return {gx, gw};
}

}  // namespace BSNAS_CPU_ISA
}  // namespace cpu
}  // namespace bsnas
