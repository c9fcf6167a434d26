// grad_weight of the fused bsnas::bn_act_dwconv2d on CUDA: the depthwise weight-gradient
// reduction (launch_weight_grad in dwconv_cuda.cuh) with its operands read
// through BnActLoads: the upstream gradient gyt = grad_y + grad_sum[c] + 2 * y *
// grad_sumsq[c] and the input a = act(z * scale + shift), both formed where read. Strips
// of kStrip outputs for k = 3, 5, 7, stride 1 or 2 and dilation 1 (each input row span
// goes through BN + act once), per-tap reads otherwise. Deterministic: fixed-order block
// reductions, split partials summed in order by sum_splits.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "bn_act_dwconv2d_kernel.h"
#include "dwconv_cuda.cuh"

namespace bsnas {
namespace bn_act_cuda {

void weight_grad(const at::Tensor& gy, const at::Tensor& gsum, const at::Tensor& gsq,
                 const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                 const at::Tensor& y, int64_t act, at::Tensor& gw, const DwGeometry& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, z.scalar_type(),
      "bn_act_dwconv2d_backward", [&] {
        launch_weight_grad(make_bn_act_loads<scalar_t>(gy, gsum, gsq, z, scale, shift, y, act),
                           gw.mutable_data_ptr<scalar_t>(), z, g, gw.numel(), /*strips=*/true,
                           c10::cuda::getCurrentCUDAStream());
      });
}

}  // namespace bn_act_cuda
}  // namespace bsnas
