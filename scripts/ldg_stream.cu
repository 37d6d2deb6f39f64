// How fast the kernels' loads stream the 4-bit codes of an [N, K] weight
// (`runs`: 4- or 8-bit codes), with nothing else in the kernel: the same 16-byte loads
// (load_stream.cuh), the same grid (one block of four warps per
// resident slot, stream-K shares of (row block, step) items), U items in
// flight per warp, each loaded word only XORed into a sum. Four orders of the
// same bytes:
//   flat     each block's share as one run of memory, 4 KB per item (a plain
//            read's order)
//   kpair    the two-range kernel's (gemm_kernel.cuh, KR = 2): a warp's item is 8
//            rows x 128 bytes, each load 4 rows x 128 bytes
//   rows512  the eight-range kernel's: a warp's item is 2 rows x 512 bytes,
//            each load 512 bytes of one row
//   rows64   the 2-bit one-row kernel's (KR = 1): a warp's item is 16 rows x
//            64 bytes, each load 8 rows x 64 bytes (for its bytes, pass
//            half of its K: 2-bit codes of K inputs are 4-bit codes of K / 2)
//   x16      the 16-row kernel's (gemm.cuh's launch<T, W, 2, 2, 2>): a block's
//            item is one step of 128 rows x 64 bytes (8 KB), a warp's 32 rows,
//            each lane loading 16 bytes of 4 rows (8 g + r), each load 8 rows
//            x 64 bytes; flat8 the same 8 KB items as one run of memory (as a
//            weight stored in tiles of 128 rows by one step would be read);
//            and x16 as the kernel issues it, runs of 1, 2 or 4 steps at once
//   runs     kpair as the one-row kernel issues it, runs of 2 steps at once
//            (a row's 256 bytes asked for together), for 4- or 8-bit codes,
//            in stream-K shares or over a grid given (a split grid's blocks,
//            or blocks of whole row blocks)
// With L2 emptied by a 256 MB read before each run (clean) and by a 256 MB
// memset (dirty, as do_bench's flush); median of 20 runs; each under four L2
// policies of the load (load_stream_as); with a third argument `quick`, only
// the kernels' own load, U = 2 and five blocks per SM. If kpair takes
// as long as the kernel (8192 x 28672 w4 M = 1: 42 us on the H200 with a
// clean L2, against 31.4 for a plain read of its bytes), its order of loads
// sets the pace; if it is near flat, the kernel's work around the loads does.
// Standalone (no torch), for any CUDA GPU:
//
//     nvcc -arch=sm_90a -O3 -std=c++17 scripts/ldg_stream.cu -o /tmp/ldg_stream
//     /tmp/ldg_stream 28672 8192    # N K
//     /tmp/ldg_stream 28672 4096 quick
//     /tmp/ldg_stream 28672 8192 x16  # flat8 and x16, 2 or 3 blocks per SM
//     /tmp/ldg_stream 8192 28672 runs 8 512  # 8-bit codes, a split grid of 512
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "../csrc/cuda/load_stream.cuh"  // the kernels' own load of the codes
#include "stream_timing.cuh"             // CK, median_us

// The same 16-byte load under a policy for L2. 0: the kernels' own (none
// given); 1: an evict_first cache policy (createpolicy, .L2::cache_hint); 2:
// an evict_unchanged one; 3: the streaming cache operation, .cs. (sm_90's
// .L2::evict_first qualifier takes only 32-byte loads.)
template <int POL>
__device__ __forceinline__ uint4 load_stream_as(const uint4* p) {
  uint4 v;
  if constexpr (POL == 0) {
    v = mpq::cuda::tile::load_stream(p);
  } else if constexpr (POL == 3) {
    asm volatile("ld.global.cs.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
  } else {
    uint64_t policy;
    if constexpr (POL == 1)
      asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    else
      asm("createpolicy.fractional.L2::evict_unchanged.b64 %0, 1.0;" : "=l"(policy));
    asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p), "l"(policy));
  }
  return v;
}

