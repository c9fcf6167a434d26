// bsnas::masked_pwconv2d: a 1x1 convolution over the top-left [out_width, in_width]
// block of a full [Cout_max, Cin_max, 1, 1] weight.
//
// A pointwise convolution is a matrix product, so it runs on the vendor GEMM (BLAS on
// CPU, cuBLAS on CUDA) through ATen. The active block is passed as a strided view
// (leading dimension Cin_max): no weight slice is ever copied and no inactive channel
// is computed. channels_last is one GEMM over [N*H*W, in_width]; NCHW is one batched
// GEMM whose weight operand has batch stride 0. The same code serves both devices
// (masked_pwconv2d_impl.cpp); autograd: autograd/masked_pwconv2d.cpp.
#include <torch/library.h>

namespace bsnas {

TORCH_LIBRARY_FRAGMENT(bsnas, m) {
  // y = conv2d(x, weight[:out_width, :in_width]) without materialising the slice.
  m.def(
      "masked_pwconv2d(Tensor x, Tensor weight, SymInt in_width, SymInt out_width) -> "
      "Tensor");
  // (grad_x [N, in_width, H, W], grad_weight [Cout_max, Cin_max, 1, 1], zero outside
  // the active block).
  m.def(
      "_masked_pwconv2d_backward(Tensor grad_out, Tensor x, Tensor weight, SymInt "
      "in_width, SymInt out_width) -> (Tensor, Tensor)");
}

}  // namespace bsnas
