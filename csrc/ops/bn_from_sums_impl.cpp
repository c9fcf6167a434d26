// The kernels of bn_affine_from_sums, its backward and bn_update_running_stats_ (schema
// in bn_from_sums.cpp), registered for CPU and CUDA: one argument check for both
// devices, then a CUDA launch (cuda/bn_from_sums_kernel.cu) or a loop over the channels
// (the per-channel math of bn_from_sums.h).
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "bn_from_sums.h"
#include "masked_conv_common.h"
#ifdef BSNAS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>

#include "cuda/bn_from_sums_kernel.h"
#endif

namespace bsnas {

namespace {

// sum / sumsq: 1-D float64 of one length c >= 1, on `device`; count >= 1.
int64_t check_sums(const char* op, const at::Tensor& sum, const at::Tensor& sumsq,
                   int64_t count) {
  for (const auto& [t, name] : {std::pair{&sum, "sum"}, std::pair{&sumsq, "sumsq"}}) {
    TORCH_CHECK(t->defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(t->scalar_type() == at::kDouble, op, ": ", name, " must be float64, got ",
                t->scalar_type());
    TORCH_CHECK(t->dim() == 1 && t->size(0) >= 1, op, ": ", name,
                " must be 1-D and non-empty, got shape ", t->sizes());
  }
  TORCH_CHECK(sum.device() == sumsq.device(), op, ": sum is on ", sum.device(),
              " but sumsq is on ", sumsq.device());
  TORCH_CHECK(sum.size(0) == sumsq.size(0), op, ": sum has ", sum.size(0),
              " channels but sumsq has ", sumsq.size(0));
  TORCH_CHECK(count >= 1, op, ": count must be >= 1, got ", count);
  return sum.size(0);
}

// A 1-D per-channel parameter or buffer covering the first c channels.
void check_channels(const char* op, const at::Tensor& t, const char* name, int64_t c,
                    const at::Tensor& like) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(),
              " but sum is on ", like.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) >= c, op, ": ", name, " must be 1-D with at least ",
              c, " channels, got shape ", t.sizes());
  check_floating(op, t);
}

void check_eps(const char* op, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
}

std::tuple<at::Tensor, at::Tensor> affine_from_sums(const at::Tensor& sum_in,
                                                    const at::Tensor& sumsq_in, int64_t count,
                                                    const at::Tensor& weight_in,
                                                    const at::Tensor& bias_in, double eps) {
  constexpr const char* op = "bn_affine_from_sums";
  const int64_t c = check_sums(op, sum_in, sumsq_in, count);
  check_channels(op, weight_in, "weight", c, sum_in);
  check_channels(op, bias_in, "bias", c, sum_in);
  check_same(op, weight_in, "weight", bias_in, "bias");
  check_eps(op, eps);
  const at::Tensor sum = sum_in.contiguous(), sumsq = sumsq_in.contiguous();
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor scale = at::empty({c}, weight.options());
  at::Tensor shift = at::empty({c}, weight.options());
  const double n = static_cast<double>(count);
#ifdef BSNAS_WITH_CUDA
  if (sum.is_cuda()) {
    const c10::cuda::CUDAGuard guard(sum.device());
    bn_sums_cuda::affine(sum, sumsq, n, weight, bias, eps, scale, shift);
    return {scale, shift};
  }
#endif
  TORCH_CHECK(sum.is_cpu(), op, ": unsupported device ", sum.device());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), op, [&] {
    const double* s = sum.const_data_ptr<double>();
    const double* q = sumsq.const_data_ptr<double>();
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.const_data_ptr<scalar_t>();
    scalar_t* sc = scale.mutable_data_ptr<scalar_t>();
    scalar_t* sh = shift.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < c; ++i) {
      double a, d;
      bn_sums::affine(s[i], q[i], n, w[i], b[i], eps, a, d);
      sc[i] = static_cast<scalar_t>(a);
      sh[i] = static_cast<scalar_t>(d);
    }
  });
  return {scale, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> affine_from_sums_backward(
    const at::Tensor& g_scale_in, const at::Tensor& g_shift_in, const at::Tensor& sum_in,
    const at::Tensor& sumsq_in, int64_t count, const at::Tensor& weight_in, double eps) {
  constexpr const char* op = "_bn_affine_from_sums_backward";
  const int64_t c = check_sums(op, sum_in, sumsq_in, count);
  check_channels(op, weight_in, "weight", c, sum_in);
  check_eps(op, eps);
  for (const auto& [t, name] :
       {std::pair{&g_scale_in, "grad_scale"}, std::pair{&g_shift_in, "grad_shift"}}) {
    TORCH_CHECK(t->defined(), op, ": ", name, " is undefined");
    check_same(op, *t, name, weight_in, "weight");
    TORCH_CHECK(t->dim() == 1 && t->size(0) == c, op, ": ", name, " must be [", c,
                "], got shape ", t->sizes());
  }
  const at::Tensor sum = sum_in.contiguous(), sumsq = sumsq_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor g_scale = g_scale_in.contiguous(), g_shift = g_shift_in.contiguous();
  const int64_t c_max = weight.size(0);
  at::Tensor g_sum = at::empty({c}, sum.options()), g_sumsq = at::empty({c}, sum.options());
  at::Tensor g_weight = at::empty({c_max}, weight.options());
  at::Tensor g_bias = at::empty({c_max}, weight.options());
  const double n = static_cast<double>(count);
#ifdef BSNAS_WITH_CUDA
  if (sum.is_cuda()) {
    const c10::cuda::CUDAGuard guard(sum.device());
    bn_sums_cuda::affine_backward(g_scale, g_shift, sum, sumsq, n, weight, eps, g_sum,
                                  g_sumsq, g_weight, g_bias);
    return {g_sum, g_sumsq, g_weight, g_bias};
  }
#endif
  TORCH_CHECK(sum.is_cpu(), op, ": unsupported device ", sum.device());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), op, [&] {
    const double* s = sum.const_data_ptr<double>();
    const double* q = sumsq.const_data_ptr<double>();
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const scalar_t* gsc = g_scale.const_data_ptr<scalar_t>();
    const scalar_t* gsh = g_shift.const_data_ptr<scalar_t>();
    double* gs = g_sum.mutable_data_ptr<double>();
    double* gq = g_sumsq.mutable_data_ptr<double>();
    scalar_t* gw = g_weight.mutable_data_ptr<scalar_t>();
    scalar_t* gb = g_bias.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < c_max; ++i) {
      double a = 0, b = 0;
      if (i < c) bn_sums::affine_backward(gsc[i], gsh[i], s[i], q[i], n, w[i], eps, gs[i], gq[i], a, b);
      gw[i] = static_cast<scalar_t>(a);
      gb[i] = static_cast<scalar_t>(b);
    }
  });
  return {g_sum, g_sumsq, g_weight, g_bias};
}