enum Order { kFlat = 0, kKPair = 1, kRows512 = 2, kRows64 = 3, kFlat8 = 4, kX16 = 5 };
// Loads per thread and item (of 16 bytes, 128 threads): 4 KB items, x16's and
// flat8's 8 KB.
template <int ORDER>
constexpr int kLoads = ORDER >= kFlat8 ? 4 : 2;

// Byte offset of load r (< kLoads) of this thread for item i.
template <int ORDER>
__device__ __forceinline__ long offset(long i, int r, long row_bytes) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (ORDER == kFlat || ORDER == kFlat8)
    return i * (kLoads<ORDER> * 2048) + (r * 128 + threadIdx.x) * 16;
  if (ORDER == kX16) {
    const long steps = row_bytes / 64;
    const long rb = i / steps, s = i % steps;
    const long row = rb * 128 + warp * 32 + 8 * r + (lane >> 2);
    return row * row_bytes + s * 64 + (lane & 3) * 16;
  }
  if (ORDER == kKPair) {
    const long steps = row_bytes / 128;
    const long rb = i / steps, s = i % steps;
    const int g = lane >> 2, t = lane & 3;
    const long row = rb * 32 + warp * 8 + (g >> 1) + 4 * r;
    return row * row_bytes + s * 128 + (4 * (g & 1) + t) * 16;
  }
  if (ORDER == kRows64) {
    const long steps = row_bytes / 64;
    const long rb = i / steps, s = i % steps;
    const long row = rb * 64 + warp * 16 + 8 * r + (lane >> 2);
    return row * row_bytes + s * 64 + (lane & 3) * 16;
  }
  const long steps = row_bytes / 512;
  const long rb = i / steps, s = i % steps;
  const long row = rb * 8 + warp * 2 + r;
  return row * row_bytes + s * 512 + lane * 16;
}

template <int ORDER, int U, int POL>
__global__ void __launch_bounds__(128) stream_kernel(const uint8_t* codes, long row_bytes,
                                                     long items, uint32_t* out) {
  const long i0 = items * blockIdx.x / gridDim.x, i1 = items * (blockIdx.x + 1) / gridDim.x;
  constexpr int L = kLoads<ORDER>;
  uint4 buf[U][L];
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (i0 + u < i1)
#pragma unroll
      for (int r = 0; r < L; ++r)
        buf[u][r] = load_stream_as<POL>(reinterpret_cast<const uint4*>(codes + offset<ORDER>(i0 + u, r, row_bytes)));
  uint32_t acc = 0;
  for (long i = i0; i < i1; i += U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i + u < i1) {
#pragma unroll
        for (int r = 0; r < L; ++r) acc ^= buf[u][r].x ^ buf[u][r].y ^ buf[u][r].z ^ buf[u][r].w;
        if (i + u + U < i1)
#pragma unroll
          for (int r = 0; r < L; ++r)
            buf[u][r] = load_stream_as<POL>(
                reinterpret_cast<const uint4*>(codes + offset<ORDER>(i + u + U, r, row_bytes)));
      }
    }
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// The loads as the kernels issue them: runs of U items (steps) loaded at
// once, one run ahead (their `load_run`), so that the lanes of a row ask for
// all of a run's bytes together; a block's share whole runs (U divides a row's
// steps). x16: the 16-row kernel's steps; kpair: the one-row kernel's (4- and
// 8-bit codes, k-paired rows).
template <int ORDER, int U>
__global__ void __launch_bounds__(128) runs_kernel(const uint8_t* codes, long row_bytes,
                                                   long items, uint32_t* out) {
  constexpr int L = kLoads<ORDER>;
  const long runs = items / U;
  const long r0 = runs * blockIdx.x / gridDim.x, r1 = runs * (blockIdx.x + 1) / gridDim.x;
  uint4 cur[U][L], next[U][L];
  const auto load_run = [&](long r, uint4(&b)[U][L]) {
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int q = 0; q < L; ++q)
        b[u][q] = load_stream_as<0>(
            reinterpret_cast<const uint4*>(codes + offset<ORDER>(r * U + u, q, row_bytes)));
  };
  if (r0 < r1) load_run(r0, next);
  uint32_t acc = 0;
  for (long r = r0; r < r1; ++r) {
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int q = 0; q < L; ++q) cur[u][q] = next[u][q];
    if (r + 1 < r1) load_run(r + 1, next);
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int q = 0; q < L; ++q) acc ^= cur[u][q].x ^ cur[u][q].y ^ cur[u][q].z ^ cur[u][q].w;
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

