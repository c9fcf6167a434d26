// CUDA launchers of the BN-from-sums ops (bn_from_sums.cpp) and of bsnas::channel_stats
// (channel_stats.cpp), implemented in bn_from_sums_kernel.cu. Called with validated,
// contiguous tensors on the current device; each launches on the current stream.
#pragma once

#include <ATen/core/Tensor.h>

namespace bsnas::bn_sums_cuda {

// scale, shift [c] in weight's dtype (bn_from_sums.h: affine).
void affine(const at::Tensor& sum, const at::Tensor& sumsq, double n, const at::Tensor& weight,
            const at::Tensor& bias, double eps, at::Tensor& scale, at::Tensor& shift);

// g_sum, g_sumsq [c] float64; g_weight, g_bias [C_max], zero past c.
void affine_backward(const at::Tensor& g_scale, const at::Tensor& g_shift,
                     const at::Tensor& sum, const at::Tensor& sumsq, double n,
                     const at::Tensor& weight, double eps, at::Tensor& g_sum,
                     at::Tensor& g_sumsq, at::Tensor& g_weight, at::Tensor& g_bias);

// In place: batches += 1, then the first c running statistics (momentum < 0: None).
void running_update(at::Tensor& running_mean, at::Tensor& running_var, at::Tensor& batches,
                    const at::Tensor& sum, const at::Tensor& sumsq, double n, double momentum);

// Per-channel sum and sum of squares of a dense [N, C, H, W] tensor `z` (NCHW or
// channels_last), in float64, deterministic (no atomics).
void channel_stats(const at::Tensor& z, bool channels_last, at::Tensor& sum, at::Tensor& sumsq);

// In place: grad_z += grad_sum[c] + 2 z grad_sumsq[c] over a dense [N, C, H, W] z and
// grad_z of one format (z's gradient through its channel_stats), one launch.
void stats_grad_add(at::Tensor& grad_z, const at::Tensor& z, bool channels_last,
                    const at::Tensor& grad_sum, const at::Tensor& grad_sumsq);

}  // namespace bsnas::bn_sums_cuda
