// The last-level cache size that the CPU kernels' streaming and prefetching thresholds
// (dwconv_simd.h: exceeds_cache_share, stream_output, prefetch_input_rows) are read
// against. Computed once per process, at the first call.
#pragma once

#include <cstdint>

namespace bsnas::cpu {

// BSNAS_CPU_LLC_BYTES when set and not empty (bytes, or with a K, M or G suffix; a
// RuntimeError naming the variable for anything else); otherwise the last-level cache
// that cpu0 shares, as Linux lists it under /sys/devices/system/cpu/cpu0/cache; where
// that is more than 16 MiB for each CPU listed as sharing it (a VM listing its host's
// cache), 8 MiB a sharing CPU, at least 16 MiB; 32 MiB where nothing can be read.
int64_t last_level_cache_bytes();

}  // namespace bsnas::cpu
