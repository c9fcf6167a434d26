// Small helpers shared by the CUDA kernels and their launchers.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <type_traits>

namespace bsnas {

// The device's multiprocessor count (cached per device).
inline int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= int(cache.size())) device = 0;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    v = std::max(v, 1);
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// z * scale + shift rounded after the product and after the sum, never contracted into
// one fused multiply-add, so u (and the activation's kinks) are the values PyTorch's
// `z * scale + shift` gives in float32 / float64.
template <typename acc_t>
__device__ __forceinline__ acc_t bn_affine(acc_t z, acc_t s, acc_t b) {
  static_assert(std::is_same_v<acc_t, float> || std::is_same_v<acc_t, double>);
  if constexpr (std::is_same_v<acc_t, float>) return __fadd_rn(__fmul_rn(z, s), b);
  else return __dadd_rn(__dmul_rn(z, s), b);
}

}  // namespace bsnas
