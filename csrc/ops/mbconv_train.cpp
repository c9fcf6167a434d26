// bsnas::mbconv_train: a spring block in training, from its input to the project
// convolution's output, as one op and one autograd node:
//
//   z = conv1x1(x, expand_weight[:width])                   masked_pwconv2d
//   y = dwconv(act(BN1(z)), dw_weight[:width], stride)      bn_train_act_dwconv2d
//   h = act(BN2(y))                                         bn_affine_from_sums + bn_act
//   p = conv1x1(h, project_weight[:, :width])               masked_pwconv2d
//
// BN1 and BN2 normalise with the batch statistics (float64 sums, which come out for the
// running-statistics update, bn_update_running_stats_); the project BN and the residual
// are the caller's. The kernels are those of the ops named on the right; what the op
// saves is the host work between them (Python, four autograd nodes, their saved tensors),
// which bounds a GPU's training step on small planes (docs/performance.md).
//
// Composite kernel: mbconv_train_impl.cpp; autograd kernel: autograd/mbconv_train.cpp;
// fake kernel: bsnas/ops/mbconv_train.py.
#include <torch/library.h>

namespace bsnas {

TORCH_LIBRARY_FRAGMENT(bsnas, m) {
  // x [N, in, H, W]; expand_weight [C_max, >= in, 1, 1]; bn1_* / bn2_* [>= width];
  // dw_weight [C_max, 1, k, k] (odd k, "same" padding); project_weight [out, >= width,
  // 1, 1]; activation: bn_act_dwconv2d's code. Returns (p [N, out, Ho, Wo] in x's memory
  // format, zsum, zsumsq, ysum, ysumsq [width], float64, not differentiable).
  m.def(
      "mbconv_train(Tensor x, Tensor expand_weight, Tensor bn1_weight, Tensor bn1_bias, "
      "float eps1, Tensor dw_weight, Tensor bn2_weight, Tensor bn2_bias, float eps2, "
      "Tensor project_weight, SymInt width, int stride, int activation) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace bsnas
