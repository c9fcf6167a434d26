// The channels_last depthwise convolution of bsnas::masked_dwconv2d on CUDA in runs
// (dwconv_nhwc_runs_kernel.cu, its own translation unit so that it compiles in parallel):
// the forward at stride 1 or 2 and the stride-1 input gradient, for k = 3, 5, 7 and
// dilation 1. Called by masked_dwconv2d_kernel.cu with validated, dense channels_last
// tensors on the current device and stream.
#pragma once

#include <ATen/core/Tensor.h>

#include "../masked_conv_common.h"

namespace bsnas::dw_runs {

// Whether run_forward / run_input_grad handle this geometry (k 3/5/7, dilation 1,
// channels_last, int32 indices; stride 1 or 2 for the forward, 1 for the gradient).
bool handles_forward(const DwGeometry& g, int64_t weight_numel);
bool handles_input_grad(const DwGeometry& g, int64_t weight_numel);

// y = conv(x, weight[:width]) (y allocated by the caller, channels_last).
void run_forward(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y,
                 const DwGeometry& g);

// grad_x of a stride-1 forward: the forward over grad_y with the taps flipped and
// padding k - 1 - pad.
void run_input_grad(const at::Tensor& gy, const at::Tensor& weight, at::Tensor& gx,
                    const DwGeometry& g);

}  // namespace bsnas::dw_runs
