// Bulk tensor copies (TMA) of Hopper (sm_90a) and the mbarriers they complete, for the wgmma
// kernels (gemm_sm90_kernel.cuh) and scripts/tma_stream.cu. Needs no torch: only the
// CUDA headers. Everything here compiles only in the sm_90a pass.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "mbarrier.cuh"

namespace mpq::cuda::sm90 {

// (mbar_init, mbar_arrive, mbar_wait: mbarrier.cuh, named here too for users of this namespace)
using mpq::cuda::mbar_arrive;
using mpq::cuda::mbar_init;
using mpq::cuda::mbar_wait;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// A 2-D box of a tensor map into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace mpq::cuda::sm90
