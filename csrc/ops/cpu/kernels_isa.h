// The CPU kernels are compiled once per instruction set, each copy in its own
// namespace (bsnas::cpu::generic, ::avx2, ::avx512) by a translation unit that sets the
// target with `#pragma GCC target` around the kernel headers only; ATen and the
// standard library are included before it, so only our loops use the wider
// instructions. register_cpu.cpp picks the widest copy the running CPU supports.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "../masked_conv_common.h"
#include "memory_policy.h"

namespace bsnas::cpu {
// A float32 GEMM over a batch (gemm_kernel.h): for every b < batch,
//   C_b[m][n] (row stride ldc) (+)= sum_k A_b(m, k) B_b(k, n),
//   A_b(m, k) = a[b * a_batch + m * as_m + k * as_k], B_b(k, n) = b[b * b_batch + k * bs_k
//   + n * bs_n], C_b at c + b * c_batch,
// added to C with `add`, written in full otherwise; M, N, K, batch >= 1.
struct GemmArgs {
  int64_t M, N, K;
  const float* a;
  int64_t as_m, as_k;
  const float* b;
  int64_t bs_k, bs_n;
  float* c;
  int64_t ldc;
  bool add = false;
  int64_t batch = 1, a_batch = 0, b_batch = 0, c_batch = 0;
};
}  // namespace bsnas::cpu

#define BSNAS_DECLARE_CPU_KERNELS(ISA)                                                    \
  namespace bsnas::cpu::ISA {                                                             \
  at::Tensor dw_forward(const at::Tensor& x, const at::Tensor& weight, int64_t width,     \
                        int64_t stride, int64_t padding, int64_t dilation);               \
  std::tuple<at::Tensor, at::Tensor> dw_backward(                                         \
      const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,          \
      int64_t width, int64_t stride, int64_t padding, int64_t dilation);                  \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_dw_forward(                       \
      const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,              \
      const at::Tensor& weight, int64_t width, int64_t stride, int64_t padding,           \
      int64_t dilation, int64_t act);                                                     \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_dw_backward(          \
      const at::Tensor& grad_y, const at::Tensor& grad_sum, const at::Tensor& grad_sumsq, \
      const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,              \
      const at::Tensor& weight, const at::Tensor& y, int64_t width, int64_t stride,       \
      int64_t padding, int64_t dilation, int64_t act);                                    \
  std::tuple<at::Tensor, at::Tensor> folded_dw_forward(                                   \
      const at::Tensor& z, const at::Tensor& expand_b, const at::Tensor& dw_w,            \
      const at::Tensor& dw_b, const at::Tensor& project_b,                                \
      const std::optional<at::Tensor>& shortcut, int64_t stride, int64_t act);            \
  std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& z);                  \
  void channel_stats_grad_add(at::Tensor& grad_z, const at::Tensor& z,                    \
                              const at::Tensor& grad_sum, const at::Tensor& grad_sumsq);  \
  at::Tensor bn_act_forward(const at::Tensor& y, const at::Tensor& scale,                 \
                            const at::Tensor& shift, int64_t act);                        \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward(                         \
      const at::Tensor& grad_h, const at::Tensor& y, const at::Tensor& scale,             \
      const at::Tensor& shift, int64_t act);                                              \
  void gemm_f32(const GemmArgs& g);                                                       \
  int64_t gemm_f32_lanes();                                                               \
  }

BSNAS_DECLARE_CPU_KERNELS(generic)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BSNAS_CPU_X86_VARIANTS 1
BSNAS_DECLARE_CPU_KERNELS(avx2)
BSNAS_DECLARE_CPU_KERNELS(avx512)
#endif

namespace bsnas::cpu {
// [N, C, H, W] in channels_last memory as the dense [N*H*W, C] matrix it already is.
inline at::Tensor rows_view(const at::Tensor& t) {
  return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)});
}

// The float32 GEMM of the 1x1 convolutions (gemm_kernel.h, GemmArgs above) in the widest
// instruction-set copy the CPU supports. The batch's C blocks must not overlap (they
// are computed in parallel).
void gemm_f32(const GemmArgs& g);
// The float32 lanes of that copy's vectors (16 for AVX-512, 8 for AVX2): gemm_f32's
// column panels are whole vectors, so a column count that is not a multiple of this
// leaves lanes idle.
int64_t gemm_f32_lanes();

// out (+)= a @ b for 2-D tensors (added with `add`; out written in full otherwise).
// float32 on CPU with a unit-stride out row runs gemm_f32, reading a and b through
// their strides (MKL's sgemm behind at::mm runs at half the speed of oneDNN's 1x1
// convolutions, and oneDNN's matmul is reachable only through a wrapper that copies a
// non-contiguous weight block; gemm_kernel.h); everything else at::mm / addmm.
// Whether out (+)= a @ b(s) runs gemm_f32: float32 CPU tensors, a unit-stride out row,
// nothing empty (a: [M, K]; out: [M, P] or [N, M, P]).
inline bool runs_gemm_f32(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  return out.is_cpu() && out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
         b.scalar_type() == at::kFloat && out.stride(-1) == 1 && out.numel() > 0 &&
         a.size(1) > 0;
}

inline void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                        bool add = false) {
  if (runs_gemm_f32(out, a, b)) {
    gemm_f32({out.size(0), out.size(1), a.size(1), a.const_data_ptr<float>(), a.stride(0),
              a.stride(1), b.const_data_ptr<float>(), b.stride(0), b.stride(1),
              out.mutable_data_ptr<float>(), out.stride(0), add});
    return;
  }
  if (add) out.addmm_(a, b);
  else at::mm_out(out, a, b);
}

// out[n] (+)= a @ b[n] for every n of the 3-D out [N, M, P] and b [N, K, P], one 2-D a
// [M, K] shared by all: one batched gemm_f32 for float32 on CPU (one parallel region
// for the whole batch: per-image calls would each pay for starting threads), else one
// batched GEMM whose a has batch stride 0 (nothing is copied).
inline void shared_left_bmm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                                 bool add = false) {
  if (runs_gemm_f32(out, a, b)) {
    GemmArgs g{out.size(1), out.size(2), a.size(1), a.const_data_ptr<float>(), a.stride(0),
               a.stride(1), b.const_data_ptr<float>(), b.stride(1), b.stride(2),
               out.mutable_data_ptr<float>(), out.stride(1), add};
    g.batch = out.size(0);
    g.b_batch = b.stride(0);
    g.c_batch = out.stride(0);
    gemm_f32(g);
    return;
  }
  const at::Tensor ab = a.unsqueeze(0).expand({out.size(0), -1, -1});
  if (add) out.baddbmm_(ab, b);
  else at::bmm_out(out, ab, b);
}
}  // namespace bsnas::cpu
