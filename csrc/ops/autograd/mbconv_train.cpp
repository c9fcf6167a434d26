// Autograd of bsnas::mbconv_train: one node for the spring block's training path, over
// the forward and backward of mbconv_train.h.
#include <torch/csrc/autograd/graph_task.h>

#include "autograd_util.h"
#include "../mbconv_train.h"

namespace bsnas {
namespace {

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

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, Autograd, m) {
  m.impl("mbconv_train", &mbconv_train);
}

}  // namespace bsnas
