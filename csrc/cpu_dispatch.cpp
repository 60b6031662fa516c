// Which copy of the CPU kernels runs: every csrc/cpu file is compiled once per instruction set
// (csrc/cpu/kernels.h); this file, compiled with the extension's portable flags, knows the copies
// built in (setup.py defines SPKERN_CPU_AVX2 and SPKERN_CPU_AVX512 on x86-64), asks the CPU
// (CPUID, through the compiler's __builtin_cpu_supports, which also checks that the operating
// system saves the wide registers) which of them it runs, and starts with the widest. Python
// forces a narrower one (SPKERN_CPU_ISA, spkern.cpu_isa.use) through set_isa; one this CPU
// cannot run is refused by name, never executed.
#include "spkern.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <string>

namespace spkern {
namespace cpu {

namespace DEFAULT {
extern const Kernels kernels;
}
#if defined(SPKERN_CPU_AVX2)
namespace AVX2 {
extern const Kernels kernels;
}
#endif
#if defined(SPKERN_CPU_AVX512)
namespace AVX512 {
extern const Kernels kernels;
}
#endif

namespace {

// The copies built in, narrowest first, each with the CPU features its compiler flags use
// (setup.py's ISA_FLAGS; tests/test_cpu_isa.py checks the two agree).
const std::vector<Variant>& all_variants() {
  static const std::vector<Variant> all = {
      {&DEFAULT::kernels, {}},
#if defined(SPKERN_CPU_AVX2)
      {&AVX2::kernels, {"avx2", "fma", "f16c"}},
#endif
#if defined(SPKERN_CPU_AVX512)
      {&AVX512::kernels, {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"}},
#endif
  };
  return all;
}

std::atomic<const Kernels*>& in_use() {
  static std::atomic<const Kernels*> kernels{[] {
    const Kernels* best = nullptr;
    for (const auto& v : all_variants())
      if (missing_features(v).empty()) best = v.kernels;
    return best;
  }()};
  return kernels;
}

}  // namespace

bool cpu_has(const std::string& feature) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // (__builtin_cpu_supports takes string literals only)
  if (feature == "avx2") return __builtin_cpu_supports("avx2");
  if (feature == "fma") return __builtin_cpu_supports("fma");
  if (feature == "f16c") return __builtin_cpu_supports("f16c");
  if (feature == "avx512f") return __builtin_cpu_supports("avx512f");
  if (feature == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (feature == "avx512vl") return __builtin_cpu_supports("avx512vl");
  if (feature == "avx512dq") return __builtin_cpu_supports("avx512dq");
#endif
  return false;
}

std::vector<std::string> missing_features(const Variant& v) {
  std::vector<std::string> missing;
  for (const auto& f : v.needs)
    if (!cpu_has(f)) missing.push_back(f);
  return missing;
}

const std::vector<Variant>& variants() { return all_variants(); }

const Kernels& active() { return *in_use().load(std::memory_order_acquire); }

void set_isa(const std::string& isa) {
  for (const auto& v : all_variants()) {
    if (isa != v.kernels->isa) continue;
    const auto missing = missing_features(v);
    TORCH_CHECK_VALUE(missing.empty(), "the ", isa, " CPU kernels need ", c10::Join(", ", missing),
                      ", which this CPU lacks");
    in_use().store(v.kernels, std::memory_order_release);
    return;
  }
  std::vector<std::string> names;
  for (const auto& v : all_variants()) names.push_back(v.kernels->isa);
  TORCH_CHECK_VALUE(false, "no ", isa, " CPU kernels in this build of spkern._C (it has ", c10::Join(", ", names),
                    ")");
}

}  // namespace cpu
}  // namespace spkern
