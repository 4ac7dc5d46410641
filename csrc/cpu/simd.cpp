#include "cpu/simd.h"

#include <atomic>
#include <cstdlib>

namespace fastmnist::cpu {
namespace {

bool cpu_has_avx2_fma() {
#if FASTMNIST_HAVE_AVX2_PATH
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// FASTMNIST_CPU_PATH in the environment sets the starting path (same values as set_cpu_path).
bool initial_path() {
  const char* env = std::getenv("FASTMNIST_CPU_PATH");
  if (env != nullptr && std::string(env) == "portable") return false;
  return cpu_has_avx2_fma();
}

std::atomic<bool>& avx2_flag() {
  static std::atomic<bool> flag{initial_path()};
  return flag;
}

}  // namespace

bool use_avx2() {
  return avx2_flag().load(std::memory_order_relaxed);
}

std::string set_cpu_path(const std::string& path) {
  if (path == "auto") {
    avx2_flag() = cpu_has_avx2_fma();
  } else if (path == "avx2") {
    TORCH_CHECK(cpu_has_avx2_fma(), "set_cpu_path: this CPU has no AVX2+FMA (or the build is not for x86-64)");
    avx2_flag() = true;
  } else if (path == "portable") {
    avx2_flag() = false;
  } else {
    TORCH_CHECK(false, "set_cpu_path: expected 'auto', 'avx2' or 'portable', got '", path, "'");
  }
  return use_avx2() ? "avx2" : "portable";
}

}  // namespace fastmnist::cpu
