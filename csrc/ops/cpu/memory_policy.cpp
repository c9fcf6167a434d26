// bsnas::cpu::last_level_cache_bytes (memory_policy.h).
//
// Why the per-CPU bound: a VM may list its host package's whole L3 while sharing it with
// every other guest; read against such a listing, no output would ever stream and no
// input be prefetched. Real caches hold at most about 12 MiB a core (AMD's stacked-cache
// parts), so a listing of more than 16 MiB a sharing CPU is taken for the host's cache,
// whose guest share is unknown: then 8 MiB a sharing CPU, at least 16 MiB. Listings of
// up to 16 MiB a CPU are used as they are. docs/performance.md ("The cache-share rule")
// has the measurements.

#include "memory_policy.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

namespace bsnas::cpu {
namespace {

constexpr int64_t kMiB = int64_t(1) << 20;
constexpr int64_t kFallback = 32 * kMiB;     // nothing listed
constexpr int64_t kPlausiblePerCpu = 16 * kMiB;  // the most a real cache gives a CPU
constexpr int64_t kSharePerCpu = 8 * kMiB;   // a guest's assumed share of a host's cache
constexpr int64_t kShareFloor = 16 * kMiB;

// "48K", "2048K", "480M", "33554432" -> bytes; -1 for anything else (or out of range).
int64_t parse_size(const std::string& text) {
  if (text.empty() || !std::isdigit(static_cast<unsigned char>(text[0]))) return -1;
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (errno != 0 || v <= 0) return -1;
  const std::string unit(end);
  const int64_t scale = unit.empty() ? 1
                        : unit == "K" ? int64_t(1) << 10
                        : unit == "M" ? int64_t(1) << 20
                        : unit == "G" ? int64_t(1) << 30
                                      : -1;
  if (scale < 0 || v > (int64_t(1) << 50) / scale) return -1;
  return v * scale;
}

// "0-1", "0-3,8-11", "5" -> the number of CPUs listed; 0 when unreadable.
int64_t count_cpus(const std::string& list) {
  int64_t n = 0;
  std::stringstream ss(list);
  std::string part;
  while (std::getline(ss, part, ',')) {
    const auto dash = part.find('-');
    try {
      if (dash == std::string::npos) {
        std::stoll(part);
        n += 1;
      } else {
        n += std::stoll(part.substr(dash + 1)) - std::stoll(part.substr(0, dash)) + 1;
      }
    } catch (...) {
      return 0;
    }
  }
  return n;
}

int64_t compute() {
  const char* env = std::getenv("BSNAS_CPU_LLC_BYTES");
  if (env != nullptr && env[0] != '\0') {  // set and not empty
    const int64_t v = parse_size(env);
    TORCH_CHECK(v >= 1024, "BSNAS_CPU_LLC_BYTES must be a cache size of at least 1K: bytes, "
                "or a number with a K, M or G suffix (e.g. 33554432 or 32M), got '", env, "'");
    return v;
  }
  int best_level = 0;
  int64_t bytes = 0, sharing = 0;
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i);
    std::ifstream lf(dir + "/level"), sf(dir + "/size"), cf(dir + "/shared_cpu_list");
    int level = 0;
    std::string size, cpus;
    if (!(lf >> level) || !(sf >> size) || level < best_level) continue;
    const int64_t v = parse_size(size);
    if (v <= 0) continue;
    best_level = level;
    bytes = v;
    sharing = (cf >> cpus) ? count_cpus(cpus) : 0;
  }
  if (bytes <= 0) return kFallback;
  if (sharing > 0 && bytes > kPlausiblePerCpu * sharing)
    bytes = std::max(kShareFloor, kSharePerCpu * sharing);
  return bytes;
}

}  // namespace

int64_t last_level_cache_bytes() {
  static const int64_t bytes = compute();  // a bad BSNAS_CPU_LLC_BYTES raises every call
  return bytes;
}

}  // namespace bsnas::cpu
