// The fused kernels' load of packed weights (tile.cuh's WeightRows) and
// scripts/ldg_stream.cu's, which times it alone. Needs no torch: only the
// CUDA headers.
#pragma once

#include <cuda_runtime.h>

namespace mpq::cuda::tile {

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  // Weights are read once: keep them out of L1, which serves x. (Asking L2
  // for the 256 bytes around each miss, .L2::256B, did not help the one-row
  // kernels, H200 float16 g128 M = 1 (us): w2 (8192, 28672) 36.7, (28672,
  // 8192) 34.3, w4 43.2, w8 71.4, against 36.6, 32.6, 42.8, 71.1 in the
  // benchmark's run of this form, bench_h200_m1_16. Nor did an L2 cache
  // policy, .L2::cache_hint: evict_first level at M = 1, w4 43.1, w8 70.2,
  // an explicit evict_normal slower, 46.7, 73.7; ab_h200_l2_policy. Nor
  // does any policy spare the loads the write-back of do_bench's dirty
  // flush: on the H100 these loads alone (scripts/ldg_stream.cu, N = 28672,
  // K = 8192, the two-range kernel's order, each step refilled by itself)
  // take 52.6 us after the flush, 48.8 with L2 emptied by a read;
  // evict_first 52.8, .cs 52.6, evict_unchanged 59.2; ldg_policy_h100. Nor,
  // for the staged kernels of 16 rows of x or more, whose loads read 64
  // bytes of a row per step, .L2::128B / .L2::256B: H100, float16 g128,
  // medians of three alternating rounds, plain / 128B / 256B (us): w4 M = 16
  // (8192, 28672) 68.0 / 67.8 / 70.3, (28672, 8192) 63.9 / 63.4 / 70.8,
  // (4096, 14336) 24.8 / 24.4 / 26.5, M = 64 135.4 / 135.5 / 138.0; w8 M = 16
  // 109.7 / 109.5 / 117.6; w2 59.2 / 60.5 / 62.6; ab_h100_l2_hint_16_rows.)
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

}  // namespace mpq::cuda::tile
