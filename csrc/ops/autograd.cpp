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
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "bn_train_act_dwconv2d.h"
#include "masked_conv_common.h"
#include "mbconv_train.h"
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
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto a = ctx->saved_data["args"].toIntVector();
    BnTrainForward f;
    f.scale = s[1], f.shift = s[2], f.y = s[4], f.zsum = s[5], f.zsumsq = s[6];
    const bool want_z = ctx->needs_input_grad(0);
    auto g = bn_train_act_dwconv2d_backward(
        grads[0], grads[1], grads[2], s[0], f, s[7], ctx->saved_data["eps"].toDouble(), s[3],
        ctx->saved_data["width"].toSymInt(), a[0], a[1], a[2], a[3], want_z,
        ctx->needs_input_grad(1) || ctx->needs_input_grad(2));
    // needs_input_grad counts tensor inputs only: z, bn_weight, bn_bias, weight.
    return {grad_if(ctx, 0, g.z), grad_if(ctx, 1, g.bn_weight), grad_if(ctx, 2, g.bn_bias), {},
            grad_if(ctx, 3, g.weight), {}, {}, {}, {}, {}};
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

// ---------------------------------------------------------------- mbconv_train
struct MbconvTrain : torch::autograd::Function<MbconvTrain> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& expand_weight, const at::Tensor& bn1_weight,
                               const at::Tensor& bn1_bias, double eps1,
                               const at::Tensor& dw_weight, const at::Tensor& bn2_weight,
                               const at::Tensor& bn2_bias, double eps2,
                               const at::Tensor& project_weight, c10::SymInt width,
                               int64_t stride, int64_t act) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const MbconvTrainParams a{expand_weight, bn1_weight, bn1_bias, dw_weight, bn2_weight,
                              bn2_bias, project_weight, eps1, eps2, width, stride, act};
    auto f = mbconv_train_forward(x, a);
    ctx->save_for_backward({x, expand_weight, bn1_weight, bn1_bias, dw_weight, bn2_weight,
                            bn2_bias, project_weight, f.dw.scale, f.dw.shift, f.dw.zsum,
                            f.dw.zsumsq, f.dw.ysum, f.dw.ysumsq, f.scale2, f.shift2});
    // The three hidden tensors (internal: no other reference, no grad_fn) are kept as
    // saved data, which the backward can drop one by one after its last use of each.
    ctx->saved_data["z"] = f.z;
    ctx->saved_data["y"] = f.dw.y;
    ctx->saved_data["h"] = f.h;
    ctx->saved_data["width"] = width;
    ctx->saved_data["eps"] = std::vector<double>{eps1, eps2};
    ctx->saved_data["args"] = std::vector<int64_t>{stride, act};
    ctx->mark_non_differentiable({f.dw.zsum, f.dw.zsumsq, f.dw.ysum, f.dw.ysumsq});
    ctx->set_materialize_grads(false);  // no zero tensors for the sums' (absent) gradients
    return {f.p, f.dw.zsum, f.dw.zsumsq, f.dw.ysum, f.dw.ysumsq};
  }
  // `grads` by reference: the node's input buffer, whose gradient of p is its only
  // reference, moved on to the backward, which drops it after its first use.
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    if (!grads[0].defined()) return variable_list(13);  // p unused: every gradient zero
    const auto s = ctx->get_saved_variables();
    const auto eps = ctx->saved_data["eps"].toDoubleVector();
    const auto args = ctx->saved_data["args"].toIntVector();
    const MbconvTrainParams a{s[1], s[2], s[3], s[4], s[5], s[6], s[7], eps[0], eps[1],
                              ctx->saved_data["width"].toSymInt(), args[0], args[1]};
    MbconvTrainForward f;
    f.dw.scale = s[8], f.dw.shift = s[9];
    f.dw.zsum = s[10], f.dw.zsumsq = s[11], f.dw.ysum = s[12], f.dw.ysumsq = s[13];
    f.scale2 = s[14], f.shift2 = s[15];
    // Unless the graph is kept for another backward, the node lets go of them here.
    const bool keep = torch::autograd::get_current_graph_task_keep_graph();
    for (auto [name, t] : {std::pair{"z", &f.z}, std::pair{"y", &f.dw.y}, std::pair{"h", &f.h}}) {
      TORCH_CHECK(ctx->saved_data.count(name), "mbconv_train: trying to backward through the "
                  "graph a second time; specify retain_graph=True the first time");
      *t = ctx->saved_data[name].toTensor();
      if (!keep) ctx->saved_data.erase(name);
    }
    auto g = mbconv_train_backward(std::move(grads[0]), s[0], a, std::move(f),
                                   ctx->needs_input_grad(0));
    // needs_input_grad counts tensor inputs only: x, expand_weight, bn1_weight, bn1_bias,
    // dw_weight, bn2_weight, bn2_bias, project_weight.
    return {grad_if(ctx, 0, g.x),          grad_if(ctx, 1, g.expand_weight),
            grad_if(ctx, 2, g.bn1_weight), grad_if(ctx, 3, g.bn1_bias),
            {},                            grad_if(ctx, 4, g.dw_weight),
            grad_if(ctx, 5, g.bn2_weight), grad_if(ctx, 6, g.bn2_bias),
            {},                            grad_if(ctx, 7, g.project_weight),
            {},                            {},
            {}};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mbconv_train(
    const at::Tensor& x, const at::Tensor& expand_weight, const at::Tensor& bn1_weight,
    const at::Tensor& bn1_bias, double eps1, const at::Tensor& dw_weight,
    const at::Tensor& bn2_weight, const at::Tensor& bn2_bias, double eps2,
    const at::Tensor& project_weight, c10::SymInt width, int64_t stride, int64_t act) {
  auto out = MbconvTrain::apply(x, expand_weight, bn1_weight, bn1_bias, eps1, dw_weight,
                                bn2_weight, bn2_bias, eps2, project_weight, std::move(width),
                                stride, act);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// ---------------------------------------------------------------- channel_stats
struct ChannelStats : torch::autograd::Function<ChannelStats> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = handle<StatsSig>("bsnas::channel_stats");
    auto [sum, sumsq] = op.call(z);
    ctx->save_for_backward({z});
    // An unused output's gradient stays undefined: z * 0 would be NaN where z is NaN or
    // Inf, where the gradient of the sums that are used is finite.
    ctx->set_materialize_grads(false);
    return {sum, sumsq};
  }
  // grad_z = grad_sum[c] + 2 z grad_sumsq[c]: one pass over z (either term alone where
  // the other output is unused).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool has_sum = grads[0].defined(), has_sq = grads[1].defined();
    if (!has_sum && !has_sq) return {at::Tensor()};
    const at::Tensor z = ctx->get_saved_variables()[0];
    if (!has_sq) {
      const at::Tensor gs = as_dtype(grads[0], z.scalar_type()).view({1, -1, 1, 1});
      return {gs.expand(z.sizes()).contiguous(compute_format(z))};
    }
    if (!has_sum) return {z.mul(as_dtype(grads[1].mul(2), z.scalar_type()).view({1, -1, 1, 1}))};
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

