// Autograd of the differentiable bsnas ops, in C++: each op's Autograd kernel is a
// torch::autograd::Function whose forward runs the op below autograd and whose backward
// calls the op's backward op (or, for channel_stats, one ATen addcmul). Registered here
// rather than with torch.library.register_autograd from Python because a Python autograd
// kernel costs about 60-90 us of host time per call, forward and backward, and a spring
// block's training step made seven such calls: on a GPU at batch 64 that host time, not
// the kernels, set the step time (benchmarks/RESULTS.md). Being ordinary Autograd
// kernels, they trace under torch.compile / AOTAutograd (the fake kernels are in Python).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addcmul.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "bn_train_act_dwconv2d.h"
#include "op_handles.h"

namespace bsnas {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The gradient of the i-th *tensor* input, if autograd wants it.
at::Tensor grad_if(const AutogradContext* ctx, size_t i, const at::Tensor& g) {
  return ctx->needs_input_grad(i) ? g : at::Tensor();
}

// z's gradient through its per-channel sum and sum of squares is gs + z * gq: returns
// (gs, gq) = (grad_sum[c], 2 grad_sumsq[c]) in z's dtype, shaped [1, C, 1, 1].
std::pair<at::Tensor, at::Tensor> stats_grad_terms(const at::Tensor& z, const at::Tensor& gsum,
                                                   const at::Tensor& gsumsq) {
  const auto dt = z.scalar_type();
  return {as_dtype(gsum, dt).view({1, -1, 1, 1}), as_dtype(gsumsq.mul(2), dt).view({1, -1, 1, 1})};
}

// ---------------------------------------------------------------- masked_dwconv2d
using DwSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, int64_t, int64_t,
                         int64_t);
using DwBwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, c10::SymInt, int64_t,
                                                    int64_t, int64_t);

struct MaskedDw : torch::autograd::Function<MaskedDw> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            c10::SymInt width, int64_t stride, int64_t padding,
                            int64_t dilation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = handle<DwSig>("bsnas::masked_dwconv2d");
    ctx->save_for_backward({x, w});
    ctx->saved_data["width"] = width;
    ctx->saved_data["geometry"] = std::vector<int64_t>{stride, padding, dilation};
    return op.call(x, w, width, stride, padding, dilation);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = handle<DwBwdSig>("bsnas::_masked_dwconv2d_backward");
    const auto saved = ctx->get_saved_variables();
    const auto geo = ctx->saved_data["geometry"].toIntVector();
    auto [gx, gw] = op.call(grads[0], saved[0], saved[1], ctx->saved_data["width"].toSymInt(),
                            geo[0], geo[1], geo[2]);
    return {grad_if(ctx, 0, gx), grad_if(ctx, 1, gw), {}, {}, {}, {}};
  }
};

at::Tensor masked_dwconv2d(const at::Tensor& x, const at::Tensor& w, c10::SymInt width,
                           int64_t stride, int64_t padding, int64_t dilation) {
  return MaskedDw::apply(x, w, std::move(width), stride, padding, dilation);
}

// ---------------------------------------------------------------- masked_pwconv2d
using PwSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, c10::SymInt);
using PwBwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, c10::SymInt,
                                                    c10::SymInt);

struct MaskedPw : torch::autograd::Function<MaskedPw> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            c10::SymInt in_width, c10::SymInt out_width) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = handle<PwSig>("bsnas::masked_pwconv2d");
    ctx->save_for_backward({x, w});
    ctx->saved_data["in_width"] = in_width;
    ctx->saved_data["out_width"] = out_width;
    return op.call(x, w, in_width, out_width);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = handle<PwBwdSig>("bsnas::_masked_pwconv2d_backward");
    const auto saved = ctx->get_saved_variables();
    auto [gx, gw] = op.call(grads[0], saved[0], saved[1], ctx->saved_data["in_width"].toSymInt(),
                            ctx->saved_data["out_width"].toSymInt());
    return {grad_if(ctx, 0, gx), grad_if(ctx, 1, gw), {}, {}};
  }
};

at::Tensor masked_pwconv2d(const at::Tensor& x, const at::Tensor& w, c10::SymInt in_width,
                           c10::SymInt out_width) {
  return MaskedPw::apply(x, w, std::move(in_width), std::move(out_width));
}

// ---------------------------------------------------------------- bn_act_dwconv2d
using BnActBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt,
    int64_t, int64_t, int64_t, int64_t);

