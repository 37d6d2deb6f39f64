// Shared-memory barriers (mbarrier) of `count` arrivals per phase, CTA scope,
// for the staged kernels' ring (gemm_kernel.cuh) and the wgmma kernels'
// (tma.cuh, gemm_sm90_kernel.cuh): arrive releases the thread's writes, wait
// acquires those of every thread that arrived in the phase. sm_90 and later
// (try_wait); the launches ask for them only there, and elsewhere they trap.
// Needs no torch: only the CUDA headers.
#pragma once

#include <cstdint>

namespace mpq::cuda {

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#else
  __trap();
#endif
}
// Until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n.reg .pred done;\nwait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait;\n}\n" ::"r"(bar), "r"(parity)
      : "memory");
#else
  __trap();
#endif
}

}  // namespace mpq::cuda
