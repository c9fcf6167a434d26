// bsnas::mbconv_folded: a spring block in inference, with its BatchNorms folded into
// the active weights (SpringBlock.folded_weights), in three kernels on either device:
//
//   1. z = expand_w @ x                                   (vendor GEMM, no bias)
//   2. h = act(dwconv(act(z + expand_b), dw_w) + dw_b)    (_mbconv_folded_depthwise:
//      out = project_b (+ x for a residual block)          one kernel writes both)
//   3. out += project_w @ h                               (vendor GEMM, beta = 1)
//
// The expand bias and activation are applied as the depthwise kernel reads z, the
// depthwise bias and activation as it stores h, and the project bias and the shortcut
// are the initial value the last GEMM accumulates into; nothing else is launched. NCHW
// runs the GEMMs batched over images with a zero batch stride on the weight,
// channels_last as one GEMM over all pixels (as masked_pwconv2d_impl.cpp does). Kernels:
// mbconv_folded_impl.cpp (the op, both devices); stage 2 in cpu/mbconv_folded_kernel.h
// and cuda/mbconv_folded_kernel.cu.
#include <torch/library.h>

namespace bsnas {

TORCH_LIBRARY_FRAGMENT(bsnas, m) {
  // x [N, in, H, W]; expand_w [c, in, 1, 1], expand_b [c]; dw_w [c, 1, k, k], dw_b [c];
  // project_w [out, c, 1, 1], project_b [out]; activation code as bn_act_dwconv2d's;
  // residual adds x (stride 1, in == out). Returns [N, out, Ho, Wo] in x's format.
  m.def(
      "mbconv_folded(Tensor x, Tensor expand_w, Tensor expand_b, Tensor dw_w, Tensor dw_b, "
      "Tensor project_w, Tensor project_b, int stride, int activation, bool residual) -> "
      "Tensor");
  // Stage 2 above: (h [N, c, Ho, Wo], out [N, out, Ho, Wo] = project_b (+ shortcut)).
  m.def(
      "_mbconv_folded_depthwise(Tensor z, Tensor expand_b, Tensor dw_w, Tensor dw_b, "
      "Tensor project_b, Tensor? shortcut, int stride, int activation) -> (Tensor, Tensor)");
}

}  // namespace bsnas
