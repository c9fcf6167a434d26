// The forward and backward of bsnas::bn_train_act_dwconv2d
// (bn_train_act_dwconv2d_impl.cpp), shared by its composite kernel, its autograd kernel
// (autograd/bn_train_act_dwconv2d.cpp) and the spring block's training op
// bsnas::mbconv_train (mbconv_train_impl.cpp).
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

struct BnTrainGrads {
  at::Tensor z, bn_weight, bn_bias, weight;  // bn_* undefined unless wanted
};

// Gradients of bn_train_act_dwconv2d from those of y and its two sums (undefined sums'
// gradients count as zero). `f` is the forward's result (only y, the z sums and the
// affine map are read). The BN's gradients (and z's share through its batch statistics)
// are computed only when `want_bn` (or `want_z`): z's share is added into the depthwise
// backward's grad_z in place.
BnTrainGrads bn_train_act_dwconv2d_backward(const at::Tensor& grad_y, const at::Tensor& grad_ysum,
                                            const at::Tensor& grad_ysumsq, const at::Tensor& z,
                                            const BnTrainForward& f, const at::Tensor& bn_weight,
                                            double eps, const at::Tensor& weight,
                                            const c10::SymInt& width, int64_t stride,
                                            int64_t padding, int64_t dilation, int64_t act,
                                            bool want_z, bool want_bn);

}  // namespace bsnas
