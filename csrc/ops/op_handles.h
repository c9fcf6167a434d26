// Calling bsnas ops through the dispatcher from C++ (the autograd kernels in
// autograd/, the composites *_impl.cpp): typed handles, the signatures
// of the ops called from more than one file, and a dtype cast that never aliases.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <tuple>

namespace bsnas {

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// bsnas::channel_stats
using StatsSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&);
// bsnas::_channel_stats_grad_add_
using StatsGradAddSig = void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
// bsnas::bn_update_running_stats_
using RunningUpdateSig = void(at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&,
                              const at::Tensor&, c10::SymInt, std::optional<double>);
// bsnas::bn_affine_from_sums
using AffineSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     c10::SymInt, const at::Tensor&,
                                                     const at::Tensor&, double);
// bsnas::bn_act_dwconv2d
using BnActSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt,
    int64_t, int64_t, int64_t, int64_t);
// bsnas::_bn_act_dwconv2d_backward
using BnActBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt,
    int64_t, int64_t, int64_t, int64_t);
// bsnas::_bn_affine_from_sums_backward
using AffineBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt,
    const at::Tensor&, double);
// bsnas::masked_pwconv2d and its backward
using PwSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, c10::SymInt);
using PwBwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, c10::SymInt,
                                                    c10::SymInt);
// bsnas::bn_act and its backward
using BnActOnlySig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
using BnActOnlyBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);

// t in dtype dt: t itself when it already is (opcheck rejects a kernel that returns an
// alias of its input, as t.to(dt) then is).
inline at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dt) {
  return t.scalar_type() == dt ? t : t.to(dt);
}

}  // namespace bsnas
