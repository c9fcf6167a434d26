// BatchNorm in training from float64 batch sums, for kernels that produce the sums as
// they write their output (bsnas::bn_act_dwconv2d, bsnas::channel_stats):
//
//   bn_affine_from_sums(sum, sumsq, count, weight, bias, eps) -> (scale, shift)
//       the per-channel affine map of BN over the first c = len(sum) channels, in one
//       pass (bn_from_sums.h has the math); differentiable, backward in one pass too;
//   bn_update_running_stats_(running_mean, running_var, num_batches_tracked, sum, sumsq,
//                            count, momentum)
//       the running-statistics update of those channels as F.batch_norm does it, with
//       num_batches_tracked += 1 and momentum None (the cumulative average) read on the
//       device: no host synchronisation.
//
// Each is one launch on CUDA (cuda/bn_from_sums_kernel.cu) where the composite of ATen
// ops it replaces is about ten; the spring block calls them for its two fused BNs. CPU:
// plain loops. Both devices' kernels: bn_from_sums_impl.cpp; autograd:
// autograd/bn_from_sums.cpp; fake kernels: bsnas/ops/bn_from_sums.py.
#include <torch/library.h>

namespace bsnas {

TORCH_LIBRARY_FRAGMENT(bsnas, m) {
  // sum, sumsq: [c] float64; weight, bias: [C_max >= c]; returns (scale, shift) [c] in
  // weight's dtype.
  m.def(
      "bn_affine_from_sums(Tensor sum, Tensor sumsq, SymInt count, Tensor weight, "
      "Tensor bias, float eps) -> (Tensor, Tensor)");
  // Returns (grad_sum [c] float64, grad_sumsq [c] float64, grad_weight [C_max],
  // grad_bias [C_max]); the weight and bias gradients are zero past c.
  m.def(
      "_bn_affine_from_sums_backward(Tensor grad_scale, Tensor grad_shift, Tensor sum, "
      "Tensor sumsq, SymInt count, Tensor weight, float eps) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!) num_batches_tracked, Tensor sum, Tensor sumsq, SymInt count, "
      "float? momentum) -> ()");
}

}  // namespace bsnas
