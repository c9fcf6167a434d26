// The Python module bsnas._C. Importing it runs the TORCH_LIBRARY registrations of
// every op compiled into the same library; the functions here describe the build.
#include <torch/extension.h>

#include "ops/cpu/memory_policy.h"

namespace bsnas::cpu {
const char* selected_isa();  // csrc/ops/cpu/register_cpu.cpp
}

namespace {
bool cuda_compiled() {
#ifdef BSNAS_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bsnas C++/CUDA kernels (ops registered under torch.ops.bsnas)";
  m.def("cuda_compiled", &cuda_compiled, "Whether the CUDA kernels are in this build");
  m.def("cpu_isa", [] { return std::string(bsnas::cpu::selected_isa()); },
        "Instruction set of the CPU kernels in use: generic, avx2 or avx512");
  m.def("cpu_llc_bytes", &bsnas::cpu::last_level_cache_bytes,
        "Last-level cache size (bytes) the CPU kernels' streaming thresholds read against");
}