// ---------------------------------------------------------------- in-place ops
// bn_update_running_stats_ and _channel_stats_grad_add_ write through data pointers,
// which autograd does not see. Their ADInplaceOrView kernels bump the written tensors'
// version counters, as PyTorch's own in-place ops do: autograd's check of saved tensors
// and SpringBlock's fold key (bsnas/nn/spring_block.py) read them. Without this, a
// running-statistics update left running_mean's version unchanged.
void update_running_stats_(at::Tensor& mean, at::Tensor& var, at::Tensor& batches,
                           const at::Tensor& sum, const at::Tensor& sumsq, c10::SymInt count,
                           std::optional<double> momentum) {
  static const auto op = handle<RunningUpdateSig>("bsnas::bn_update_running_stats_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(mean, var, batches, sum, sumsq, std::move(count), momentum);
  }
  for (const at::Tensor* t : {&mean, &var, &batches}) torch::autograd::increment_version(*t);
}

void stats_grad_add_(at::Tensor& grad_z, const at::Tensor& z, const at::Tensor& grad_sum,
                     const at::Tensor& grad_sumsq) {
  static const auto op = handle<StatsGradAddSig>("bsnas::_channel_stats_grad_add_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(grad_z, z, grad_sum, grad_sumsq);
  }
  torch::autograd::increment_version(grad_z);
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, ADInplaceOrView, m) {
  m.impl("bn_update_running_stats_", &update_running_stats_);
  m.impl("_channel_stats_grad_add_", &stats_grad_add_);
}

TORCH_LIBRARY_IMPL(bsnas, Autograd, m) {
  m.impl("bn_act", &bn_act);
  m.impl("masked_dwconv2d", &masked_dwconv2d);
  m.impl("masked_pwconv2d", &masked_pwconv2d);
  m.impl("bn_act_dwconv2d", &bn_act_dwconv2d);
  m.impl("bn_train_act_dwconv2d", &bn_train_act_dwconv2d);
  m.impl("mbconv_train", &mbconv_train);
  m.impl("channel_stats", &channel_stats);
  m.impl("bn_affine_from_sums", &bn_affine_from_sums);
}

}  // namespace bsnas
