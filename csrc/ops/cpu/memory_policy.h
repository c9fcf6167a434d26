// The CPU kernels' memory policy: how large the last-level cache is taken to be, when a
// pass streams its result past the caches or prefetches its input, the scratch and
// window sizes the passes block for, and the prefetch helpers. The numbers behind the
// thresholds are in docs/performance.md ("Streaming, prefetch and the cache-share rule").
//
// Everything here is instruction-set independent and included by kernels_isa.h before
// the kernels' `#pragma GCC target`: the inline helpers then compile for the baseline in
// every translation unit, so the one copy the linker keeps runs on any CPU.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>  // mincore (page_resident)
#include <unistd.h>
#endif

namespace bsnas::cpu {

// BSNAS_CPU_LLC_BYTES when set and not empty (bytes, or with a K, M or G suffix; a
// RuntimeError naming the variable for anything else); otherwise the last-level cache
// that cpu0 shares, as Linux lists it under /sys/devices/system/cpu/cpu0/cache; where
// that is more than 16 MiB for each CPU listed as sharing it (a VM listing its host's
// cache), 8 MiB a sharing CPU, at least 16 MiB; 32 MiB where nothing can be read.
// Computed once per process, at the first call (memory_policy.cpp).
int64_t last_level_cache_bytes();

// Bytes of a cache line.
constexpr int64_t kCacheLineBytes = 64;

// Whether the memory page holding p is resident (mincore; true where that is unknown).
// A block freshly mapped for a new tensor is not, until first written.
inline bool page_resident(const void* p) {
#if defined(__linux__)
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  unsigned char v = 1;
  void* base = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p) & ~(page - 1));
  if (mincore(base, 1, &v) != 0) return true;
  return (v & 1) != 0;
#else
  (void)p;
  return true;
#endif
}

// Asks for the cache lines of p[0, n) to be brought into L2 (a hint: no faults, no
// effect on results).
// GCC drops __builtin_prefetch inside the OpenMP regions of at::parallel_for, hence the
// instruction itself on x86.
template <typename T>
inline void prefetch_l2(const T* p, int64_t n) {
  constexpr int64_t kLine = kCacheLineBytes / sizeof(T);
  for (int64_t i = 0; i < n; i += kLine) {
#if defined(__x86_64__) && defined(__GNUC__)
    asm volatile("prefetcht1 %0" : : "m"(*reinterpret_cast<const char*>(p + i)));
#else
    __builtin_prefetch(p + i, 0, 2);
#endif
  }
}

// The cache lines under base[lo, hi), clamped to base[0, n) (a tensor's extent), to be
// prefetched a share at a time (prefetch_lines).
struct LineSpan {
  uintptr_t line0 = 0;  // address of the first line
  int64_t count = 0;
};
template <typename T>
inline LineSpan line_span(const T* base, int64_t lo, int64_t hi, int64_t n) {
  lo = std::max<int64_t>(lo, 0);
  hi = std::min<int64_t>(hi, n);
  if (lo >= hi) return {};
  const auto a = reinterpret_cast<uintptr_t>(base + lo);
  const auto b = reinterpret_cast<uintptr_t>(base + hi);
  const uintptr_t l0 = a / kCacheLineBytes * kCacheLineBytes;
  return {l0, static_cast<int64_t>((b - l0 + kCacheLineBytes - 1) / kCacheLineBytes)};
}
// Asks for lines [i0, i1) of `span` (clamped to it) in L1: for writing (prefetchw: the
// line arrives owned, so the stores that fill it do not wait) or for reading.
template <bool ForWrite>
inline void prefetch_lines(const LineSpan& span, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < std::min(i1, span.count); ++i) {
    const uintptr_t line = span.line0 + uintptr_t(i) * kCacheLineBytes;
    const auto* p = reinterpret_cast<const char*>(line);
#if defined(__x86_64__) && defined(__GNUC__)
    if constexpr (ForWrite) {
      asm volatile("prefetchw %0" : : "m"(*p));
    } else {
      asm volatile("prefetcht0 %0" : : "m"(*p));
    }
#else
    __builtin_prefetch(p, ForWrite ? 1 : 0, 3);
#endif
  }
}

// Whether a pass reading `in_bytes` and writing `out_bytes` moves more than 30 % of the
// last-level cache: its result would leave the cache before it is read again.
inline bool exceeds_cache_share(int64_t in_bytes, int64_t out_bytes) {
  return (in_bytes + out_bytes) * 10 > last_level_cache_bytes() * 3;
}

// Whether such a pass should write its result with non-temporal stores (a cached store
// first reads every line it writes). Only whole lines are streamed: put_run straight from
// the registers, where pixels start on lines (a non-temporal store of part of a line is
// slow); window_pass fetches ahead where they do not (see there). Not while the result's
// last page is not resident yet (a fresh mapping: glibc maps each block above its
// threshold afresh): faulting it in zeroes each page through the cache, and non-temporal
// stores would then write the lines a second time.
inline bool stream_output(int64_t in_bytes, int64_t out_bytes, const void* out) {
  return exceeds_cache_share(in_bytes, out_bytes) &&
         page_resident(static_cast<const char*>(out) + out_bytes - 1);
}

// Whether a pass prefetches the input rows of its next output row into L2 while it
// computes the current one: when the input alone exceeds the last-level cache (it then
// comes from memory, and the hardware prefetchers leave the stalls in the compute; an
// input that fits gains nothing and can lose up to 15 %).
inline bool prefetch_input_rows(int64_t in_bytes) {
  return in_bytes > last_level_cache_bytes();
}

// Scratch bytes of a group of small NCHW planes convolved together.
constexpr int64_t kPlaneGroupBytes = 64 * 1024;

// Scratch bytes per strip of the channels_last passes: a fraction of a core's L2.
constexpr int64_t kStripBytes = 192 * 1024;

// Bytes of one run's register window over all channels (kernel rows x window pixels x
// channels) up to which window_pass takes each run through every block before the
// next: about two thirds of a core's L1 data cache.
constexpr int64_t kWindowBytes = 32 * 1024;

}  // namespace bsnas::cpu
