#pragma once
// CPU kernels of bsnas::masked_dwconv2d: direct depthwise convolution over the first
// `width` filters of a full-width weight, NCHW and channels_last, float32/float64.
// Tensor-level drivers; the loops live in dwconv_loops.h. Compiled once per
// instruction set (kernels_isa.h), like everything this header includes.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "dwconv_loops.h"
#include "dwconv_plane.h"

namespace bsnas {
namespace cpu {
namespace BSNAS_CPU_ISA {

constexpr const char* kDwFwd = "masked_dwconv2d";
constexpr const char* kDwBwd = "masked_dwconv2d_backward";

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
    if (g.channels_last) forward_nhwc(xp, wp, yp, g);
    else plane::forward(xp, wp, yp, g);
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
  // Full-width gradient; rows past `width` stay zero.
  at::Tensor gw = at::zeros(weight.sizes(), weight.options());
  if (x.numel() == 0) return {gx.zero_(), gw};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kDwBwd, [&] {
    const auto* xp = x.const_data_ptr<scalar_t>();
    const auto* wp = weight.const_data_ptr<scalar_t>();
    const auto* gyp = gy.const_data_ptr<scalar_t>();
    auto* gxp = gx.mutable_data_ptr<scalar_t>();
    auto* gwp = gw.mutable_data_ptr<scalar_t>();
    if (g.channels_last) {
      backward_input_nhwc(gyp, wp, gxp, g);
      backward_weight_nhwc(gyp, xp, gwp, g);
    } else {
      plane::backward_input(gyp, wp, gxp, g);
      plane::backward_weight(gyp, xp, gwp, g);
    }
  });
  return {gx, gw};
}

}  // namespace BSNAS_CPU_ISA
}  // namespace cpu
}  // namespace bsnas
