// Fused dequantize + matmul for 1 to a few hundred rows of x, on tensor cores.
//
// The weights are handled as in the GEMV (gemv.cuh): each warp owns RT tiles
// of 16 output features, loads their packed codes from global memory straight
// into registers one step ahead, dequantizes them there and feeds them to
// mma.m16n8k16 as the A operand, with the same per-lane k order. What changes
// is x. In the GEMV every warp fetches its x fragments from L1/L2 at the moment
// it needs them, which leaves the MMAs waiting on load latency once a warp
// multiplies by 16 or more rows (and even for one row the staged kernel
// measured a few percent faster). Here the warps of a
// block stage the BM = 8 * N_TILES rows of x they share in shared memory with
// cp.async, STAGES steps ahead of use, and read their B fragments from there
// (16 bytes per lane per load, conflict-free through the swizzle below). For
// one row of x the block's whole slice of x is staged once, before its loop
// (XR), so that the loop has no barriers.
//
// More rows than BM are covered by blockIdx.x over BM-row chunks of x. It is
// the fastest-moving grid index, so the blocks that decode the same W tiles
// run side by side and all but the first find the codes in L2. K is split over
// blockIdx.z when the grid has fewer than about two blocks per SM.
#pragma once

#include <cooperative_groups.h>

#include "kernels.h"
#include "mbarrier.cuh"
#include "tile.cuh"

namespace mpq::cuda {

namespace gemm_detail {

using tile::load_stream;
using tile::mma_16816;
using tile::pack_pair;

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, uint32_t src_bytes) {
  // src_bytes = 0 fills the 16 bytes with zeros (rows of x past M).
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Where 16-byte chunk c of row r of a staged step lives. A load instruction
// has lane (g, t) read chunk t * (chunks per row / 4) + j of row g; the 8 lanes
// of a quarter warp (rows g, g+1 and t = 0..3) would share bank quads without
// this XOR, which moves a chunk within its 128-byte span by the row's parity
// and the chunk's span index, so that those 8 chunks land in 8 different quads.
__device__ __forceinline__ int swizzle(int c, int r) {
  return c ^ ((((c >> 3) << 1) | (r & 1)) & 7);
}

// In-place reorder of one staged 16-byte chunk of x into the (k, k + P/2)
// pairs the MMA's B operand takes (4- and 8-bit codes; a 2-bit word's x spans
// two chunks).
template <int W>
__device__ __forceinline__ void pair_chunk(uint4* p) {
  const uint4 v = *p;
  uint4 o;
  if constexpr (W == 4) {  // (x0 .. x7) -> (x0,x4) (x1,x5) (x2,x6) (x3,x7)
    o.x = __byte_perm(v.x, v.z, 0x5410);
    o.y = __byte_perm(v.x, v.z, 0x7632);
    o.z = __byte_perm(v.y, v.w, 0x5410);
    o.w = __byte_perm(v.y, v.w, 0x7632);
  } else {  // two words of 4: (x0,x2) (x1,x3) (x4,x6) (x5,x7)
    o.x = __byte_perm(v.x, v.y, 0x5410);
    o.y = __byte_perm(v.x, v.y, 0x7632);
    o.z = __byte_perm(v.z, v.w, 0x5410);
    o.w = __byte_perm(v.z, v.w, 0x7632);
  }
  *p = o;
}

// 2-bit codes: the 16 x values of a word span two chunks, (x0 .. x7) and
// (x8 .. x15); in place they become (x0,x8) .. (x3,x11) and (x4,x12) .. (x7,x15),
// the B operands of the word's four MMAs in order.
__device__ __forceinline__ void pair_chunks_w2(uint4* a, uint4* b) {
  const uint4 u = *a, v = *b;
  *a = make_uint4(__byte_perm(u.x, v.x, 0x5410), __byte_perm(u.x, v.x, 0x7632),
                  __byte_perm(u.y, v.y, 0x5410), __byte_perm(u.y, v.y, 0x7632));
  *b = make_uint4(__byte_perm(u.z, v.z, 0x5410), __byte_perm(u.z, v.z, 0x7632),
                  __byte_perm(u.w, v.w, 0x5410), __byte_perm(u.w, v.w, 0x7632));
}

// COLS (gemm_cuda_kernel): a 2-bit word's x as the B operands of its four
// MMAs when MMA mi takes code pairs mi and mi + 4, whose codes share a bit
// offset within their bytes: (x0,x8) (x4,x12) (x1,x9) (x5,x13) and (x2,x10)
// (x6,x14) (x3,x11) (x7,x15). Returns the sum of the 16 values in float32
// and their sum weighted by ColsCodes' bias over the factor of each one's
// class (x_i's code is in pair i % 8, class i % 4).
template <typename T>
__device__ __forceinline__ float2 pair_chunks_w2_cols(uint4* a, uint4* b) {
  const uint4 u = *a, v = *b;
  *a = make_uint4(__byte_perm(u.x, v.x, 0x5410), __byte_perm(u.z, v.z, 0x5410),
                  __byte_perm(u.x, v.x, 0x7632), __byte_perm(u.z, v.z, 0x7632));
  *b = make_uint4(__byte_perm(u.y, v.y, 0x5410), __byte_perm(u.w, v.w, 0x5410),
                  __byte_perm(u.y, v.y, 0x7632), __byte_perm(u.w, v.w, 0x7632));
  using V = typename Pair<T>::type;
  using C = ColsCodes<T>;
  const uint32_t w[8] = {u.x, u.y, u.z, u.w, v.x, v.y, v.z, v.w};  // x_2i, x_2i+1 in w[i]
  float sum = 0.f, weighted = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float lo = __low2float(as_pair<V>(w[i])), hi = __high2float(as_pair<V>(w[i]));
    sum += lo + hi;
    weighted += lo * (C::kBias / float(1 << C::shift(2 * i % 4))) +
                hi * (C::kBias / float(1 << C::shift((2 * i + 1) % 4)));
  }
  return make_float2(sum, weighted);
}

// COLS's layout of the resident x (gemm_cuda_kernel), which the host sizes:
// per step and lane range kColsRange chunks (8 of x, the sums, padding), and
// after the slice kColsZero chunks of zeros, read from kColsZeroAt on. That
// offset of one chunk puts the lanes reading zeros on other banks than the
// lanes reading range 0's x (at offset 0 both start at the slice's bank
// quad 0: a 2-way conflict on every read of x). H200, float16 g128, M = 1,
// one round, offset 0 / 1 (us): (8192, 28672) 35.9 / 34.2, (28672, 8192)
// 33.1 / 32.4, (4096, 14336) 14.9 / 14.9, (4096, 4000) 10.8 / 9.4, g256
// 32.3 / 31.8, bfloat16 38.0 / 37.0. (Staging the block's scales and zeros
// in shared memory as well, read per step by LDS instead of loads that touch
// 8 rows' sectors: L1/TEX 83% -> 54% under ncu, but 38.2 / 31.6 / 14.9 /
// 9.8 / 31.2 / 39.9; under ncu at (8192, 28672) 35.8 us (offset 0, not
// staged: 33.8), issue slots 36% (34%): L1 eased, the time did not follow.)
constexpr int kColsRange = 10;
constexpr int kColsZeroAt = 1;
constexpr int kColsZero = 8 + kColsZeroAt;
// The same with two k ranges per row (KR = 2: eight lane ranges per step,
// eight lanes reading x, two per quarter warp, ranges q and q + 4): ranges 9
// chunks apart, so that q and q + 4 lie on different bank quads, and the
// lanes reading zeros start at chunk g / 2 + 1 of the zero chunks (g / 2 is
// the quarter warp), off the quads of both.
template <int KR>
constexpr int cols_range() {
  return KR == 1 ? kColsRange : 9;
}
template <int KR>
constexpr int cols_zero() {
  return KR == 1 ? kColsZero : 8 + 4;
}

// Split K without a workspace (Hopper): the gridDim.z blocks that split a
// tile's K form one thread block cluster. Each leaves its partial sums in its
// own shared memory (over the x slice, after a barrier), and after a cluster
// barrier block rank r adds up slice r of the tile's outputs from all of them
// through distributed shared memory and writes y. The second kernel that
// would add the splits' float32 partials from global memory, and its launch,
// are gone; a last barrier keeps every block's shared memory alive until the
// others have read it. Every thread of the cluster must reach both barriers.
template <typename T, int X_ROWS, int W_ROWS, typename Rows, typename Acc>
__device__ __forceinline__ void sum_in_cluster(const Rows& rows, const Acc& acc, uint4* smem,
                                               int m0, int n0, int M, int N,
                                               const T* __restrict__ bias, T* __restrict__ y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  float* part = reinterpret_cast<float*>(smem);  // [X_ROWS][W_ROWS]
  __syncthreads();                               // every warp is done with x
  rows.for_each_output(acc, 0, [&](float v, int m, int n) { part[m * W_ROWS + (n - n0)] = v; });
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int splits = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  // Four outputs of one x row per thread and pass (W_ROWS is a multiple of
  // 4), every block's part of them loaded (one 16-byte load each) before any
  // is added, so that the remote loads' latencies overlap; the parts are
  // added in rank order, so y is bit for bit what one output and one part at
  // a time gave, in about a quarter of the rounds of remote loads. H200,
  // float16, layers back to back from a CUDA graph (scripts/bench_chain.py,
  // 8 pairs, g64, us per layer), one at a time / four at a time (workspace
  // sums in brackets; scripts/results/ab_h200_small_grids.log, run 8): w4
  // (576, 576) M = 16 3.2 / 2.8 (3.2), M = 32 4.2 / 3.2 (3.4), M = 64 5.9 /
  // 4.1 (4.0); (576, 1536) M = 64 6.1 / 5.2 (5.2); (960, 2560) M = 16 4.9 /
  // 4.5 (4.7); w8 (576, 576) M = 64 6.1 / 4.4 (4.3). At or under the
  // workspace's time in 34 of 36 cells (32- and 64-row tiles), 0.1 over in two.
  static_assert(W_ROWS % 4 == 0, "four outputs of one x row per load");
  constexpr int kMax = tile::kMaxCluster;
  for (int i4 = rank * blockDim.x + threadIdx.x; i4 < X_ROWS * W_ROWS / 4;
       i4 += splits * blockDim.x) {
    float4 parts[kMax];
#pragma unroll
    for (int r = 0; r < kMax; ++r)
      if (r < splits)
        parts[r] = reinterpret_cast<const float4*>(cluster.map_shared_rank(part, r))[i4];
    float v[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int r = 0; r < kMax; ++r) {
      if (r < splits) {
        v[0] += parts[r].x;
        v[1] += parts[r].y;
        v[2] += parts[r].z;
        v[3] += parts[r].w;
      }
    }
    const int m = m0 + 4 * i4 / W_ROWS;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int n = n0 + (4 * i4 + e) % W_ROWS;
      if (m >= M || n >= N) continue;
      const float b = bias != nullptr ? float(bias[n]) : 0.f;
      y[(size_t)m * N + n] = T(v[e] + b);
    }
  }
  cluster.sync();
#else
  __trap();  // launch_kernel asks for it only of sm_90+ code
#endif
}

