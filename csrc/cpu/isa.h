// Which build of the CPU kernels runs: on x86-64 they are built twice, for
// AVX2 + FMA + F16C and for the baseline, and picked by what this CPU runs.
// (Not target_clones with arch=haswell: its resolver asks for that CPU model,
// which an AMD CPU with the same features is not.)
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define MPQ_X86_AVX2 1
#define MPQ_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace mpq::cpu {

// Whether the AVX2 builds serve; MPQ_OPS_CPU_ISA=baseline forces the baseline
// builds (for their tests and benchmarks).
inline bool use_avx2() {
#if defined(MPQ_X86_AVX2)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  const char* isa = std::getenv("MPQ_OPS_CPU_ISA");
  return avx2 && !(isa != nullptr && std::strcmp(isa, "baseline") == 0);
#else
  return false;
#endif
}

}  // namespace mpq::cpu
