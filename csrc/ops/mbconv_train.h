// The forward and backward of bsnas::mbconv_train (mbconv_train_impl.cpp), shared by its
// composite kernel and its autograd kernel (autograd/mbconv_train.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include "bn_train_act_dwconv2d.h"

namespace bsnas {

// The block's weights and BN parameters (the full-width tensors) and its geometry.
struct MbconvTrainParams {
  at::Tensor expand_weight, bn1_weight, bn1_bias, dw_weight, bn2_weight, bn2_bias,
      project_weight;
  double eps1, eps2;
  c10::SymInt width;
  int64_t stride, act;
};

struct MbconvTrainForward {
  at::Tensor z;                // expand output [N, width, H, W]
  BnTrainForward dw;           // depthwise output y, the float64 sums, BN1's affine map
  at::Tensor scale2, shift2;   // BN2's affine map, in y's dtype
  at::Tensor h;                // act(BN2(y)), the project input
  at::Tensor p;                // project output [N, out, Ho, Wo]
};

MbconvTrainForward mbconv_train_forward(const at::Tensor& x, const MbconvTrainParams& a);

struct MbconvTrainGrads {
  at::Tensor x, expand_weight, bn1_weight, bn1_bias, dw_weight, bn2_weight, bn2_bias,
      project_weight;
};

// Every gradient from grad_p; only f's z, dw (y, zsum, zsumsq, ysum, ysumsq, scale,
// shift), scale2, shift2 and h are read. `grad_p` and `f` are taken over: each tensor is
// let go as soon as the backward is past its last use (as separate autograd nodes would
// free them), so that the gradients allocated later can reuse its memory. x's gradient is
// computed either way (by the expand GEMM's backward) but dropped at once unless
// `want_x`: freed before z's gradient, as the expand node of the five-op graph did, so
// that glibc reuses its pages rather than faulting in fresh ones.
MbconvTrainGrads mbconv_train_backward(at::Tensor grad_p, const at::Tensor& x,
                                       const MbconvTrainParams& a, MbconvTrainForward&& f,
                                       bool want_x);

}  // namespace bsnas