__global__ void read_flush(const uint4* p, long n, uint32_t* out) {
  uint32_t acc = 0;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
    acc ^= p[i].x;
  if (acc == 0x12345678u) out[0] = acc;  // (keeps the loads)
}

using Kernel = void (*)(const uint8_t*, long, long, uint32_t*);

template <int ORDER, int POL>
Kernel pick_u(int U) {
  return U == 2 ? stream_kernel<ORDER, 2, POL> : stream_kernel<ORDER, 4, POL>;
}
template <int ORDER>
Kernel pick(int U, int pol) {
  return pol == 1 ? pick_u<ORDER, 1>(U) : pol == 2 ? pick_u<ORDER, 2>(U)
       : pol == 3 ? pick_u<ORDER, 3>(U) : pick_u<ORDER, 0>(U);
}

int main(int argc, char** argv) {
  const long N = argc > 1 ? atol(argv[1]) : 28672, K = argc > 2 ? atol(argv[2]) : 8192;
  const bool quick = argc > 3 && std::string(argv[3]) == "quick";
  const bool x16 = argc > 3 && std::string(argv[3]) == "x16";
  const bool runs = argc > 3 && std::string(argv[3]) == "runs";
  // runs: the codes' width (4 or 8 bits) and the split grid's blocks, if any
  const int width = runs && argc > 4 ? atoi(argv[4]) : 4;
  const int split_grid = runs && argc > 5 ? atoi(argv[5]) : 0;
  const long row_bytes = K * width / 8;
  if (N <= 0 || K <= 0 || N % (x16 ? 128 : 64) != 0 || row_bytes % 512 != 0 ||
      (width != 4 && width != 8) || split_grid < 0) {
    printf("ldg_stream N K [quick|x16|runs [4|8 [grid]]]: N a positive multiple of 64 (x16: "
           "128), K of 1024, width 4 or 8, grid >= 0; got %ld %ld %d %d\n", N, K, width,
           split_grid);
    return 2;
  }
  const long bytes = N * row_bytes, items = bytes / 4096, items8 = bytes / 8192;  // 4 / 8 KB
  uint8_t* codes; CK(cudaMalloc(&codes, bytes));
  CK(cudaMemset(codes, 1, bytes));
  const size_t flush_bytes = 256u << 20;
  void* flush; CK(cudaMalloc(&flush, flush_bytes));
  CK(cudaMemset(flush, 3, flush_bytes));
  int sms = 0; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  uint32_t* out; CK(cudaMalloc(&out, 8 * sms * 128 * sizeof(uint32_t)));
  printf("N %ld K %ld (%d-bit codes: %.1f MB), %d SMs, %ld items of %d KB\n", N, K, width,
         bytes / 1e6, sms, x16 ? items8 : items, x16 ? 8 : 4);
  const char* names[] = {"flat", "kpair", "rows512", "rows64", "flat8", "x16"};
  // k over grid blocks, each run after its flush (clean: a read, else a memset).
  const auto time_us = [&](Kernel k, int grid, bool clean, long n_items) {
    return median_us(
        [&](int rep) {
          if (clean)
            read_flush<<<4 * sms, 512>>>(static_cast<const uint4*>(flush), flush_bytes / 16, out);
          else
            CK(cudaMemsetAsync(flush, rep, flush_bytes));
        },
        [&] { k<<<grid, 128>>>(codes, row_bytes, n_items, out); });
  };
  if (x16) {
    // The 16-row kernel: two blocks per SM (its registers), U = 2 items (steps)
    // in flight; three blocks and U = 4 for comparison. Items of 8 KB.
    for (int clean = 1; clean >= 0; --clean) {
      for (int order : {kFlat8, kX16}) {
        for (int per_sm : {2, 3}) {
          for (int U : {2, 4}) {
            const Kernel k = order == kFlat8 ? pick_u<kFlat8, 0>(U) : pick_u<kX16, 0>(U);
            const int grid = per_sm * sms;
            const float us = time_us(k, grid, clean, items8);
            printf("%-5s %-8s U %d  pol 0  %d blocks/SM (%4d blocks)  %7.1f us  %5.2f TB/s\n",
                   clean ? "clean" : "dirty", names[order], U, per_sm, grid, us,
                   bytes / us / 1e6);
          }
        }
      }
      for (int per_sm : {2, 3}) {
        for (int U : {1, 2, 4}) {
          const Kernel k = U == 1 ? runs_kernel<kX16, 1> : U == 2 ? runs_kernel<kX16, 2>
                                                                : runs_kernel<kX16, 4>;
          const int grid = per_sm * sms;
          const float us = time_us(k, grid, clean, items8);
          printf("%-5s x16 runs U %d steps  %d blocks/SM (%4d blocks)  %7.1f us  %5.2f TB/s\n",
                 clean ? "clean" : "dirty", U, per_sm, grid, us, bytes / us / 1e6);
        }
      }
    }
    return 0;
  }
  if (runs) {
    // The one-row kernel (k-paired rows, 4- and 8-bit codes): five blocks per
    // SM, each a stream-K share of the items, or the split grid's blocks (a
    // block per row block and split: the same shares of (row block, step)
    // items); a plain read's order and the kernel's order refilled one item
    // at a time beside them. g128 scales and zeros (two 16-bit values per
    // row and 128 inputs) add sz_bytes, which the times below leave out.
    const long sz_bytes = N * (K / 128) * 4;
    printf("scales and zeros (g128): %.1f MB more\n", sz_bytes / 1e6);
    for (int clean = 1; clean >= 0; --clean) {
      const auto row = [&](const char* what, Kernel k, int grid) {
        const float us = time_us(k, grid, clean, items);
        printf("%-5s %-34s %4d blocks  %7.1f us  %5.2f TB/s  (%.1f us with scales, zeros)\n",
               clean ? "clean" : "dirty", what, grid, us, bytes / us / 1e6,
               us * (bytes + sz_bytes) / bytes);
      };
      row("flat, refilled by item, U 2", stream_kernel<kFlat, 2, 0>, 5 * sms);
      row("kpair, refilled by item, U 2", stream_kernel<kKPair, 2, 0>, 5 * sms);
      row("kpair runs of 2 (as the kernel)", runs_kernel<kKPair, 2>, 5 * sms);
      row("kpair runs of 4, 4 blocks/SM", runs_kernel<kKPair, 4>, 4 * sms);
      if (split_grid > 0) {
        row("kpair runs of 2, split grid", runs_kernel<kKPair, 2>, split_grid);
        row("flat, split grid", stream_kernel<kFlat, 2, 0>, split_grid);
      }
    }
    return 0;
  }
  for (int clean = 1; clean >= 0; --clean) {
    for (int order = 0; order < 4; ++order) {
      for (int per_sm : {4, 5, 8}) {
        for (int U : {2, 4}) {
          for (int pol = 0; pol < 4; ++pol) {
            if (quick && (per_sm != 5 || U != 2 || pol != 0)) continue;
            const Kernel k = order == kFlat      ? pick<kFlat>(U, pol)
                             : order == kKPair   ? pick<kKPair>(U, pol)
                             : order == kRows512 ? pick<kRows512>(U, pol)
                                                 : pick<kRows64>(U, pol);
            const int grid = per_sm * sms;
            const float us = time_us(k, grid, clean, items);
            printf("%-5s %-8s U %d  pol %d  %d blocks/SM (%4d blocks)  %7.1f us  %5.2f TB/s\n",
                   clean ? "clean" : "dirty", names[order], U, pol, per_sm, grid, us,
                   bytes / us / 1e6);
          }
        }
      }
    }
  }
  return 0;
}
