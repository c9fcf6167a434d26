// bsnas::bn_act: h = act(y * scale[c] + shift[c]) for an [N, C, H, W] tensor, the BN
// (as a per-channel affine) and activation after the spring block's depthwise in
// training, and its backward in one pass:
//   gu = grad_h * act'(u), u = y * scale + shift (recomputed, never stored)
//   grad_y = gu * scale, grad_scale = sum(gu * y), grad_shift = sum(gu)  (sums in float64)
// The eager composite (addcmul, clamp) took two passes forward and six backward
// (hardtanh_backward, three multiplications, two sums). Kernels: cpu/bn_act_kernel.h,
// cuda/bn_act_kernel.cu.
// Autograd: autograd/bn_act.cpp; fake kernels: bsnas/ops/bn_act.py.
#include <torch/library.h>

namespace bsnas {

TORCH_LIBRARY_FRAGMENT(bsnas, m) {
  m.def("bn_act(Tensor y, Tensor scale, Tensor shift, int act) -> Tensor");
  // (grad_y, grad_scale, grad_shift)
  m.def("_bn_act_backward(Tensor grad_h, Tensor y, Tensor scale, Tensor shift, int act) "
        "-> (Tensor, Tensor, Tensor)");
}

}  // namespace bsnas