// XR > 0 (one row of x, one x tile): instead of a ring of STAGES steps, the
// block's whole slice of x (XR = KR staged rows per step: the row's k ranges)
// is copied into shared memory once, before the
// loop, which then runs without barriers or copies. Lanes whose B column has
// no staged row read row g % XR instead: their columns are never stored.
// PAIRED: x is stored as the MMA's (k, k + P/2) pairs (2-bit codes: only the
// resident slice, whose pairs span two chunks). WIDE: see tile::WeightRows.
// TAIL: K is not a whole number of steps (a multiple of a lane's 16 bytes of
// codes, LANE_K, only): the last step is partial, its chunks of x past K
// copied as zeros and its loads of codes past K kept inside their rows
// (tile::WeightRows::load). The ring of staged steps, one k range, scales
// applied before the MMAs (LATE needs groups of whole steps, which such a K
// cannot hold).
// MB (stream-K through the ring, paired x, sm_90): mbarriers instead of a
// block barrier per step. Each thread pairs its chunks of the next item's
// x, as soon as they have landed, before it computes this item, and
// arrives on that slot's `full` barrier; computing an item waits for its
// slot's `full` (every chunk paired), and after it the thread arrives on
// the slot's `empty`, on which the refill of the slot waits. So a warp
// waits for the others only where it is a step ahead of the slowest, where
// the barrier held every warp of the block in step at every item. (With no
// barrier at all, a timing-only build whose outputs are wrong, the barrier
// measured 4.6 us of 67.9 at (8192, 28672) M = 16 on an H100,
// scripts/results/ablate_h100_m16_staged.log.) H100, medians of three
// alternating rounds, barrier / mbarriers (us): float16 w4 (8192, 28672) M =
// 16 67.7 / 65.2, M = 9 66.4 / 64.3, g64 69.2 / 68.6; bfloat16 66.6 / 66.3;
// w8 108.2 / 107.8; (4096, 28672) 39.0 / 39.0
// (scripts/results/ab_h100_ring_mbarrier.log).
template <typename T, int W, int N_TILES, int RT, int WARPS, int STAGES, int U, int MIN_BLOCKS,
          bool PAIRED, bool LATE, int KR, int XR = 0, bool WIDE = false, bool SK = false,
          bool TAIL = false, bool MB = false>
