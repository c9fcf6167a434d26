// Schema of the masked variable-width depthwise convolution. Kernels live in
// cpu/masked_dwconv2d_kernel.h (registered in cpu/register_cpu.cpp) and
// cuda/masked_dwconv2d_kernel.cu; autograd in autograd/masked_dwconv2d.cpp; the fake
// (meta) kernel is registered from Python (bsnas/ops/masked_conv.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bsnas, m) {
  // y = conv2d(x, weight[:width], stride, padding, dilation, groups=width), reading the
  // full-width weight [C_max, 1, k, k] in place.
  m.def(
      "masked_dwconv2d(Tensor x, Tensor weight, SymInt width, int stride, int padding, "
      "int dilation) -> Tensor");
  // (grad_x [N, width, H, W], grad_weight [C_max, 1, k, k], zero past `width`).
  m.def(
      "_masked_dwconv2d_backward(Tensor grad_out, Tensor x, Tensor weight, SymInt width, "
      "int stride, int padding, int dilation) -> (Tensor, Tensor)");
}