struct BnActDw : torch::autograd::Function<BnActDw> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z,
                               const at::Tensor& scale, const at::Tensor& shift,
                               const at::Tensor& w, c10::SymInt width, int64_t stride,
                               int64_t padding, int64_t dilation, int64_t act) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = handle<BnActSig>("bsnas::bn_act_dwconv2d");
    auto [y, sum, sumsq] = op.call(z, scale, shift, w, width, stride, padding, dilation, act);
    ctx->save_for_backward({z, scale, shift, w, y});
    ctx->saved_data["width"] = width;
    ctx->saved_data["args"] = std::vector<int64_t>{stride, padding, dilation, act};
    return {y, sum, sumsq};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = handle<BnActBwdSig>("bsnas::_bn_act_dwconv2d_backward");
    const auto s = ctx->get_saved_variables();
    const auto a = ctx->saved_data["args"].toIntVector();
    // Undefined output gradients arrive as zeros (materialised): float64 for the sums.
    auto [gz, gs, gb, gw] = op.call(grads[0], grads[1], grads[2], s[0], s[1], s[2], s[3], s[4],
                                    ctx->saved_data["width"].toSymInt(), a[0], a[1], a[2],
                                    a[3]);
    return {grad_if(ctx, 0, gz), grad_if(ctx, 1, gs), grad_if(ctx, 2, gb), grad_if(ctx, 3, gw),
            {}, {}, {}, {}, {}};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_dwconv2d(
    const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& w,
    c10::SymInt width, int64_t stride, int64_t padding, int64_t dilation, int64_t act) {
  auto out = BnActDw::apply(z, scale, shift, w, std::move(width), stride, padding, dilation, act);
  return {out[0], out[1], out[2]};
}

// ---------------------------------------------------------------- bn_train_act_dwconv2d
using AffineBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt,
    const at::Tensor&, double);

struct BnTrainActDw : torch::autograd::Function<BnTrainActDw> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z,
                               const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                               double eps, const at::Tensor& w, c10::SymInt width,
                               int64_t stride, int64_t padding, int64_t dilation, int64_t act) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto f = bn_train_act_dwconv2d_forward(z, bn_weight, bn_bias, eps, w, width, stride,
                                           padding, dilation, act);
    ctx->save_for_backward({z, f.scale, f.shift, w, f.y, f.zsum, f.zsumsq, bn_weight});
    ctx->saved_data["width"] = width;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["args"] = std::vector<int64_t>{stride, padding, dilation, act};
    ctx->mark_non_differentiable({f.zsum, f.zsumsq});
    return {f.y, f.ysum, f.ysumsq, f.zsum, f.zsumsq};
  }
  // The depthwise backward gives grad_z, grad_scale, grad_shift and the weight's
  // gradient; BN's backward turns grad_scale / grad_shift into the gradients of its
  // weight, bias and z's sums; z's share through the sums is added into grad_z in place.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto dw_bwd = handle<BnActBwdSig>("bsnas::_bn_act_dwconv2d_backward");
    static const auto bn_bwd = handle<AffineBwdSig>("bsnas::_bn_affine_from_sums_backward");
    const auto s = ctx->get_saved_variables();
    const at::Tensor &z = s[0], &bn_weight = s[7];
    const auto a = ctx->saved_data["args"].toIntVector();
    const c10::SymInt width = ctx->saved_data["width"].toSymInt();
    auto [gz, gscale, gshift, gw] = dw_bwd.call(grads[0], grads[1], grads[2], z, s[1], s[2],
                                                s[3], s[4], width, a[0], a[1], a[2], a[3]);
    at::Tensor g_bn_weight, g_bn_bias;
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      const auto bt = bn_weight.scalar_type();
      auto [gsum, gsumsq, gbw, gbb] =
          bn_bwd.call(as_dtype(gscale, bt), as_dtype(gshift, bt), s[5], s[6],
                      z.sym_numel() / width, bn_weight, ctx->saved_data["eps"].toDouble());
      g_bn_weight = gbw;
      g_bn_bias = gbb;
      if (ctx->needs_input_grad(0)) {  // grad_z += grad_zsum[c] + 2 z grad_zsumsq[c]
        const auto [gs, gq] = stats_grad_terms(z, gsum, gsumsq);
        gz.addcmul_(z, gq).add_(gs);
      }
    }
    // needs_input_grad counts tensor inputs only: z, bn_weight, bn_bias, weight.
    return {grad_if(ctx, 0, gz), grad_if(ctx, 1, g_bn_weight), grad_if(ctx, 2, g_bn_bias), {},
            grad_if(ctx, 3, gw), {}, {}, {}, {}, {}};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_train_act_dwconv2d(
    const at::Tensor& z, const at::Tensor& bn_weight, const at::Tensor& bn_bias, double eps,
    const at::Tensor& w, c10::SymInt width, int64_t stride, int64_t padding, int64_t dilation,
    int64_t act) {
  auto out = BnTrainActDw::apply(z, bn_weight, bn_bias, eps, w, std::move(width), stride,
                                 padding, dilation, act);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// ---------------------------------------------------------------- channel_stats
struct ChannelStats : torch::autograd::Function<ChannelStats> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = handle<StatsSig>("bsnas::channel_stats");
    auto [sum, sumsq] = op.call(z);
    ctx->save_for_backward({z});
    return {sum, sumsq};
  }
  // grad_z = grad_sum[c] + 2 z grad_sumsq[c]: one pass over z.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor z = ctx->get_saved_variables()[0];
    const auto [gs, gq] = stats_grad_terms(z, grads[0], grads[1]);
    return {at::addcmul(gs, z, gq)};
  }
};

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& z) {
  auto out = ChannelStats::apply(z);
  return {out[0], out[1]};
}