void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var,
                          at::Tensor& batches, const at::Tensor& sum_in,
                          const at::Tensor& sumsq_in, int64_t count,
                          std::optional<double> momentum) {
  constexpr const char* op = "bn_update_running_stats_";
  const int64_t c = check_sums(op, sum_in, sumsq_in, count);
  check_channels(op, running_mean, "running_mean", c, sum_in);
  check_channels(op, running_var, "running_var", c, sum_in);
  check_same(op, running_mean, "running_mean", running_var, "running_var");
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(), op,
              ": running_mean and running_var must be contiguous (they are updated in place)");
  TORCH_CHECK(batches.defined() && batches.numel() == 1 && batches.scalar_type() == at::kLong &&
                  batches.device() == sum_in.device(),
              op, ": num_batches_tracked must be a one-element int64 tensor on ", sum_in.device());
  TORCH_CHECK(!momentum || (std::isfinite(*momentum) && *momentum >= 0 && *momentum <= 1), op,
              ": momentum must be in [0, 1] or None, got ", momentum ? *momentum : 0.0);
  const at::Tensor sum = sum_in.contiguous(), sumsq = sumsq_in.contiguous();
  const double n = static_cast<double>(count);
  const double mom = momentum ? *momentum : -1.0;
#ifdef BSNAS_WITH_CUDA
  if (sum.is_cuda()) {
    const c10::cuda::CUDAGuard guard(sum.device());
    bn_sums_cuda::running_update(running_mean, running_var, batches, sum, sumsq, n, mom);
    return;
  }
#endif
  TORCH_CHECK(sum.is_cpu(), op, ": unsupported device ", sum.device());
  int64_t* nb = batches.mutable_data_ptr<int64_t>();
  *nb += 1;
  const double f = bn_sums::factor(mom, *nb);
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), op, [&] {
    const double* s = sum.const_data_ptr<double>();
    const double* q = sumsq.const_data_ptr<double>();
    scalar_t* rm = running_mean.mutable_data_ptr<scalar_t>();
    scalar_t* rv = running_var.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < c; ++i) bn_sums::running_update(s[i], q[i], n, f, rm[i], rv[i]);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, CPU, m) {
  m.impl("bn_affine_from_sums", &affine_from_sums);
  m.impl("_bn_affine_from_sums_backward", &affine_from_sums_backward);
  m.impl("bn_update_running_stats_", &update_running_stats);
}

#ifdef BSNAS_WITH_CUDA
TORCH_LIBRARY_IMPL(bsnas, CUDA, m) {
  m.impl("bn_affine_from_sums", &affine_from_sums);
  m.impl("_bn_affine_from_sums_backward", &affine_from_sums_backward);
  m.impl("bn_update_running_stats_", &update_running_stats);
}
#endif

}  // namespace bsnas
