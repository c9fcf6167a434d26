#pragma once
// Per-channel math of BatchNorm in training from float64 batch sums (bn_from_sums.cpp),
// shared by the CPU loops and the CUDA kernels (cuda/bn_from_sums_kernel.cu). With n
// values per channel, sum s and sum of squares q:
//
//   mean = s / n,  var = clamp_min(q / n - mean^2, 0)   (biased, as BN normalises with)
//   scale = weight / sqrt(var + eps),  shift = bias - mean * scale
//   BN(x) = x * scale + shift
//
// All in double. The backward is the chain rule through exactly these lines (the clamp
// passes no gradient where q / n - mean^2 < 0 or is NaN, as torch's clamp_min). NaN and
// Inf sums propagate as in F.batch_norm: a NaN or +-Inf value in a channel makes its
// variance NaN (Inf - Inf), and so its scale, shift and running variance.
#include <cmath>
#include <cstdint>

#ifndef BSNAS_HD  // as masked_conv_common.h defines it
#if defined(__CUDACC__)
#define BSNAS_HD __host__ __device__ __forceinline__
#else
#define BSNAS_HD inline
#endif
#endif

namespace bsnas::bn_sums {

struct Moments {
  double mean, var;
  bool clamped;  // q / n - mean^2 was negative (rounding on a constant channel) or NaN
};

BSNAS_HD Moments moments(double s, double q, double n) {
  const double mean = s / n;
  const double raw = q / n - mean * mean;
  return {mean, raw < 0.0 ? 0.0 : raw, !(raw >= 0.0)};  // NaN stays NaN (clamp_min)
}

BSNAS_HD void affine(double s, double q, double n, double w, double b, double eps,
                            double& scale, double& shift) {
  const Moments m = moments(s, q, n);
  scale = w / sqrt(m.var + eps);
  shift = b - m.mean * scale;
}

// Given dL/dscale and dL/dshift, the gradients of s, q, weight and bias.
BSNAS_HD void affine_backward(double g_scale, double g_shift, double s, double q,
                                     double n, double w, double eps, double& g_s,
                                     double& g_q, double& g_w, double& g_b) {
  const Moments m = moments(s, q, n);
  const double inv = 1.0 / sqrt(m.var + eps);
  const double scale = w * inv;
  const double g_sc = g_scale - m.mean * g_shift;  // through scale, shift's use included
  g_b = g_shift;
  g_w = g_sc * inv;
  const double g_var = m.clamped ? 0.0 : -0.5 * g_sc * w * inv * inv * inv;
  const double g_mean = -scale * g_shift - 2.0 * m.mean * g_var;
  g_s = g_mean / n;
  g_q = g_var / n;
}

// running <- running + f * (batch - running) for the mean and the unbiased variance,
// as F.batch_norm updates them.
template <typename T>
BSNAS_HD void running_update(double s, double q, double n, double f, T& mean,
                                    T& var) {
  const Moments m = moments(s, q, n);
  const double unbiased = n > 1.0 ? m.var * (n / (n - 1.0)) : m.var;
  mean = static_cast<T>(static_cast<double>(mean) + f * (m.mean - static_cast<double>(mean)));
  var = static_cast<T>(static_cast<double>(var) + f * (unbiased - static_cast<double>(var)));
}

// The update factor: `momentum`, or for momentum None (negative here) the cumulative
// average 1 / num_batches_tracked after this batch, as nn.BatchNorm2d.
BSNAS_HD double factor(double momentum, int64_t batches_after) {
  return momentum >= 0.0 ? momentum : 1.0 / static_cast<double>(batches_after);
}

}  // namespace bsnas::bn_sums
