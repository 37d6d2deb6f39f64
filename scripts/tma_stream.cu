// How fast a ring of TMA copies streams the 4-bit codes of an [N, K] weight
// through shared memory, by box shape (rows x bytes per row), stages in
// flight and L2 promotion, with nothing else in the kernel: one thread per
// block of 128 weight rows keeps S boxes in flight, as gemm_sm90.cuh's copy
// thread does for its codes (there: 128 rows x 32 bytes, 6 stages, 256-byte
// promotion where two blocks share an SM). L2 emptied before each run by a
// 256 MB memset, median of 20 runs. Standalone (no torch), for Hopper:
//
//     nvcc -arch=sm_90a -O3 -std=c++17 scripts/tma_stream.cu -o /tmp/tma_stream
//     /tmp/tma_stream 28672 8192    # N K
//
// (scripts/results/tma_stream_h200.log)
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../csrc/cuda/tma.cuh"  // the kernel's own mbarrier and copy helpers
#include "stream_timing.cuh"     // CK, median_us

using namespace mpq::cuda::sm90;

// Block b: rows [128 b, 128 b + 128), all columns, in boxes of R rows x BW
// bytes: for each column chunk, the 128 / R boxes down the tile. With
// x_rows > 0 each box of 128 rows also brings the x tiles of its steps (x_rows
// rows x 64 halves per step of 64 codes, from one small x that stays in L2),
// as the wgmma kernel's stages do.
__global__ void stream_kernel(const __grid_constant__ CUtensorMap map,
                              const __grid_constant__ CUtensorMap x_map, int R, int BW,
                              int row_bytes, int S, int box_bytes, int x_rows) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint8_t smem_raw[];
  const uint32_t smem = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023) & ~1023u;
  const int steps = BW / 32, x_bytes = x_rows > 0 ? steps * x_rows * 128 : 0;
  const int slot_bytes = box_bytes + x_bytes;
  const uint32_t bars = smem + S * slot_bytes;
  if (threadIdx.x != 0) return;
  for (int s = 0; s < S; ++s) mbar_init(bars + 8 * s, 1);
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  const int subs = 128 / R, chunks = row_bytes / BW, total = subs * chunks;
  for (int i = 0; i < total + S; ++i) {
    if (i >= S) {  // the box S back has landed: its slot is free
      const int j = i - S;
      mbar_wait(bars + 8 * (j % S), (j / S) & 1);
    }
    if (i < total) {
      const int s = i % S, chunk = i / subs, sub = i % subs;
      const uint32_t base = smem + s * slot_bytes;
      mbar_expect_tx(bars + 8 * s, slot_bytes);
      tma_load_2d(base, &map, chunk * (BW / 4), blockIdx.x * 128 + sub * R, bars + 8 * s);
      for (int j = 0; j < (x_rows > 0 ? steps : 0); ++j)
        tma_load_2d(base + box_bytes + j * x_rows * 128, &x_map, (chunk * steps + j) * 64, 0,
                    bars + 8 * s);
    }
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

int main(int argc, char** argv) {
  const long N = argc > 1 ? atol(argv[1]) : 28672, K = argc > 2 ? atol(argv[2]) : 8192;
  // x_rows: rows of x each step brings too (0: none; then only boxes of 128 rows
  // are timed); per_sm: blocks per SM at most (0: as many as fit)
  const int x_rows = argc > 3 ? atoi(argv[3]) : 0, per_sm_cap = argc > 4 ? atoi(argv[4]) : 0;
  if (N <= 0 || K <= 0 || N % 128 != 0 || K % 1024 != 0) {
    // whole blocks of 128 rows, rows of whole 512-byte boxes
    printf("tma_stream N K: N must be a positive multiple of 128 and K of 1024, got %ld %ld\n", N, K);
    return 2;
  }
  if (x_rows < 0 || x_rows > 256 || x_rows % 8 != 0 || per_sm_cap < 0) {
    printf("tma_stream N K [x_rows per_sm]: x_rows a multiple of 8 up to 256, per_sm >= 0\n");
    return 2;
  }
  const int row_bytes = K / 2;  // 4-bit codes
  void* codes; CK(cudaMalloc(&codes, N * row_bytes));
  CK(cudaMemset(codes, 1, N * row_bytes));
  // x (its map needs a box of 8 rows or more even where no step reads it)
  const int x_map_rows = std::max(x_rows, 8);
  void* xs; CK(cudaMalloc(&xs, x_map_rows * K * 2));
  CK(cudaMemset(xs, 0, x_map_rows * K * 2));
  void* flush; const size_t flush_bytes = 256u << 20; CK(cudaMalloc(&flush, flush_bytes));
  void* fn = nullptr; cudaDriverEntryPointQueryResult st;
  CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &st));
  auto encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  int sms = 0; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  printf("N %ld K %ld (4-bit codes: %.1f MB), %d SMs, %ld blocks of 128 rows\n", N, K, N * row_bytes / 1e6, sms, N / 128);
  struct Shape { int R, BW, S; CUtensorMapL2promotion promo; const char* pname; };
  std::vector<Shape> shapes;
  const CUtensorMapL2promotion p256 = CU_TENSOR_MAP_L2_PROMOTION_L2_256B, pnone = CU_TENSOR_MAP_L2_PROMOTION_NONE;
  for (int S : {6, 12}) {
    shapes.push_back({128, 32, S, p256, "256"});
    shapes.push_back({64, 64, S, p256, "256"});
    shapes.push_back({32, 128, S, p256, "256"});
    shapes.push_back({16, 256, S, p256, "256"});
    shapes.push_back({8, 512, S, p256, "256"});
    shapes.push_back({128, 64, S, p256, "256"});
    shapes.push_back({32, 256, S, p256, "256"});
    shapes.push_back({128, 32, S, pnone, "none"});
    shapes.push_back({16, 256, S, pnone, "none"});
  }
  if (x_rows > 0) {  // the kernel's stages: one step or two per copy
    shapes.clear();
    for (int S : {6, 12}) shapes.push_back({128, 32, S, p256, "256"});
    for (int S : {3, 6}) shapes.push_back({128, 64, S, p256, "256"});
  }
  CUtensorMap x_map;
  {
    const cuuint64_t dims[2] = {(cuuint64_t)K, (cuuint64_t)x_map_rows};
    const cuuint64_t strides[1] = {(cuuint64_t)K * 2};
    const cuuint32_t box[2] = {64, (cuuint32_t)x_map_rows};
    const cuuint32_t es[2] = {1, 1};
    CUresult r = encode(&x_map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, xs, dims, strides, box, es,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) { printf("x map: encode failed %d\n", (int)r); return 1; }
  }
  for (const Shape& sh : shapes) {
    CUtensorMap map;
    const cuuint64_t dims[2] = {(cuuint64_t)(row_bytes / 4), (cuuint64_t)N};
    const cuuint64_t strides[1] = {(cuuint64_t)row_bytes};
    const cuuint32_t box[2] = {(cuuint32_t)(sh.BW / 4), (cuuint32_t)sh.R};
    const cuuint32_t es[2] = {1, 1};
    CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT32, 2, codes, dims, strides, box, es,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, sh.promo,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) { printf("encode failed %d for %dx%d\n", (int)r, sh.R, sh.BW); continue; }
    const int box_bytes = sh.R * sh.BW;
    const int x_bytes = x_rows > 0 ? (sh.BW / 32) * x_rows * 128 : 0;
    int smem = sh.S * (box_bytes + x_bytes) + 8 * sh.S + 1024;
    if (per_sm_cap > 0) smem = std::max(smem, 200 * 1024 / per_sm_cap);  // fewer blocks fit
    CK(cudaFuncSetAttribute(stream_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const float us = median_us(
        [&](int rep) { CK(cudaMemsetAsync(flush, rep, flush_bytes)); },
        [&] {
          stream_kernel<<<N / 128, 32, smem>>>(map, x_map, sh.R, sh.BW, row_bytes, sh.S,
                                               box_bytes, x_rows);
        });
    int per_sm = 0; CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, stream_kernel, 32, smem));
    printf("box %3d rows x %3d B  stages %2d (%3d KB in flight/block, %d blocks/SM)  L2 promo %-4s  x rows %3d  %7.1f us  %5.2f TB/s of codes\n",
           sh.R, sh.BW, sh.S, sh.S * (box_bytes + x_bytes) / 1024, per_sm, sh.pname, x_rows, us,
           N * row_bytes / us / 1e6);
  }
  return 0;
}
