#include "cpu/simd.h"

#include <atomic>
#include <cstdlib>

namespace fastmnist::cpu {
namespace {

bool cpu_has(CpuPath path) {
#if FASTMNIST_HAVE_X86_PATHS
  // __builtin_cpu_supports also checks that the OS saves the registers (XCR0) for AVX and AVX-512
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  switch (path) {
    case CpuPath::Portable:
      return true;
    case CpuPath::Avx2:
      return avx2;
    case CpuPath::Avx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  }
  return false;
#else
  return path == CpuPath::Portable;
#endif
}

CpuPath best_path() {
  for (CpuPath p : {CpuPath::Avx512, CpuPath::Avx2})
    if (cpu_has(p)) return p;
  return CpuPath::Portable;
}

const char* path_name(CpuPath p) {
  return p == CpuPath::Avx512 ? "avx512" : p == CpuPath::Avx2 ? "avx2" : "portable";
}

// The path named by `name`; "auto" is the best this CPU has.
CpuPath parse_path(const std::string& name) {
  if (name == "auto") return best_path();
  for (CpuPath p : {CpuPath::Avx512, CpuPath::Avx2, CpuPath::Portable}) {
    if (name == path_name(p)) {
      TORCH_CHECK(cpu_has(p), "set_cpu_path: this CPU has no ", name,
                  " path (avx512 needs AVX-512 F/DQ/BW/VL, avx2 needs AVX2+FMA, on x86-64)");
      return p;
    }
  }
  TORCH_CHECK(false, "set_cpu_path: expected 'auto', 'avx512', 'avx2' or 'portable', got '", name, "'");
}

// FASTMNIST_CPU_PATH in the environment sets the starting path (same values as set_cpu_path).
CpuPath initial_path() {
  const char* env = std::getenv("FASTMNIST_CPU_PATH");
  return parse_path(env != nullptr ? std::string(env) : "auto");
}

std::atomic<CpuPath>& path_flag() {
  static std::atomic<CpuPath> flag{initial_path()};
  return flag;
}

}  // namespace

CpuPath cpu_path() {
  return path_flag().load(std::memory_order_relaxed);
}

std::string set_cpu_path(const std::string& path) {
  path_flag() = parse_path(path);
  return path_name(cpu_path());
}

}  // namespace fastmnist::cpu
