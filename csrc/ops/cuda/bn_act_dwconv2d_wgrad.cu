// grad_weight of the fused bsnas::bn_act_dwconv2d on CUDA: the depthwise weight-gradient
// reduction (dw_bwd_w_nchw / dw_bwd_w_nhwc in dwconv_cuda.cuh) with its operands read
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

#include "bn_act_dwconv2d_cuda.h"
#include "dwconv_cuda.cuh"

namespace bsnas {
namespace {

template <typename scalar_t>
void launch_weight_grad(const BnActLoads<scalar_t>& ld, at::Tensor& gw, const at::Tensor& z,
                        const DwGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(z.get_device());
  scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
  const int64_t KK = g.K * g.K;
  const Tile tile = g.channels_last ? channel_tile(g.C) : Tile{0, 0, 0};
  at::Tensor part;
  // A reduction over the N*Ho*Wo outputs (or N*Ho*strips) of each channel.
  dispatch_strips(g, gw.numel(), [&]<typename index_t, int KS, int ST>() {
    const int64_t M = g.N * g.Ho * row_positions<ST>(g.Wo);
    const Split sp = g.channels_last ? split_positions(M, tile.tiles, tile.py, sms)
                                     : split_positions(M, g.C, kThreads, sms);
    acc_t* partp = nullptr;
    if (sp.splits > 1) {
      part = partial_buffer<acc_t>(z, sp.splits, g.C, KK);
      partp = part.mutable_data_ptr<acc_t>();
    }
    const Dims<index_t> d = make_dims<index_t>(g);
    const auto chunk = static_cast<index_t>(sp.chunk);
    if (g.channels_last) {
      const dim3 grid(static_cast<unsigned>(tile.tiles), static_cast<unsigned>(sp.splits));
      dw_bwd_w_nhwc<scalar_t, index_t, KS, BnActLoads<scalar_t>, ST>
          <<<grid, dim3(tile.ct, tile.py), 0, stream>>>(ld, gwp, partp, d, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const dim3 grid(static_cast<unsigned>(g.C), static_cast<unsigned>(sp.splits));
      dw_bwd_w_nchw<scalar_t, index_t, KS, BnActLoads<scalar_t>, ST>
          <<<grid, kThreads, 0, stream>>>(ld, gwp, partp, d, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // Rows [0, width) of the full-width gradient (rows past `width` stay zero).
    if (sp.splits > 1)
      launch_sum_splits<scalar_t, acc_t>(partp, sp.splits, g.C * KK, gwp, nullptr, sms,
                                         stream);
  });
}

}  // namespace

namespace bn_act_cuda {

void weight_grad(const at::Tensor& gy, const at::Tensor& gsum, const at::Tensor& gsq,
                 const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                 const at::Tensor& y, int64_t act, at::Tensor& gw, const DwGeometry& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, z.scalar_type(),
      "bn_act_dwconv2d_backward", [&] {
        launch_weight_grad(make_bn_act_loads<scalar_t>(gy, gsum, gsq, z, scale, shift, y, act),
                           gw, z, g);
      });
}

}  // namespace bn_act_cuda
}  // namespace bsnas
