// bsnas::channel_stats: per-channel sum and sum of squares of an [N, C, H, W] tensor,
// accumulated and returned in float64, for the batch statistics of a BatchNorm
// (var = E[z^2] - E[z]^2 does not cancel in float64). The spring block uses it for the
// expand BN in training. CPU: one vectorised pass (var_mean over (0, 2, 3) is several
// times slower on NCHW), cpu/channel_stats_kernel.h. CUDA: two launches, deterministic
// (cuda/bn_from_sums_kernel.cu).
//
// bsnas::_channel_stats_grad_add_ adds z's gradient through those sums into a gradient
// of z in place, grad_z += grad_sum[c] + 2 z grad_sumsq[c]: one pass (one launch on
// CUDA) where the ATen composite took five (a scaling, two casts, addcmul_, add_). The
// training backward of the expand BN uses it (bn_train_act_dwconv2d_impl.cpp).
// CUDA registration: cuda/channel_stats_kernel.cpp; autograd: autograd/channel_stats.cpp;
// the fake kernels: bsnas/ops/channel_stats.py.
#include <torch/library.h>

namespace bsnas {

TORCH_LIBRARY_FRAGMENT(bsnas, m) {
  // (sum [C], sumsq [C]), both float64.
  m.def("channel_stats(Tensor z) -> (Tensor, Tensor)");
  // grad_z [N, C, H, W] (dense in z's format) += grad_sum[c] + 2 z grad_sumsq[c];
  // grad_sum, grad_sumsq: float64 [C]. Not differentiable.
  m.def(
      "_channel_stats_grad_add_(Tensor(a!) grad_z, Tensor z, Tensor grad_sum, "
      "Tensor grad_sumsq) -> ()");
}

}  // namespace bsnas
