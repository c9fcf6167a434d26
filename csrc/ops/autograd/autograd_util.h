// What the C++ autograd kernels of the bsnas ops (autograd/<op>.cpp) share. Each op's
// Autograd kernel is a torch::autograd::Function whose forward runs the op below autograd
// and whose backward calls the op's backward op. They are registered in C++ rather than
// with torch.library.register_autograd from Python because a Python autograd kernel's
// host time per call, not the kernels, bounded a GPU's training step
// (docs/performance.md). Being ordinary Autograd kernels, they trace under torch.compile /
// AOTAutograd (the fake kernels are in Python).
#pragma once

#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "../op_handles.h"

namespace bsnas {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The gradient of the i-th *tensor* input, if autograd wants it.
inline at::Tensor grad_if(const AutogradContext* ctx, size_t i, const at::Tensor& g) {
  return ctx->needs_input_grad(i) ? g : at::Tensor();
}

}  // namespace bsnas
