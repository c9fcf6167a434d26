// Registers the CPU kernels of the depthwise ops, choosing at load time the widest
// instruction-set copy (kernels_isa.h) that this CPU supports. BSNAS_CPU_ISA=generic,
// avx2 or avx512 in the environment caps the choice (for testing and benchmarking).
#include <cstdlib>
#include <cstring>

#include "kernels_isa.h"

namespace bsnas::cpu {
namespace {

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect() {
  Isa best = Isa::kGeneric;
#ifdef BSNAS_CPU_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    best = Isa::kAvx512;
#endif
  if (const char* cap = std::getenv("BSNAS_CPU_ISA")) {
    Isa want = std::strcmp(cap, "avx512") == 0 ? Isa::kAvx512
               : std::strcmp(cap, "avx2") == 0 ? Isa::kAvx2
                                               : Isa::kGeneric;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}

}  // namespace

const char* selected_isa() {
  static const char* names[] = {"generic", "avx2", "avx512"};
  return names[static_cast<int>(detect())];
}

int64_t gemm_f32_lanes() {
  static const Isa isa = detect();
  switch (isa) {
#ifdef BSNAS_CPU_X86_VARIANTS
    case Isa::kAvx512: return avx512::gemm_f32_lanes();
    case Isa::kAvx2: return avx2::gemm_f32_lanes();
#endif
    default: return generic::gemm_f32_lanes();
  }
}

void gemm_f32(const GemmArgs& g) {
  static const Isa isa = detect();
  switch (isa) {
#ifdef BSNAS_CPU_X86_VARIANTS
    case Isa::kAvx512: return avx512::gemm_f32(g);
    case Isa::kAvx2: return avx2::gemm_f32(g);
#endif
    default: return generic::gemm_f32(g);
  }
}

#define BSNAS_REGISTER_CPU(m, ISA)                                  \
  m.impl("masked_dwconv2d", &ISA::dw_forward);                      \
  m.impl("_masked_dwconv2d_backward", &ISA::dw_backward);           \
  m.impl("bn_act_dwconv2d", &ISA::bn_act_dw_forward);               \
  m.impl("_bn_act_dwconv2d_backward", &ISA::bn_act_dw_backward);   \
  m.impl("_mbconv_folded_depthwise", &ISA::folded_dw_forward);     \
  m.impl("channel_stats", &ISA::channel_stats);                    \
  m.impl("_channel_stats_grad_add_", &ISA::channel_stats_grad_add); \
  m.impl("bn_act", &ISA::bn_act_forward);                           \
  m.impl("_bn_act_backward", &ISA::bn_act_backward)

TORCH_LIBRARY_IMPL(bsnas, CPU, m) {
  switch (detect()) {
#ifdef BSNAS_CPU_X86_VARIANTS
    case Isa::kAvx512:
      BSNAS_REGISTER_CPU(m, avx512);
      break;
    case Isa::kAvx2:
      BSNAS_REGISTER_CPU(m, avx2);
      break;
#endif
    default:
      BSNAS_REGISTER_CPU(m, generic);
  }
}

}  // namespace bsnas::cpu