// ---------------------------------------------------------------- bn_affine_from_sums
struct BnAffine : torch::autograd::Function<BnAffine> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& sum,
                               const at::Tensor& sumsq, c10::SymInt count,
                               const at::Tensor& w, const at::Tensor& b, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = handle<AffineSig>("bsnas::bn_affine_from_sums");
    auto [scale, shift] = op.call(sum, sumsq, count, w, b, eps);
    ctx->save_for_backward({sum, sumsq, w});
    ctx->saved_data["count"] = count;
    ctx->saved_data["eps"] = eps;
    return {scale, shift};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = handle<AffineBwdSig>("bsnas::_bn_affine_from_sums_backward");
    const auto s = ctx->get_saved_variables();
    auto [gs, gq, gw, gb] = op.call(grads[0], grads[1], s[0], s[1],
                                    ctx->saved_data["count"].toSymInt(), s[2],
                                    ctx->saved_data["eps"].toDouble());
    // needs_input_grad counts tensor inputs only: sum, sumsq, weight, bias.
    return {grad_if(ctx, 0, gs), grad_if(ctx, 1, gq), {}, grad_if(ctx, 2, gw),
            grad_if(ctx, 3, gb), {}};
  }
};

std::tuple<at::Tensor, at::Tensor> bn_affine_from_sums(const at::Tensor& sum,
                                                       const at::Tensor& sumsq,
                                                       c10::SymInt count, const at::Tensor& w,
                                                       const at::Tensor& b, double eps) {
  auto out = BnAffine::apply(sum, sumsq, std::move(count), w, b, eps);
  return {out[0], out[1]};
}

// ---------------------------------------------------------------- bn_act
using BnActOnlySig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
using BnActOnlyBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);

struct BnActFn : torch::autograd::Function<BnActFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& scale,
                            const at::Tensor& shift, int64_t act) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = handle<BnActOnlySig>("bsnas::bn_act");
    ctx->save_for_backward({y, scale, shift});
    ctx->saved_data["act"] = act;
    return op.call(y, scale, shift, act);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = handle<BnActOnlyBwdSig>("bsnas::_bn_act_backward");
    const auto saved = ctx->get_saved_variables();
    auto [gy, gscale, gshift] =
        op.call(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["act"].toInt());
    return {grad_if(ctx, 0, gy), grad_if(ctx, 1, gscale), grad_if(ctx, 2, gshift), {}};
  }
};

at::Tensor bn_act(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                  int64_t act) {
  return BnActFn::apply(y, scale, shift, act);
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, Autograd, m) {
  m.impl("bn_act", &bn_act);
  m.impl("masked_dwconv2d", &masked_dwconv2d);
  m.impl("masked_pwconv2d", &masked_pwconv2d);
  m.impl("bn_act_dwconv2d", &bn_act_dwconv2d);
  m.impl("bn_train_act_dwconv2d", &bn_train_act_dwconv2d);
  m.impl("channel_stats", &channel_stats);
  m.impl("bn_affine_from_sums", &bn_affine_from_sums);
}

}  // namespace bsnas
