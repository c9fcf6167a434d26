// The forward of bsnas::bn_train_act_dwconv2d (bn_train_act_dwconv2d.cpp), shared by its
// composite kernel and its autograd kernel (autograd.cpp), which keeps the affine map.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

namespace bsnas {

struct BnTrainForward {
  at::Tensor y, ysum, ysumsq;  // the depthwise output and its float64 sums
  at::Tensor zsum, zsumsq;     // z's float64 batch sums
  at::Tensor scale, shift;     // BN's per-channel affine map, in z's dtype
};

BnTrainForward bn_train_act_dwconv2d_forward(const at::Tensor& z, const at::Tensor& bn_weight,
                                             const at::Tensor& bn_bias, double eps,
                                             const at::Tensor& weight, const c10::SymInt& width,
                                             int64_t stride, int64_t padding, int64_t dilation,
                                             int64_t act);

}  // namespace bsnas
