// The backward passes of the fused bsnas::bn_act_dwconv2d on CUDA, each in its own
// translation unit (bn_act_dwconv2d_wgrad_kernel.cu, bn_act_dwconv2d_igrad_kernel.cu) so that the
// kernels compile in parallel; called by backward_cuda (bn_act_dwconv2d_kernel.cu) with
// validated, dense tensors (z, grad_y, y in `g`'s layout) on the current device and
// stream.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "../masked_conv_common.h"

namespace bsnas::bn_act_cuda {

// Rows [0, width) of the full-width grad_weight `gw` (zero-initialised by the caller).
void weight_grad(const at::Tensor& gy, const at::Tensor& gsum, const at::Tensor& gsq,
                 const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                 const at::Tensor& y, int64_t act, at::Tensor& gw, const DwGeometry& g);

// grad_z, grad_scale and grad_shift.
void input_grad(const at::Tensor& gy, const at::Tensor& gsum, const at::Tensor& gsq,
                const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                const at::Tensor& y, const at::Tensor& weight, int64_t act, at::Tensor& gz,
                at::Tensor& gscale, at::Tensor& gshift, const DwGeometry& g);

}  // namespace bsnas::bn_act_cuda