__global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
    gemm_cuda_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qweight,
                     const T* __restrict__ scales, const T* __restrict__ zeros,
                     const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ ws,
                     int M, int N, int K, tile::Groups groups, int steps_per_split,
                     bool cluster_sum) {
  using Rows = tile::WeightRows<T, W, RT, KR, WIDE, (N_TILES <= 4)>;
  using V = typename Rows::V;
  using Step = typename Rows::Step;
  constexpr int P = Rows::P, SUPER_K = Rows::SUPER_K, R = Rows::R, HALVES = Rows::HALVES;
  // Rows of the staged x tile per block (the B operand's columns). KR > 1 (see
  // tile::WeightRows): column c is x row c / KR over k range c % KR of a step
  // of KR * SUPER_K, so a block covers 8 / KR rows of x.
  constexpr int BM = 8 * N_TILES;
  constexpr int X_ROWS = BM / KR;  // rows of x per block
  constexpr int CHUNKS = SUPER_K / 8;    // 16-byte chunks of one staged row per step
  constexpr int STAGE = BM * CHUNKS;     // 16-byte chunks per staged step
  constexpr int THREADS = WARPS * 32;
  constexpr bool RESIDENT = XR > 0;
  static_assert(!RESIDENT || (N_TILES == 1 && XR <= BM), "a resident x is one tile");
  static_assert(W != 2 || !PAIRED || RESIDENT, "2-bit codes: paired x only when resident");
  // COLS (2-bit codes, one row of x, resident, groups of 64 or more: a lane's
  // range of 64 inputs per step lies in one group): late scaling with each
  // lane's range in its own column of B. Lane (g, t) supplies B's column g,
  // and range t's x goes to column 2t: lanes g = 2t read x, the others a
  // zero chunk. So D's column 2t, which lane (g, t) holds for rows g and
  // g + 8, is the sum over range t alone, and the lane scales it by the
  // scale and zero of its own rows and range, whatever the group size, with
  // no MMA of the sums of x (made once per block from the resident slice).
  // The codes are decoded with one LOP3 per pair (ColsCodes), each MMA's
  // pairs of one bit offset within a byte (pair_chunks_w2_cols): class c
  // comes out times a power of two, into its own partial sums, undone in
  // float32 once per step instead of a packed multiply per pair. Layout of a
  // step's x: per range, its 8 chunks, a chunk whose first two floats are
  // the range's sums of x (plain and weighted, pair_chunks_w2_cols), and a
  // chunk of padding (ranges 160 bytes apart, so that the four lanes reading
  // x hit four different bank quads).
  // KR = 2 (k-paired rows, tile::WeightRows): A rows g and g + 8 are weight
  // rows g / 2 and 4 + g / 2 over k range g % 2 of a step of two; range
  // (g % 2, t) goes to column 2t + g % 2, so that a row's product over a
  // lane's chunk is element g % 2 (row g) and 2 + g % 2 (row g + 8) of D;
  // lanes g / 2 = t read x (range g % 2), the others zeros.
  constexpr bool COLS = W == 2 && LATE && RESIDENT && WIDE;
  static_assert(!COLS || (N_TILES == 1 && XR == KR && (KR == 1 || KR == 2)),
                "COLS: one row of x");
  static_assert(W != 2 || KR == 1 || COLS, "2-bit codes: k ranges only in COLS");
  constexpr int CLS = COLS ? 4 : 1;  // classes of codes (bit offsets within a byte)
  constexpr int RANGE = cols_range<KR>();  // COLS: chunks per lane range and step
  constexpr int RANGES = 4 * KR;           // COLS: lane ranges per step
  // Chunks between consecutive steps of x in shared memory.
  constexpr int X_STEP = COLS ? RANGES * RANGE : RESIDENT ? XR * CHUNKS : STAGE;
  // Staged rows per step of the resident slice, as a divisor: XR, or 1 where
  // there is no slice (the slice's code is compiled but never runs there, and
  // would otherwise take a remainder by zero).
  constexpr int XR_ROWS = XR > 0 ? XR : 1;
  extern __shared__ uint4 x_stages[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * X_ROWS;
  constexpr int W_ROWS = Rows::ROWS * RT * WARPS;  // weight rows per block
  // SK (stream-K): the T = row blocks x steps work items (row block i / steps,
  // step i % steps) are dealt out evenly over a grid of gridDim.y blocks,
  // each taking items [i_begin, i_end) across row-block boundaries: a grid of
  // one wave however many row blocks N has, and blocks of equal work however
  // few. Either one row of x resident over all of K (KR = 2), or one x tile
  // (all of M) through the ring of staged steps, whose copies then follow
  // the items' steps from one row block into the next. A row block's part in
  // the block that is p blocks after the one holding its step 0 goes to
  // workspace slot p; the block ending the row block writes zeros to the
  // slots past its part, up to the `steps_per_split` slots the host sized
  // the workspace to; finish_split adds them up.
  static_assert(!SK || (RESIDENT && KR == 2 && N_TILES == 1) || (!RESIDENT && KR == 1 && !TAIL),
                "stream-K: one row of x resident, or one x tile through the ring");
  static_assert(!TAIL || (KR == 1 && !RESIDENT && !LATE), "a partial last step: the ring");
  static_assert(!MB || (SK && !RESIDENT && PAIRED && STAGES >= 3),
                "mbarriers: stream-K through the ring, paired x");
  const int steps = TAIL ? (K + Rows::STEP_K - 1) / Rows::STEP_K : K / Rows::STEP_K;
  // Items go in runs of U (steps % U == 0), so that a run lies in one row block.
  const long sk_runs = SK ? (long)(N / W_ROWS) * (steps / U) : 0;
  const int i_begin = SK ? U * (int)(sk_runs * blockIdx.y / gridDim.y) : 0;
  const int i_end = SK ? U * (int)(sk_runs * (blockIdx.y + 1) / gridDim.y) : 0;
  const int rb0 = SK ? i_begin / steps : blockIdx.y;  // the block's first row block
  const int tile0 = (rb0 * WARPS + warp) * Rows::ROWS * RT;
  // Warps past N still copy x and meet the barriers; they skip the math
  // (and with cluster_sum stay for the cluster's barriers).
  const bool active = tile0 < N;
  const Rows rows(qweight, scales, zeros, tile0, g, t, N, K, groups);

  float acc[N_TILES][RT][4];
#pragma unroll
  for (int i = 0; i < N_TILES; ++i)
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
      acc[i][rt][0] = acc[i][rt][1] = acc[i][rt][2] = acc[i][rt][3] = 0.f;

  // Each split one contiguous range of steps, so that a block streams each of
  // its rows in order. (Dealt to the splits in turns of one or two steps, so
  // that a row block's splits read neighbouring bytes at once, they ran
  // slower: H100, w4 g128 M = 16 at (28672, 8192) 63.9 -> 72.4 / 67.8 us;
  // scripts/results/ab_h100_split_interleave.log, branch exp/split-interleave.)
  const int s_begin = SK ? 0 : blockIdx.z * steps_per_split;
  const int s_end = SK ? steps : min(steps, s_begin + steps_per_split);

  // Copies: thread i always copies chunk i % CHUNKS of rows i / CHUNKS + k * ROWS_PER_PASS,
  // so its source offset and swizzled destination are fixed up to a stride.
  // (8-bit codes, one x tile: a stage of 64 chunks, which the first 64 threads copy.)
  static_assert((STAGE % THREADS == 0 || THREADS % STAGE == 0) && THREADS % CHUNKS == 0,
                "whole copy passes");
  constexpr int COPIES = STAGE >= THREADS ? STAGE / THREADS : 1;
  const bool copier = STAGE >= THREADS || (int)threadIdx.x < STAGE;
  constexpr int ROWS_PER_PASS = THREADS / CHUNKS;  // even: a thread's rows share a parity
  const int copy_c = threadIdx.x % CHUNKS, copy_r = threadIdx.x / CHUNKS;
  uint4* const copy_ptr = x_stages + copy_r * CHUNKS + swizzle(copy_c, copy_r);
  const uint32_t copy_dst = static_cast<uint32_t>(__cvta_generic_to_shared(copy_ptr));
  // The x row and k offset of staged row copy_r: row copy_r / KR, range copy_r % KR.
  const int copy_m = copy_r / KR;
  static_assert(ROWS_PER_PASS % KR == 0, "a copy pass covers whole rows of x");
  constexpr int M_PER_PASS = ROWS_PER_PASS / KR;
  const T* copy_src =
      x + (size_t)(m0 + copy_m) * K + (copy_r % KR) * SUPER_K + copy_c * 8;
  const auto copy_step = [&](int s, int stage) {
    if (!copier) return;
#pragma unroll
    for (int k = 0; k < COPIES; ++k) {
      // (TAIL: a chunk past K lands as zeros, KR = 1)
      const bool in = m0 + copy_m + k * M_PER_PASS < M &&
                      (!TAIL || s * Rows::STEP_K + copy_c * 8 < K);
      const T* src = in ? copy_src + (size_t)k * M_PER_PASS * K + (size_t)s * Rows::STEP_K : x;
      cp_async16(copy_dst + 16u * (stage * STAGE + k * ROWS_PER_PASS * CHUNKS), src, in ? 16 : 0);
    }
  };
  // PAIRED: once a thread's copies of a step have landed it reorders each of
  // its chunks in place into the (k, k + P/2) pairs the MMA's B operand takes,
  // so that readers (every warp reads every chunk) use the words as they are.
  // 4- and 8-bit codes only: a 2-bit word's x spans two chunks (pair_chunks_w2, resident x only).
  const auto pair_up = [&](int stage) {
    if (!copier) return;
#pragma unroll
    for (int k = 0; k < COPIES; ++k)
      pair_chunk<W>(copy_ptr + stage * STAGE + k * ROWS_PER_PASS * CHUNKS);
  };
  // RESIDENT: the copy of the block's slice of x, chunk i of the slice for
  // i = threadIdx.x + THREADS * n; with `pair` the same chunks are paired.
  const auto copy_slice = [&](bool pair) {
    const int n = (s_end - s_begin) * X_STEP;
    if (W == 2 && pair) {  // chunks (2c, 2c + 1) of a staged row hold one word's x
      for (int i = threadIdx.x; i < n / 2; i += THREADS) {
        const int c = 2 * (i % (CHUNKS / 2)), r = i / (CHUNKS / 2) % XR_ROWS, st = i / (X_STEP / 2);
        uint4* row = x_stages + st * X_STEP + r * CHUNKS;
        pair_chunks_w2(row + swizzle(c, r), row + swizzle(c + 1, r));
      }
      return;
    }
    for (int i = threadIdx.x; i < n; i += THREADS) {
      const int c = i % CHUNKS, r = i / CHUNKS % XR_ROWS, st = i / X_STEP;
      uint4* dst = x_stages + st * X_STEP + r * CHUNKS + swizzle(c, r);
      if (pair) {
        pair_chunk<W>(dst);
        continue;
      }
      const int m = r / KR;
      const bool in = m0 + m < M;
      const T* src = x + (size_t)(m0 + m) * K + (size_t)(s_begin + st) * Rows::STEP_K +
                     (r % KR) * SUPER_K + c * 8;
      cp_async16(static_cast<uint32_t>(__cvta_generic_to_shared(dst)), in ? src : x, in ? 16 : 0);
    }
  };
  // COLS: the copy into the layout above (pair = false), then the pairing,
  // the sums of x and the zero chunk after the slice.
  const auto cols_slice = [&](bool pair) {
    const int n_steps = s_end - s_begin;
    constexpr int STEP_CHUNKS = KR * CHUNKS;  // of x per step
    if (!pair) {
      for (int i = threadIdx.x; i < n_steps * STEP_CHUNKS; i += THREADS) {
        const int c = i % STEP_CHUNKS, st = i / STEP_CHUNKS;
        uint4* dst = x_stages + st * X_STEP + (c / 8) * RANGE + c % 8;
        cp_async16(static_cast<uint32_t>(__cvta_generic_to_shared(dst)),
                   x + (size_t)(s_begin + st) * Rows::STEP_K + c * 8, 16);
      }
      return;
    }
    // (a split past the last step has none: n_steps <= 0)
    if (threadIdx.x < cols_zero<KR>() && n_steps > 0)
      x_stages[n_steps * X_STEP + threadIdx.x] = make_uint4(0, 0, 0, 0);
    // Words 4r .. 4r + 3 of a step are range r: four consecutive threads.
    const int words = n_steps * (STEP_CHUNKS / 2);
    for (int i0 = 0; i0 < words; i0 += THREADS) {
      const int i = i0 + threadIdx.x, st = i / (STEP_CHUNKS / 2), w = i % (STEP_CHUNKS / 2);
      uint4* p = x_stages + st * X_STEP + (w / 4) * RANGE + 2 * (w % 4);
      float2 sum = i < words ? pair_chunks_w2_cols<T>(p, p + 1) : make_float2(0.f, 0.f);
#pragma unroll
      for (int o = 1; o <= 2; o *= 2) {
        sum.x += __shfl_xor_sync(0xffffffffu, sum.x, o);
        sum.y += __shfl_xor_sync(0xffffffffu, sum.y, o);
      }
      if (i < words && w % 4 == 0) *reinterpret_cast<float2*>(p + 8) = sum;
    }
  };
  // Reads: lane (g, t) reads chunks t * CPL + jj (jj < CPL) of rows nt * 8 + g.
  // Those chunk indices have disjoint bits, and the swizzle's XOR is the same
  // for all of them (row parity = g's, span = t's), so the swizzled index is
  // one lane constant XOR jj, and the tile offset is an immediate.
  constexpr int CPL = CHUNKS / 4;
  const int x_row = RESIDENT ? g % XR_ROWS : g;
  // The lane's reads of stage 0 are held in registers (tile::opaque; else the
  // compiler rebuilds them from the thread index at every step): with ADDRS
  // the shared-memory address of each of its chunks, a read one multiply-add
  // of the stage away; else its chunk index (the row's offset, a multiple of
  // CHUNKS, lies above jj's bits), opaque only where registers allow (the
  // 64-row kernels spilled). Measured with the WeightRows offsets held too
  // (OPAQUE): H200, g128, medians of three alternating rounds (us), M = 1
  // float16 w4 (8192, 28672) 49.5 -> 48.3, (28672, 8192) 46.1 -> 43.1,
  // (14336, 4096) 17.9 -> 17.2; bfloat16 w4 50.7 -> 49.0, 47.7 -> 43.8; w2
  // g256 40.2 -> 38.9; w8 (28672, 8192) 74.8 -> 73.3; M = 3 / 8 52.2 -> 51.6
  // / 61.6 -> 60.8; M = 16 within 1.7% either way (4-bit one-row loop: 346
  // -> 294 instructions per two steps).
  constexpr bool ADDRS = (W != 2 || RESIDENT) && N_TILES <= 4;  // (W = 2 staged: spills)
  const uint32_t x_base = static_cast<uint32_t>(__cvta_generic_to_shared(x_stages));
  const uint32_t lane_chunk = x_row * CHUNKS + swizzle(t * CPL, x_row);
  uint32_t x_addr[ADDRS ? CPL : 1];
  if constexpr (ADDRS) {
#pragma unroll
    for (int jj = 0; jj < CPL; ++jj) x_addr[jj] = tile::opaque(x_base + 16u * (lane_chunk ^ jj));
  } else {
    x_addr[0] = N_TILES <= 4 ? tile::opaque(lane_chunk) : lane_chunk;
  }

  // COLS: the lane's first chunk of x (or the zero chunk) and its stride per
  // step (0 for the zero chunk), and its range's sum of x.
  uint32_t cols_x = 0, cols_stride = 0, cols_sum = 0;
  if constexpr (COLS) {
    const uint32_t zeros = x_base + 16u * (uint32_t)((s_end - s_begin) * X_STEP);
    // (the lane's range, and whether it reads x)
    const int q = KR == 1 ? t : 4 * (g & 1) + t;
    const bool reads = KR == 1 ? g == 2 * t : g >> 1 == t;
    const uint32_t zero = zeros + 16u * (KR == 1 ? kColsZeroAt : (g >> 1) + 1);
    cols_x = tile::opaque(reads ? x_base + 16u * (q * RANGE) : zero);
    cols_stride = tile::opaque(reads ? 16u * X_STEP : 0u);
    cols_sum = tile::opaque(x_base + 16u * (q * RANGE + 8));
  }

  const auto load_step = [&](int s, Step& st) { rows.template load<TAIL>(s, st); };

  // One step: 4 words per row of this lane, each against the matching x.
  const auto compute = [&](const Step& st, int stage) {
    if constexpr (COLS) {
      float part[CLS][RT][4] = {};
      const uint32_t xp = cols_x + stage * cols_stride;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        V d[R][P / 2];
#pragma unroll
        for (int r = 0; r < R; ++r) ColsCodes<T>::decode((&st.w[r].x)[j], d[r]);
        const uint4 v0 = tile::lds128(xp + 32u * j), v1 = tile::lds128(xp + 32u * j + 16u);
        const uint32_t b[4][2] = {{v0.x, v0.y}, {v0.z, v0.w}, {v1.x, v1.y}, {v1.z, v1.w}};
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
          for (int rt = 0; rt < RT; ++rt) {
            const uint32_t a[4] = {as_bits(d[2 * rt][mi]), as_bits(d[2 * rt + 1][mi]),
                                   as_bits(d[2 * rt][mi + 4]), as_bits(d[2 * rt + 1][mi + 4])};
            mma_16816<T>(part[mi][rt], a, b[mi][0], b[mi][1]);
          }
        }
      }
      const uint32_t sums = cols_sum + 16u * X_STEP * stage;
      Rows::template apply_cols<CLS>(
          st, part, KR == 1 ? 0 : g & 1, __uint_as_float(tile::lds32(sums)),
          ColsCodes<T>::kBias != 0.f ? __uint_as_float(tile::lds32(sums + 4)) : 0.f, acc[0]);
      return;
    }
    uint4 xc8[W == 8 ? N_TILES : 1];  // 8-bit codes: x chunks shared by words j, j + 1
    // LATE: this step's sums of x * code, and of x (Rows::mma_sums) per x tile.
    float part[LATE ? N_TILES : 1][RT][4] = {}, xs[LATE ? N_TILES : 1][4] = {};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      V d[R][P / 2];
      if constexpr (LATE) {
        Rows::codes(st, j, d);
      } else {
        Rows::template dequant<(N_TILES < 8)>(st, j, d);
      }
      // Word j of a lane covers k = t * LANE_K + j * P .. + P: one 16-byte chunk
      // of x for 4-bit codes, two for 2-bit, half of one for 8-bit (whose chunk
      // is loaded at even j for all tiles and kept for the odd j).
      const auto chunk = [&](int nt, int h) {
        const int jj = W == 8 ? j / 2 : W == 4 ? j : 2 * j + h;
        const uint32_t a = ADDRS ? x_addr[jj] : x_base + 16u * (x_addr[0] ^ jj);
        return tile::lds128(a + 16u * (stage * X_STEP + nt * 8 * CHUNKS));
      };
      if constexpr (W == 8) {
        if (j % 2 == 0) {
#pragma unroll
          for (int nt = 0; nt < N_TILES; ++nt) xc8[nt] = chunk(nt, 0);
        }
      }
#pragma unroll
      for (int nt = 0; nt < N_TILES; ++nt) {
        // B fragments of the P / 4 MMAs of this word: (b0, b1) pairs of x.
        uint32_t b[P / 4][2];
        if constexpr (PAIRED && W == 2) {
          const uint4 v0 = chunk(nt, 0), v1 = chunk(nt, 1);
          b[0][0] = v0.x, b[0][1] = v0.y, b[1][0] = v0.z, b[1][1] = v0.w;
          b[2][0] = v1.x, b[2][1] = v1.y, b[3][0] = v1.z, b[3][1] = v1.w;
        } else if constexpr (PAIRED) {
          const uint4 v = W == 8 ? xc8[nt] : chunk(nt, 0);
          const uint32_t* vw = &v.x;
#pragma unroll
          for (int mi = 0; mi < P / 4; ++mi) {
            b[mi][0] = vw[(W == 8 ? 2 * (j % 2) : 2 * mi)];
            b[mi][1] = vw[(W == 8 ? 2 * (j % 2) : 2 * mi) + 1];
          }
        } else {
          T xv[P];
          if constexpr (W == 8) {
            *reinterpret_cast<uint2*>(xv) = j % 2 == 0 ? make_uint2(xc8[nt].x, xc8[nt].y)
                                                       : make_uint2(xc8[nt].z, xc8[nt].w);
          } else {
#pragma unroll
            for (int h = 0; h < HALVES; ++h) reinterpret_cast<uint4*>(xv)[h] = chunk(nt, h);
          }
#pragma unroll
          for (int mi = 0; mi < P / 4; ++mi) {
            b[mi][0] = pack_pair<T>(xv[2 * mi], xv[2 * mi + P / 2]);
            b[mi][1] = pack_pair<T>(xv[2 * mi + 1], xv[2 * mi + 1 + P / 2]);
          }
        }
#pragma unroll
        for (int mi = 0; mi < P / 4; ++mi) {
          if constexpr (LATE) {
            Rows::mma(part[nt], d, mi, b[mi][0], b[mi][1]);
          } else {
            Rows::mma(acc[nt], d, mi, b[mi][0], b[mi][1]);
          }
        }
        if constexpr (LATE) {
          // The sums of x: one MMA per two of codes (8-bit codes: per chunk, at odd j).
          if constexpr (W == 8) {
            if (j % 2 == 1) Rows::mma_sums(xs[nt], xc8[nt].x, xc8[nt].y, xc8[nt].z, xc8[nt].w);
          } else {
#pragma unroll
            for (int q = 0; q < P / 8; ++q)
              Rows::mma_sums(xs[nt], b[2 * q][0], b[2 * q][1], b[2 * q + 1][0], b[2 * q + 1][1]);
          }
        }
      }
    }
    if constexpr (LATE) {
      float xsum[N_TILES][4];
      Rows::sums_of_columns(xs, xsum);
      Rows::template apply<N_TILES>(st, part, xsum, acc);
    }
  };

  // Launched to overlap the kernel before (programmatic dependent launch,
  // tile::launch), this block has come this far while that one ends; all
  // its reads and writes wait for it (y may take memory it still reads).
  tile::wait_prerequisites();

  // SK: the step of the next item computed and its row block's offsets from
  // the first one's (W_ROWS rows further per row block), and the loads of the
  // run after it (one run ahead, possibly in the next row block); through
  // the ring, the step of the next item whose x is copied.
  int cs = i_begin - rb0 * steps;
  int copy_next = cs;

  // MB: slot i's `full` and `empty` barriers after the ring.
  const uint32_t mb_full = x_base + 16u * (STAGES * STAGE), mb_empty = mb_full + 8u * STAGES;
  if constexpr (MB) {
    if (threadIdx.x < STAGES) {
      mbar_init(mb_full + 8u * threadIdx.x, THREADS);
      mbar_init(mb_empty + 8u * threadIdx.x, THREADS);
    }
    __syncthreads();
  }

  // Prologue: STAGES - 1 steps of x in flight (RESIDENT: all of them), U
  // steps of weights in registers.
  if constexpr (COLS) {
    cols_slice(false);
    cp_async_commit();
  } else if constexpr (RESIDENT) {
    copy_slice(false);
    cp_async_commit();
  } else {
    // (SK: the items' steps, from one row block into the next)
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
      if (SK ? i < i_end - i_begin : s_begin + i < s_end)
        copy_step(SK ? copy_next : s_begin + i, i);
      copy_next = copy_next + 1 == steps ? 0 : copy_next + 1;
      cp_async_commit();
    }
  }
  Step next[U];
  uint32_t lq = 0, lso = 0;
  const uint32_t lq_rb = W_ROWS * (uint32_t)(K / Rows::LANE_K);
  const auto load_run = [&](Step(&st)[U], int s, uint32_t q, uint32_t so) {
#pragma unroll
    for (int u = 0; u < U; ++u) rows.load(s + u, st[u], q, so);
  };
  if constexpr (SK) {
    if (i_end > i_begin) load_run(next, cs, 0, 0);
    if constexpr (MB) {
      if (i_end > i_begin) {  // the first item's x paired
        cp_async_wait<STAGES - 2>();
        pair_up(0);
        mbar_arrive(mb_full);
      }
    }
  } else {
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (active && s_begin + u < s_end) load_step(s_begin + u, next[u]);
  }
  if constexpr (RESIDENT) {
    cp_async_wait<0>();
    if constexpr (PAIRED) {
      if constexpr (W == 2) __syncthreads();  // a word's two chunks came from two threads
      if constexpr (COLS) {
        cols_slice(true);
      } else {
        copy_slice(true);
      }
    }
    __syncthreads();
    if (!active && !cluster_sum) return;
  }

  // (Measured and not taken, for the resident kernels: two sets of U steps in
  // registers used in turn instead of the copies `cur = next`: 6% fewer
  // instructions per MMA (w4 g128: 11.6 -> 10.9), the loads still ahead of
  // the MMAs, yet slower on every shape, H200, M = 1, g128 (us): w4 (8192,
  // 28672) 52.8 -> 60.6, (28672, 8192) 49.9 -> 61.0; w8 74.9 -> 91.8; w2
  // 43.6 -> 47.8. Nor, for the ring's kernels, copying and reloading one
  // step at a time, `cur[u] = next[u]` and the load of the next run's step u
  // right before step u is computed, so that a step waits only for its own
  // codes (fp16 w4 stream-K with mbarriers 198 -> 182 registers): H100, g128,
  // medians of three alternating rounds (us), M = 16 float16 w4 (8192,
  // 28672) 64.2 -> 76.5, (28672, 8192) 62.8 -> 88.6, (4096, 14336) 24.0 ->
  // 27.9; bfloat16 65.1 -> 77.1; M = 8 (28672, 8192) 62.1 -> 87.6; with
  // three blocks per SM on top (145-168 registers) 82.4 at (8192, 28672)
  // (scripts/results/ab_h100_per_step_reloads.log). Nor, in stream-K with
  // mbarriers, the codes two runs ahead instead of one (a second set of U
  // steps in registers: 198 -> 252 registers, still two blocks per SM, no
  // spills; branch exp/sk-two-runs-ahead): H100, g128, medians of three
  // alternating rounds, one / two runs ahead (us): float16 w4 (8192, 28672)
  // M = 16 65.6 / 67.6, M = 9 64.8 / 66.8, g64 69.4 / 71.1; bfloat16 66.1 /
  // 67.7; w8 109.7 / 111.0; (4096, 28672) 39.1 / 40.9
  // (scripts/results/ab_h100_sk_two_runs_ahead.log). Nor the codes through
  // the stream-K ring beside x, by TMA: thread 0 asked for a box of the
  // block's 128 rows by a step's 64 bytes per slot on the slot's `full`
  // mbarrier, and (late scaling) each thread loaded its row's scale and
  // zero an item ahead into the slot, so that the computing warps issued no
  // global loads at all (198 -> 138 registers, three blocks per SM; branch
  // exp/ring-codes-tma): H100, g128, medians of three alternating rounds,
  // loads / TMA (us): float16 w4 (8192, 28672) M = 16 64.5 / 71.4, M = 9
  // 63.6 / 70.6, g64 68.5 / 76.9; bfloat16 65.0 / 71.6; w8 101.3 / 102.0;
  // at four blocks per SM (120 registers, no spills) 78.9 for float16 w4,
  // and held to two blocks per SM by eight stages 83.2 against the loads'
  // 64.7, so the ring itself costs, not the third block
  // (scripts/results/ab_h100_ring_codes_tma*.log). More blocks streaming
  // more rows at once ran slower, not faster. Each thread's own codes
  // through a private ring in shared memory by cp.async, read back before
  // the item's MMAs (164 registers): the build measured put an item's codes
  // in the copy group of x's item 4 (ring of 8) or 1 (ring of 5) before
  // it, so the wait for x's next item also waited for codes copied only two
  // items earlier; H100, g128, medians of three alternating rounds, loads /
  // ring of 8 / ring of 5 (us): float16 w4 (8192, 28672) M = 16 64.9 / 90.7
  // / 88.5, M = 9 64.2 / 89.2 / 86.0, g64 69.2 / 95.6 / 94.1; bfloat16 65.9
  // / 91.0 / 88.3 (scripts/results/ab_h100_codes_ring_w2_shfl.log). With
  // an item's codes in its own x's copy group and stage, 8 or 6 stages
  // deep (6 or 4 items to land), exact outputs, no faster: 65.0 / 89.6 /
  // 91.5 at M = 16, and in the split grid at (28672, 8192) 62.8 / 92.8 /
  // 109.3 (scripts/results/ab_h100_codes_ring_own_stage.log, branch
  // exp/codes-ring). A ring of that kind for the split grid, 3 / 4 / 6
  // steps deep, measured slower on the H200 too (70.2 -> 75.0 / 74.4 /
  // 85.4 us; gemm.cuh's gemm_bits). The codes stay loaded into registers.)
  if constexpr (SK) {
    // (No launch_dependents here: finish_split, launched programmatically,
    // starts as the blocks end. Letting it start once a block's last run is
    // computed, or from the block's start, measured level, H100, g128,
    // medians of three alternating rounds, never / after the last run / at
    // the start (us): M = 1 w4 (8192, 28672) 54.7 / 54.8 / 54.6, w8 94.8 /
    // 94.9 / 94.9; M = 16 65.3 / 65.6 / 65.6, M = 9 64.1 / 64.2 / 64.1, w2
    // 59.5 / 59.5 / 59.4; scripts/results/ab_h100_sk_trigger.log.)
    int stage = 0;
    for (int left = i_end - i_begin; left > 0; left -= U) {
      Step cur[U];
#pragma unroll
      for (int u = 0; u < U; ++u) cur[u] = next[u];
      if (left > U) {
        const bool wrap = cs + U == steps;
        load_run(next, wrap ? 0 : cs + U, wrap ? lq + lq_rb : lq,
                 wrap ? lso + W_ROWS * (uint32_t)(K / groups.size) : lso);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if constexpr (RESIDENT) {
          compute(cur[u], cs + u);
        } else if constexpr (MB) {
          const int i = (i_end - i_begin - left) + u;  // the block's items before this one
          const int ns = stage + 1 == STAGES ? 0 : stage + 1;
          const int ps = stage == 0 ? STAGES - 1 : stage - 1;
          // The next item's copies (this thread's) have landed once at most
          // one newer group is pending (the item after it).
          cp_async_wait<STAGES - 3>();
          if (u + 1 < left) {
            pair_up(ns);
            mbar_arrive(mb_full + 8u * ns);
          }
          mbar_wait(mb_full + 8u * stage, (i / STAGES) & 1);
          compute(cur[u], stage);
          mbar_arrive(mb_empty + 8u * stage);
          // Item i + STAGES - 1 into the slot of item i - 1, once every thread is done with it.
          if (u + STAGES - 1 < left) {
            if (i > 0) mbar_wait(mb_empty + 8u * ps, ((i - 1) / STAGES) & 1);
            copy_step(copy_next, ps);
            copy_next = copy_next + 1 == steps ? 0 : copy_next + 1;
          }
          cp_async_commit();
          stage = ns;
        } else {
          // (as in the loop below; an item's copy is ahead by STAGES - 1 items)
          cp_async_wait<STAGES - 2>();
          if constexpr (PAIRED) pair_up(stage);
          __syncthreads();
          if (u + STAGES - 1 < left) {
            copy_step(copy_next, (stage + STAGES - 1) % STAGES);
            copy_next = copy_next + 1 == steps ? 0 : copy_next + 1;
          }
          cp_async_commit();
          compute(cur[u], stage);
          stage = stage + 1 == STAGES ? 0 : stage + 1;
        }
      }
      cs += U;
      const bool full = cs == steps;
      if (full || left == U) {  // the end of a row block's segment
        const int dn = (int)(lq / (uint32_t)(K / Rows::LANE_K));  // rows past the first block's
        // This block's part of the row block: blocks since the one holding its step 0.
        const long run0 = (long)(rb0 + dn / W_ROWS) * (steps / U);
        const int part = blockIdx.y - (int)(((run0 + 1) * gridDim.y - 1) / sk_runs);
        const size_t slot = (size_t)M * N;
        rows.for_each_output(acc, 0, [&](float v, int m, int n) {
          if (m >= M) return;  // columns of x rows that are not there
          // Shares of whole row blocks (no workspace): each segment is one.
          if (ws == nullptr) return Rows::put(v, m, n + dn, M, N, 0, nullptr, bias, y);
          float* out = ws + ((size_t)m * N + n + dn);
          out[part * slot] = v;
          if (full)
            for (int q = part + 1; q < steps_per_split; ++q) out[q * slot] = 0.f;
        });
#pragma unroll
        for (int i = 0; i < N_TILES; ++i)
#pragma unroll
          for (int rt = 0; rt < RT; ++rt)
            acc[i][rt][0] = acc[i][rt][1] = acc[i][rt][2] = acc[i][rt][3] = 0.f;
        if (full) cs = 0, lq += lq_rb, lso += W_ROWS * (uint32_t)(K / groups.size);
      }
    }
    return;
  }
  int stage = 0;
  for (int s = s_begin; s < s_end; s += U) {
    Step cur[U];
#pragma unroll
    for (int u = 0; u < U; ++u) cur[u] = next[u];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (active && s + U + u < s_end) load_step(s + U + u, next[u]);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int ss = s + u;
      if (ss >= s_end) break;  // the same for the whole block
      if constexpr (RESIDENT) {
        if (active) compute(cur[u], ss - s_begin);
        continue;
      }
      // Step ss's group is complete once at most STAGES - 2 newer ones are pending;
      // the barrier also ends every warp's reads of the stage refilled next.
      cp_async_wait<STAGES - 2>();
      if constexpr (PAIRED) pair_up(stage);
      __syncthreads();
      const int ahead = ss + STAGES - 1;
      if (ahead < s_end) copy_step(ahead, (stage + STAGES - 1) % STAGES);
      cp_async_commit();
      if (active) compute(cur[u], stage);
      stage = stage + 1 == STAGES ? 0 : stage + 1;
    }
  }
  // The kernel after this one (the split sums', the next layer's) may start
  // once every block has come here (or ended), its blocks waiting for this
  // grid's end. Not from the block's start, which was slower than no overlap
  // at all where a layer's weights stream from memory (the next grid's
  // blocks then take SMs as ours free them, likely unevenly). A graph of
  // back-to-back layers at M = 1, H200, w4 g128 (4096, 14336) and (14336,
  // 4096) in turn: 14.8 us per layer, against 13.3 in plain stream order and
  // 12.9 from here; w8 19.0, 18.6 and 18.7; SmolLM2's (576, 1536) and (1536,
  // 576) w4 g32 3.6 from here, 4.0 in plain order (scripts/bench_chain.py,
  // scripts/results/ab_h200_pdl_trigger.log).
  tile::launch_dependents();
  cp_async_wait<0>();
  if (cluster_sum) {
    sum_in_cluster<T, X_ROWS, W_ROWS>(rows, acc, x_stages, m0, blockIdx.y * W_ROWS, M, N, bias,
                                     y);
    return;
  }
  if (!active) return;

  if constexpr (COLS) {
    // Lane (g, t) holds rows g and g + 8 over range t; a row's four ranges
    // meet across the quad. KR = 2: its rows' k range g % 2 in column 2t +
    // g % 2; lane g ^ 1 (lane ^ 4) holds the same rows' other range.
    // (Rows::apply_cols sums a row's products into element 2 hr either way)
    const int col = KR == 1 ? 0 : g & 1;
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float v = acc[0][rt][2 * hr];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if constexpr (KR == 2) v += __shfl_xor_sync(0xffffffffu, v, 4);
        if (t == 0 && col == 0)
          Rows::put(v, m0, rows.row[2 * rt + hr], M, N, blockIdx.z, ws, bias, y);
      }
    }
    return;
  }
  rows.store(acc, m0, M, N, blockIdx.z, ws, bias, y);
}

}  // namespace gemm_detail

}  // namespace mpq::cuda
