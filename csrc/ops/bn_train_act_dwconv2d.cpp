// bsnas::bn_train_act_dwconv2d, the spring block's expand BN in training mode with the
// fused depthwise pass behind it:
//
//   zsum, zsumsq = channel_stats(z)                                   (float64)
//   scale, shift = bn_affine_from_sums(zsum, zsumsq, N*H*W, bn_weight, bn_bias, eps)
//   y, ysum, ysumsq = bn_act_dwconv2d(z, scale, shift, weight, width, ...)
//
// One op, and one autograd node, for what were three: the backward then adds the batch
// statistics' share of z's gradient, grad_zsum[c] + 2 z grad_zsumsq[c], in place into the
// depthwise backward's grad_z; through three nodes that share would come as a fresh
// tensor (one more pass, and on CPU the page faults of a new large output) for autograd
// to add. zsum / zsumsq come out for the running-statistics update
// (bn_update_running_stats_) and are not differentiable.
//
// The forward and backward are composites of the three ops
// (bn_train_act_dwconv2d_impl.cpp); the autograd kernel is in autograd/bn_train_act_dwconv2d.cpp, the fake kernel in
// bsnas/ops/bn_act_dwconv.py.
#include <torch/library.h>

namespace bsnas {

TORCH_LIBRARY_FRAGMENT(bsnas, m) {
  // Returns (y [N, width, Ho, Wo], ysum [width], ysumsq [width], zsum [width],
  // zsumsq [width]); the four sums are float64. bn_weight / bn_bias: [C_max >= width].
  m.def(
      "bn_train_act_dwconv2d(Tensor z, Tensor bn_weight, Tensor bn_bias, float eps, "
      "Tensor weight, SymInt width, int stride, int padding, int dilation, int activation) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace bsnas
