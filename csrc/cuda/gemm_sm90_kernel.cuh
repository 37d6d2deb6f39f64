// Fused dequantize + matmul for many rows of x on Hopper (sm_90a), 2-, 4- and
// 8-bit codes (the kernels of each width in gemm_sm90_w<W>.cu).
//
// The output tile is computed transposed, y^T = W x^T, so that the weights are
// wgmma's A operand, which may come from registers: each thread reads its
// share of the packed codes from shared memory, dequantizes them to fp16/bf16
// pairs and hands them to the tensor cores, while x (B) is read by the tensor
// cores straight from shared memory. A block has two consumer warpgroups, 64
// weight rows each, and BM rows of x, and a third warpgroup (its registers
// given to the consumers by setmaxnreg) whose first thread keeps a ring of
// STAGES buffers filled by bulk tensor copies (TMA): each stage has a "full"
// mbarrier the copies complete and an "empty" one the eight consumer warps
// arrive at when done, so the consumers never wait for each other. (TMA
// writes through the async proxy, which the tensor cores read: no proxy fence
// per step, which cp.async would need: M = 1024 at (8192, 28672) took 1492 us
// with cp.async and a block barrier per step, 1178 us with TMA, 839 us with
// the copy warpgroup and 256-row tiles.)
//
// The register layout of A (the m16n8k16 A fragment per warp) puts, for each
// k16 slice, the pairs (2c, 2c+1) and (2c+8, 2c+9) in lane c of a quad. With
// the canonical layout (8 codes per word, lowest bits first) that pair is byte
// c of a word, so each lane decodes byte c of every word of its rows: one byte
// permute, one LOP3 and one packed FMA give the exact codes (float16), and a
// second packed FMA c * s - z * s the weights. 8-bit codes (4 per word): the
// pair (2c, 2c+1) of a k16 slice is half c & 1 of word c / 2 of the slice's
// four, (2c+8, 2c+9) the same half of word 2 + c / 2: one 4-byte load per pair
// and, for float16, one byte permute over the magic 1024, one packed subtract
// and one packed FMA (bfloat16, whose mantissa holds no 8-bit code over a
// magic value: the float32 route of decode.cuh, two permutes, two adds and a
// conversion per pair). 2-bit codes (16 per word): word j of a row's step is
// slice j, the pairs nibble c & 1 of bytes c / 2 and 2 + c / 2: one 16-byte
// load per row and step, then per pair a byte permute, one LOP3 and two packed
// FMAs (dequant_crumbs).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "decode.cuh"
#include "kernels.h"
#include "tile.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace mpq::cuda::sm90 {

constexpr int kConsumers = 256;          // two warpgroups: decode and MMAs
constexpr int kThreads = kConsumers + 128;  // + a warpgroup whose first thread issues the copies
constexpr int kRowsW = 128;    // weight rows (output features) per block, 64 per warpgroup
constexpr int kStepK = 64;     // k per step: one 128-byte swizzle row per row of x
// Bytes of W-bit codes of one weight row per step: 16, 32 or 64 (2-, 4-, 8-bit).
template <int W>
constexpr int kRowBytes = kStepK * W / 8;
// 32-bit words of one weight row per step.
template <int W>
constexpr int kRowWords = kRowBytes<W> / 4;

// Blocks of kRowsW weight rows that cover N.
inline int64_t weight_tiles(int64_t N) { return (N + kRowsW - 1) / kRowsW; }

template <int BM, int STAGES, int W>
struct Layout {
  static constexpr int kX = BM * 128;           // x tile of one stage (1024-byte multiple)
  static constexpr int kW = kRowsW * kRowBytes<W>;  // weight tile of one stage
  static constexpr int kStage = kX + kW;
  // + three mbarriers per stage, + slack to align the base to 1024
  static constexpr int kBytes = STAGES * kStage + 24 * STAGES + 1024;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ void sts128(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(addr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

// PERM (x's k order permuted within each step, see gemm_sm90_kernel): half `hf`
// of a staged row of x (128 bytes at `row_addr`, 16-byte chunks swizzled by
// the row's r & 7), k 32 hf .. 32 hf + 31, in place. Word o (of 16) of the
// half becomes (x[k0], x[k0 + 4]) with k0 = 8 c + 2 j0 + h for o = 8 j0 +
// 4 h + c: the pair of codes (k0, k0 + 4) that lane c's A register h of
// k16 slice 2 hf + j0 holds.
__device__ __forceinline__ void permute_half_row(uint32_t row_addr, int r, int hf) {
  uint32_t in[16];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint4 v = tile::lds128(row_addr + (((4 * hf + q) ^ (r & 7)) << 4));
    in[4 * q] = v.x, in[4 * q + 1] = v.y, in[4 * q + 2] = v.z, in[4 * q + 3] = v.w;
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {  // q = 2 j0 + h
    const int j0 = q >> 1, h = q & 1;
    const uint32_t sel = h ? 0x7632u : 0x5410u;
    uint4 o;
    o.x = __byte_perm(in[0 + j0], in[2 + j0], sel);
    o.y = __byte_perm(in[4 + j0], in[6 + j0], sel);
    o.z = __byte_perm(in[8 + j0], in[10 + j0], sel);
    o.w = __byte_perm(in[12 + j0], in[14 + j0], sel);
    sts128(row_addr + (((4 * hf + q) ^ (r & 7)) << 4), o);
  }
}

// PERM: the codes (n, n + 4) of a word, n = 0 (HI: 1), as a dequantized pair:
// magic + c (the high code from src >> 4: bfloat16 has no room for a code
// shifted by 4), the magic subtracted, then c * s - z * s.
template <typename T, bool HI>
__device__ __forceinline__ uint32_t dequant_nibbles(uint32_t src, typename Pair<T>::type s2,
                                                    typename Pair<T>::type nzs2) {
  using V = typename Pair<T>::type;
  const V c = __hsub2(biased_pair<T, 4>(src, HI), as_pair<V>(Pair<T>::kMagic));
  return as_bits(__hfma2(c, s2, nzs2));
}

// Byte `sel` of a word (both nibbles: codes 2c and 2c+1) as a dequantized
// pair, c * s - z * s in one packed FMA (nzs2 = neg_zero_scale(s2, z2)).
template <typename T>
__device__ __forceinline__ uint32_t dequant_byte(uint32_t word, uint32_t sel, uint32_t unshift,
                                                 typename Pair<T>::type s2,
                                                 typename Pair<T>::type nzs2) {
  using V = typename Pair<T>::type;
  V c;
  if constexpr (std::is_same_v<T, __half>) {
    // The byte in all four bytes; low code at bits 0..3, high code at bits 20..23:
    // (1024 + lo, 1024 + 16 hi), undone exactly by one packed FMA.
    const uint32_t v = and_or(__byte_perm(word, 0, sel), 0x00F0000Fu, Pair<T>::kMagic);
    c = __hfma2(as_pair<V>(v), as_pair<V>(unshift),
                __halves2half2(__float2half(-1024.f), __float2half(-64.f)));
  } else {
    // bfloat16 has no room for a shifted code: take the high code from word >> 4.
    const uint32_t v = and_or(__byte_perm(word, word >> 4, sel), 0x000F000Fu, Pair<T>::kMagic);
    c = __hsub2(as_pair<V>(v), as_pair<V>(Pair<T>::kMagic));
  }
  return as_bits(__hfma2(c, s2, nzs2));
}

// 2-bit codes: the pair (code 2i, code 2i + 1) in nibble i of a word, i = 2b
// + n (byte b, nibble n), as a dequantized pair. `sel` puts byte b (float16)
// in every byte, or (bfloat16) byte b of the word and of the word >> 2
// (`shifted`) in the low and high halves; `mask` keeps code 2i at bit 4n of
// the low half and code 2i + 1 at bit 4n + 2 (float16; bfloat16, from the
// shifted word: 4n) of the high half, under the magic value's bits; one packed
// FMA with `unshift` and `bias` undoes shift and magic exactly (products by
// powers of two), a second applies scale and zero point.
template <typename T>
__device__ __forceinline__ uint32_t dequant_crumbs(uint32_t word, uint32_t shifted, uint32_t sel,
                                                   uint32_t mask, uint32_t unshift, uint32_t bias,
                                                   typename Pair<T>::type s2,
                                                   typename Pair<T>::type nzs2) {
  using V = typename Pair<T>::type;
  const uint32_t v = and_or(__byte_perm(word, shifted, sel), mask, Pair<T>::kMagic);
  const V c = __hfma2(as_pair<V>(v), as_pair<V>(unshift), as_pair<V>(bias));
  return as_bits(__hfma2(c, s2, nzs2));
}

// 8-bit codes: the two bytes of a word that `sel` picks (float16: a PRMT
// selector over the magic bytes 0x64, 0x4140 or 0x4342; bfloat16: the first
// byte's index, 0 or 2) as a dequantized pair, c * s - z * s.
template <typename T>
__device__ __forceinline__ uint32_t dequant_bytes8(uint32_t word, uint32_t sel,
                                                   typename Pair<T>::type s2,
                                                   typename Pair<T>::type nzs2) {
  using V = typename Pair<T>::type;
  V c;
  if constexpr (std::is_same_v<T, __half>) {
    // (1024 + b0, 1024 + b1): the bytes under 0x64 high bytes, exact (codes < 1024)
    c = __hsub2(as_pair<V>(__byte_perm(word, 0x6464u, sel)), as_pair<V>(Pair<T>::kMagic));
  } else {
    c = __floats2bfloat162_rn(code_float(word, static_cast<int>(sel)),
                              code_float(word, static_cast<int>(sel) + 1));
  }
  return as_bits(__hfma2(c, s2, nzs2));
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Where step i of a consumer's loop is in the ring of STAGES: its stage, that
// stage's fill parity and the stage of step i - 1. Derived from i (a division
// per step), or (CARRIED) carried from step to step, which advance() moves on.
template <int STAGES, bool CARRIED>
struct RingPos {
  __device__ int stage(int i) const { return i % STAGES; }
  __device__ uint32_t parity(int i) const { return (i / STAGES) & 1; }
  __device__ int prev(int i) const { return (i - 1) % STAGES; }
  __device__ void advance() {}
};
template <int STAGES>
struct RingPos<STAGES, true> {
  int s = 0, p = STAGES - 1;
  uint32_t par = 0;
  __device__ int stage(int) const { return s; }
  __device__ uint32_t parity(int) const { return par; }
  __device__ int prev(int) const { return p; }
  __device__ void advance() {
    p = s;
    if (++s == STAGES) s = 0, par ^= 1;
  }
};

// Registers per thread of the copy warpgroup and of the consumers (setmaxnreg)
// with BLOCKS blocks per SM: 2 blocks share the register file, 64K registers.
// PERM: the copy warpgroup's permuting warps hold 16 words of x and their
// addresses, the consumers 12 words of codes fewer.
template <int BLOCKS, bool PERM = false>
struct Regs {
  static constexpr int kCopy = PERM ? (BLOCKS == 1 ? 56 : 48) : BLOCKS == 1 ? 40 : 24;
  static constexpr int kConsumer = PERM ? (BLOCKS == 1 ? 224 : 96) : BLOCKS == 1 ? 232 : 104;
  static_assert(BLOCKS * (128 * kCopy + kConsumers * kConsumer) <= 65536, "register file");
  // setmaxnreg only moves registers within what the block got at launch, at
  // most the register file's share per thread in multiples of 8 (ptxas gives
  // these kernels all of it: 80 registers with two blocks, 168 with one). A
  // count past that leaves setmaxnreg.inc waiting for ever: consumers at 112
  // with two blocks hung the kernel.
  static constexpr int kLaunch = 65536 / (BLOCKS * kThreads) / 8 * 8;
  static_assert(128 * kCopy + kConsumers * kConsumer <= kThreads * kLaunch, "launch pool");
};

// x-row tiles per group of Schedule (measured within 3% of 4 and 16 at M = 4096).
constexpr int kGroupM = 8;

// Which tile and which K steps each block takes. K is split in one of two
// ways. Every tile over blockIdx.y (gridDim.y splits of split_steps steps),
// float32 partial sums in a workspace [gridDim.y][M][N] that
// tile::finish_split adds up. Or (the kernel's TAIL) only the tiles of a last
// wave: blocks [0, full) take tiles [0, full) whole, and each of the remaining
// (tail) tiles is split over tail_splits blocks of tail_steps steps (block
// full + u: tile full + u % tail, split u / tail), partial sums tile by tile,
// [tail_splits][tail][bm][kRowsW], for finish_tail_sm90. With tail_splits = 0
// the grid has only the `full` tiles (a launch of narrower tiles takes the
// rest). n_first: the first weight tile (of weight_tiles(N)) tile 0 covers.
struct Schedule {
  int m_tiles, n_tiles, group_m;  // x-row tiles, weight tiles, x-row tiles per group
  int full, tail_splits;
  int split_steps, tail_steps;  // steps of a blockIdx.y split, of a tail split (even)
  int n_first;
  __host__ __device__ int tiles() const { return m_tiles * n_tiles; }
  __host__ __device__ int tail() const { return tiles() - full; }
  __host__ __device__ int blocks() const { return full + tail() * tail_splits; }
  // Block b's tile, and its split (-1: the whole tile).
  __device__ int tile_of(int b) const { return b < full ? b : full + (b - full) % tail(); }
  __device__ int split_of(int b) const { return b < full ? -1 : (b - full) / tail(); }
  // Tiles in groups of up to group_m x-row tiles, m fastest within a group:
  // the blocks running at once share a few x tiles and many weight tiles, so
  // both come from DRAM about once per group.
  template <typename I>  // int, or unsigned for blockIdx.x
  __device__ void origin(I tile, int bm, int& m0, int& n0) const {
    const int per_group = group_m * n_tiles, first_m = (tile / per_group) * group_m;
    const int in_group = tile % per_group, gm = min(m_tiles - first_m, group_m);
    m0 = (first_m + in_group % gm) * bm;
    n0 = (n_first + in_group / gm) * kRowsW;
  }
};

// y for the tail tiles: the sum of their splits' partials, + bias. Grid:
// (tail tiles, slices of a tile).
template <typename T>
__global__ void finish_tail_sm90(const float* __restrict__ ws, const T* __restrict__ bias,
                                 T* __restrict__ y, int M, int N, int bm, Schedule sched) {
  const int ti = blockIdx.x, tail = sched.tail(), tile_elems = bm * kRowsW;
  int m0 = 0, n0 = 0;
  sched.origin(sched.full + ti, bm, m0, n0);
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < tile_elems; i += gridDim.y * blockDim.x) {
    const int m = m0 + i / kRowsW, n = n0 + i % kRowsW;
    if (m >= M || n >= N) continue;
    float v = 0.f;
    for (int sp = 0; sp < sched.tail_splits; ++sp)
      v += ws[(static_cast<size_t>(sp) * tail + ti) * tile_elems + i];
    if (bias != nullptr) v += static_cast<float>(bias[n]);
    y[static_cast<size_t>(m) * N + n] = static_cast<T>(v);
  }
}

// f(integral_constant<int, s>) for each s of the sequence, in order.
template <int... S, typename F>
__device__ __forceinline__ void for_each(std::integer_sequence<int, S...>, F&& f) {
  (f(std::integral_constant<int, S>{}), ...);
}

// FINE: groups of 32 or 64 (else whole pairs of steps): the scales and zeros
// of a pair of steps come in one 64- or 32-bit load per row (see the consumers).
// TAIL: the tiles of the last wave are split (Schedule). A kernel of its own:
// with the tail's arithmetic in every kernel, grids that split nothing ran
// 2-5% slower (M = 256..1024), the compiler having laid out their code anew.
// One block per tile, not persistent: blocks that each walked a share of the
// tiles, the ring running on from one tile into the next and y stored from
// the accumulators (no barrier), measured slower on every multi-wave grid of
// the benchmark shapes (H100, w4 g128, us): (4096, 4096) M = 2048 99.9 ->
// 112.1, M = 4096 214.8 -> 229.0; (4096, 14336) M = 1024 183.6 -> 207.6;
// (28672, 8192) M = 2048 1421 -> 1552.
template <int W, typename T, int BM, int STAGES, int D, int BLOCKS, bool FINE, bool TAIL,
          bool PERM, bool SK = false>
__global__ void __launch_bounds__(kThreads, BLOCKS)
    gemm_sm90_kernel(const __grid_constant__ CUtensorMap x_map,
                 const __grid_constant__ CUtensorMap w_map,
                 const T* __restrict__ scales, const T* __restrict__ zeros,
                 const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ ws,
                 int M, int N, int K, tile::Groups groups, Schedule sched) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using V = typename Pair<T>::type;
  static_assert(W == 2 || W == 4 || W == 8, "2-, 4- or 8-bit codes");
  static_assert(!PERM || W == 4, "x permuted for the 4-bit codes' order");
  using L = Layout<BM, STAGES, W>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t smem = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023) & ~1023u;
  // Two mbarriers per stage after the tiles: full ("x and codes of this
  // stage landed") and empty ("every consumer warp is done with it").
  const uint32_t full = smem + STAGES * L::kStage, empty = full + 8 * STAGES;
  // PERM: a third, "ready" ("x of this stage permuted"), which the copy
  // warpgroup's other three warps complete, and the consumers wait on.
  const uint32_t ready = empty + 8 * STAGES;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, c = lane % 4;
  // This block's tile and its steps [k_first, k_first + n_steps), an even
  // number (Schedule). The epilogue asks again which tile and split, rather
  // than keep them in registers through the loop.
  int m0 = 0, n0 = 0, k_first = 0, n_steps = 0;
  // SK (stream-K, 16-row tiles that leave part of one wave idle):
  // the (tile, pass) items, a pass being D units of two steps, are dealt out
  // evenly over the grid, block b taking passes [pb0, pb1) across tile
  // boundaries; the ring runs on from one tile into the next. A tile's parts
  // (at most three: the host keeps shares over half a tile) go to workspace
  // slot (block - first block of the tile); the first part writes zeros to
  // the slots no block takes. tile::finish_split adds the three up.
  static_assert(!SK || (!TAIL && BM == 16), "stream-K: 16-row tiles, no tail");
  constexpr int U = 2;  // steps per unit (one set of scales and zeros)
  constexpr int kPassSteps = D * U;
  const int passes_t = K / kStepK / kPassSteps;  // per tile (SK)
  // (1 without SK, where only the SK code, compiled but never run, divides by it)
  const long sk_items = SK ? static_cast<long>(sched.tiles()) * passes_t : 1;
  const int pb0 = SK ? static_cast<int>(sk_items * blockIdx.x / gridDim.x) : 0;
  const int pb1 = SK ? static_cast<int>(sk_items * (blockIdx.x + 1) / gridDim.x) : 0;
  // The block whose share holds pass i.
  const auto block_of = [&](long i) {
    return static_cast<int>(((i + 1) * gridDim.x - 1) / sk_items);
  };
  // Segment [p, end of p's tile or of the share): its tile's origin, first
  // step and steps.
  const auto segment = [&](int p, int& pe) {
    const int t = p / passes_t;
    pe = min(pb1, (t + 1) * passes_t);
    sched.origin(t, BM, m0, n0);
    k_first = (p - t * passes_t) * kPassSteps;
    n_steps = (pe - p) * kPassSteps;
  };
  if constexpr (SK) {
    // (set per segment)
  } else if constexpr (TAIL) {
    const bool split = static_cast<int>(blockIdx.x) >= sched.full;
    sched.origin(split ? sched.tile_of(blockIdx.x) : static_cast<int>(blockIdx.x), BM, m0, n0);
    k_first = split ? sched.split_of(blockIdx.x) * sched.tail_steps : 0;
    n_steps = split ? min(K / kStepK - k_first, sched.tail_steps) : K / kStepK;
  } else {
    sched.origin(blockIdx.x, BM, m0, n0);
    k_first = blockIdx.y * sched.split_steps;
    n_steps = min(K / kStepK - k_first, sched.split_steps);
  }
  const int G = K / groups.size;

  // Issued by one thread: rows past M or N arrive as zeros. (Also bringing
  // each step's codes 8, 16 or 32 steps ahead into L2 with
  // cp.async.bulk.prefetch.tensor was much slower, H200 float16 w4 g128
  // (8192, 28672), none / 8 / 16 / 32 steps ahead (us): M = 16 64.5 / 96.4 /
  // 95.1 / 91.2, bfloat16 67.4 / 96.0 / 95.1 / 92.0, M = 64 84.3 / 107.5 /
  // 108.2 / 107.5, M = 256 195.6 / 199.2 / 198.4 / 199.3. So was one box of
  // each row's next 512 bytes or 1 KB, once per as many bytes, none / 512 /
  // 1 KB: M = 16 64.4 / 75.3 / 76.4, M = 64 85.2 / 92.3 / 100.8 (us;
  // scripts/results/ab_h200_sm90_ablations_m16_m64). So were stages of two
  // steps, one copy of 64-byte code rows and two x tiles each, 3 / 4 / 6 of
  // them: M = 16 65.3 / 62.7 / 63.6 against 63.1, M = 64 82.1 / 84.4 / 83.9
  // against 83.0, ab_h200_sm90_two_step_stages; and an evict_first policy on
  // the codes' copies, M = 16 64.8, M = 64 85.7, ab_h200_l2_policy.)
  auto load_stage = [&](int i, int kt) {  // i: this block's step index, kt: the tile's step
    const int s = i % STAGES;
    const uint32_t base = smem + s * L::kStage, bar = full + 8 * s;
    mbar_expect_tx(bar, L::kStage);
    tma_load_2d(base, &x_map, kt * kStepK, m0, bar);
    tma_load_2d(base + L::kX, &w_map, kt * kRowWords<W>, n0, bar);
  };
  const int block_steps = SK ? (pb1 - pb0) * kPassSteps : n_steps;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, kConsumers / 32);
      if constexpr (PERM) mbar_init(ready + 8 * s, 3);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  // Launched to overlap the kernel before (programmatic dependent launch,
  // launch()), the block has come this far while that one ends. Every read
  // waits for it, the weights' too (the kernel before may have written
  // them: a checkpoint loaded, an optimizer's step), and so does every
  // write (y may take memory it still reads).
  tile::wait_prerequisites();

  // The copy warpgroup's first thread runs the whole ring ahead of the
  // consumers, refilling a stage as soon as all eight consumer warps released
  // it; the warpgroup's registers move to the consumers (setmaxnreg).
  if (tid >= kConsumers) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Regs<BLOCKS, PERM>::kCopy));
    if (tid == kConsumers) {
      if constexpr (SK) {
        int i = 0;
        for (int p = pb0, pe = 0; p < pb1; p = pe) {
          segment(p, pe);
          for (int j = 0; j < n_steps; ++j, ++i) {
            if (i >= STAGES) mbar_wait(empty + 8 * (i % STAGES), ((i / STAGES) - 1) & 1);
            load_stage(i, k_first + j);
          }
        }
      } else {
        for (int i = 0; i < n_steps; ++i) {
          if (i >= STAGES) mbar_wait(empty + 8 * (i % STAGES), ((i / STAGES) - 1) & 1);
          load_stage(i, k_first + i);
        }
      }
      // The block's last copies are on their way: the kernel after it may
      // start once every block has come here (or ended). Not earlier: in a
      // grid of several waves its waiting blocks would hold SMs that this
      // grid's later blocks need.
      tile::launch_dependents();
    } else if (PERM && tid >= kConsumers + 32) {
      // The other three warps permute each landed stage's x in place, two
      // tasks (halves) per row, then hand it to the consumers: their stores
      // are generic-proxy writes that the tensor cores read through the async
      // proxy, hence the proxy fence before the arrive.
      const int pt = tid - kConsumers - 32;
      for (int i = 0; i < block_steps; ++i) {
        const int s = i % STAGES;
        mbar_wait(full + 8 * s, (i / STAGES) & 1);
        const uint32_t xs = smem + s * L::kStage;
        for (int task = pt; task < 2 * BM; task += 96)
          permute_half_row(xs + (task >> 1) * 128, task >> 1, task & 1);
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncwarp();
        if (lane == 0) mbar_arrive(ready + 8 * s);
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Regs<BLOCKS, PERM>::kConsumer));

    // Tiles of up to 64 rows of x, whose steps are short enough that their
    // bookkeeping shows in the time, keep it in fewer instructions (the ring
    // position carried, descriptors by addition, 32-bit offsets of scales):
    // 136 -> 122 instructions per step and warp at 16 rows. H200, w4 g128,
    // medians of three alternating runs (us): M = 32 at (28672, 8192) 70.8 ->
    // 67.5, (4096, 14336) 25.1 -> 23.7, (5120, 13824) 28.8 -> 27.6; M = 24 at
    // (8192, 28672) 70.4 -> 68.4; M = 16 66.0 -> 65.3; M = 64 at (28672, 8192)
    // 82.6 -> 80.6. The 128- and 256-row tiles measured slower so (M = 256 at
    // (8192, 28672) 189.7 -> 198.6, M = 1024 at (4096, 14336) 187.0 -> 191.6)
    // and keep the plain forms.
    constexpr bool kNarrow = BM <= 64;
    // This lane's two weight rows (g and g + 8 of its warp's 16).
    const int row0 = (warp / 4) * 64 + (warp % 4) * 16 + g;
    if constexpr (SK) {
      int pe = 0;
      segment(pb0, pe);  // the first segment's origin (pb0 < pb1: the host's shares)
    }
    const int n_a = min(n0 + row0, N - 1), n_b = min(n0 + row0 + 8, N - 1);
    constexpr bool kHalf = std::is_same_v<T, __half>;
    const uint32_t sel = kHalf ? 0x1111u * c : c | ((4u + c) << 8);
    // (1, 1/16) as halves for dequant_byte, made from M (>= 0, so its top bit
    // adds nothing) so that the compiler keeps it in a register instead of
    // rematerializing it every step.
    const uint32_t unshift = 0x2C003C00u + (static_cast<uint32_t>(M) >> 31);
    // The codes' rows in the stage: 32 bytes, 32-byte swizzle (16-byte chunk
    // c ^ (row >> 2 & 1)); 8-bit: 64 bytes, 64-byte swizzle (c ^ (row >> 1 &
    // 3)); 2-bit: 16 bytes, no swizzle (8 rows' 16-byte reads fill 32 banks).
    const uint32_t w_off = L::kX + row0 * kRowBytes<W>;
    const uint32_t w_swz = W == 4 ? ((row0 >> 2) & 1) << 4 : W == 8 ? ((row0 >> 1) & 3) << 4 : 0;
    // 8-bit: which half of a word this lane's pairs are (dequant_bytes8)
    const uint32_t sel8 = kHalf ? 0x4140u + 0x0202u * (c & 1) : 2u * (c & 1);
    // 2-bit: this lane's pairs are nibble c & 1 of bytes c / 2 (codes 2c, 2c+1)
    // and 2 + c / 2 (2c+8, 2c+9) of a slice's word (dequant_crumbs).
    const int n4 = 4 * (c & 1);
    const uint32_t mask2 = (3u << n4) | (3u << (16 + n4 + (kHalf ? 2 : 0)));
    const uint32_t unshift2 =
        kHalf ? as_bits(__floats2half2_rn(1.f / float(1 << n4), 1.f / float(4 << n4)))
              : as_bits(__floats2bfloat162_rn(1.f / float(1 << n4), 1.f / float(1 << n4)));
    const uint32_t bias2 =
        kHalf ? as_bits(__floats2half2_rn(-1024.f / float(1 << n4), -1024.f / float(4 << n4)))
              : as_bits(__floats2bfloat162_rn(-128.f / float(1 << n4), -128.f / float(1 << n4)));
    uint32_t sel2[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t b = 2 * h + (c >> 1);
      sel2[h] = kHalf ? 0x1111u * b : b | ((4u + b) << 8);
    }

    // Scale and zero of each row for a unit of two steps, read D units ahead
    // into a ring of D slots: they come from memory, not through the stage
    // ring, and the shorter a step's math (64-row tiles), the less of a
    // load's latency one step covers. The slots hold the loaded values; they
    // become pairs where a step uses them, so that nothing waits on a load
    // before then. Groups that are whole step pairs: one value per unit.
    // FINE: the unit's values in one load, packed: groups of 32, one per
    // 32-wide half of a step (4, 64 bits); of 64, one per step (2, 32 bits).
    // One value per step or half step, each from its own load, through a
    // ring of D steps rather than D pairs, took up to 60% longer: H200, w4,
    // medians of three alternating rounds (us), (8192, 28672) M = 16 g64
    // 104.2 -> 69.0, g32 105.6 -> 69.2 (g128: 68.0), M = 64 g64 126.7 -> 89.9,
    // M = 512 g64 432.0 -> 378.4; (28672, 8192) M = 32 g32 112.3 -> 73.1;
    // (4096, 14336) M = 1024 g32 218.5 -> 188.7.
    const T* s_a = scales + static_cast<size_t>(n_a) * G;
    const T* z_a = zeros + static_cast<size_t>(n_a) * G;
    const T* s_b = scales + static_cast<size_t>(n_b) * G;
    const T* z_b = zeros + static_cast<size_t>(n_b) * G;
    // Narrow tiles: rows a and b of scales and zeros start at these offsets
    // (32-bit: sm90_supported), two registers through the loop, where the
    // compiler otherwise redoes the 64-bit offsets above at every load.
    // (SK: again for each segment's tile)
    const auto row_offset = [&](int r) {
      return static_cast<uint32_t>(min(n0 + row0 + r, N - 1)) * G;
    };
    uint32_t off_a = row_offset(0), off_b = row_offset(8);
    using Slot = std::conditional_t<FINE, uint2, T>;
    Slot sz[D][2][2];  // [slot][row a/b][scale/zero]
    if constexpr (FINE) {  // (y stays unread for groups of 64, yet defined)
#pragma unroll
      for (int d = 0; d < D; ++d)
#pragma unroll
        for (int r = 0; r < 2; ++r) sz[d][r][0] = sz[d][r][1] = make_uint2(0, 0);
    }
    // The unit's first group (k_first is even: whole units, so FINE's loads
    // are aligned: sm90_supported).
    const bool g32 = groups.size == 32;
    auto load_params = [&](int unit, Slot (&p)[2][2]) {
      const int gi = groups.index((k_first + unit * U) * kStepK);
      const T* src[2][2];
      if constexpr (kNarrow) {
        src[0][0] = scales + (off_a + gi), src[0][1] = zeros + (off_a + gi);
        src[1][0] = scales + (off_b + gi), src[1][1] = zeros + (off_b + gi);
      } else {
        src[0][0] = s_a + gi, src[0][1] = z_a + gi, src[1][0] = s_b + gi, src[1][1] = z_b + gi;
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          if constexpr (!FINE) {
            p[r][q] = __ldg(src[r][q]);
          } else if (g32) {
            p[r][q] = __ldg(reinterpret_cast<const uint2*>(src[r][q]));
          } else {
            p[r][q].x = __ldg(reinterpret_cast<const unsigned int*>(src[r][q]));
          }
        }
      }
    };
    // FINE: the PRMT selector that spreads the value of half h of step b of a
    // unit (b, h: 0 or 1) over both halves of a pair: the value is half
    // 2 b + h of the slot's (x, y) for groups of 32, half b of x for 64.
    const uint32_t sel_step = g32 ? 0x4444u : 0x2222u, sel_half = g32 ? 0x2222u : 0u;
    auto pair_of = [&](const Slot& v, int b, int h) -> V {
      if constexpr (FINE) {
        return as_pair<V>(__byte_perm(v.x, v.y, 0x1010u + b * sel_step + h * sel_half));
      } else {
        return V{v, v};
      }
    };
    int n_units = n_steps / U;
    int ig0 = 0;  // SK: the block's steps before this segment's

    // One set of accumulators for all four wgmmas of a step: a second set
    // for the odd k16 slices, added at the end (so that consecutive wgmmas
    // do not depend on each other), measured the same. H200, float16 w4
    // g128, medians of three alternating rounds (us): (8192, 28672) M = 16
    // 63.2 -> 63.9, M = 32 69.6 -> 69.9, bfloat16 M = 16 67.2 -> 66.8;
    // (4096, 14336) M = 16 23.8 -> 23.2. Nor did starting the second warpgroup
    // half a step after the first (a named barrier before its first step), so
    // that one decodes while the other's wgmmas run: (8192, 28672) M = 64
    // 83.2 -> 84.5, M = 16 64.4 -> 66.2; (28672, 8192) M = 64 79.1 -> 81.2
    // (scripts/results/ab_h200_sm90_ablations_m16_m64).
    float acc[BM / 2];
#pragma unroll
    for (int i = 0; i < BM / 2; ++i) acc[i] = 0.f;
    uint32_t frag[2][4][4];  // [buffer][k16 slice][A register]

    RingPos<STAGES, kNarrow> pos;
    // Narrow tiles: the B descriptors of stage 0; a stage's are kStage / 16
    // further on, and k16 slice j's 2 j (32 bytes) (desc_k_major_sw128 of
    // addresses under 256 KB).
    const uint32_t desc0 = desc_lo_k_major_sw128(smem);
    // One step: x and codes of step i in its buffer; the A fragments go to
    // frag[B] (B alternates so that the slices still read by the previous
    // step's wgmmas are not overwritten); scales and zeros from slot S, which
    // the unit's last step refills.
    auto step = [&](int i, auto buf, auto slot, auto last) {
      constexpr int B = decltype(buf)::value, S = decltype(slot)::value;
      const int stage = pos.stage(i);
      mbar_wait((PERM ? ready : full) + 8 * stage, pos.parity(i));

      const uint32_t base = smem + stage * L::kStage;
      const uint32_t desc = desc0 + stage * (L::kStage >> 4);
      if constexpr (PERM) {
        // Words c and c + 4 of each of the lane's rows: slices 0, 1 take the
        // codes of word c (k 8c .. 8c + 7), slices 2, 3 of word c + 4; within
        // a word, nibbles (0, 4) and (1, 5), then (2, 6) and (3, 7) from the
        // word >> 8 (the order in which the copy warps permuted x).
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const uint32_t w =
                tile::lds32(base + w_off + r * 8 * kRowBytes<W> + (((u << 4) ^ w_swz) | (c << 2)));
#pragma unroll
            for (int odd = 0; odd < 2; ++odd) {
              const int j = 2 * u + odd;
              const uint32_t src = odd ? w >> 8 : w;
              const V s2 = pair_of(sz[S][r][0], B, u);
              const V nzs2 = neg_zero_scale(s2, pair_of(sz[S][r][1], B, u));
              frag[B][j][r] = dequant_nibbles<T, false>(src, s2, nzs2);
              frag[B][j][2 + r] = dequant_nibbles<T, true>(src, s2, nzs2);
            }
          }
        }
      } else if constexpr (W == 2) {
        // Word j of a row's 16 bytes is slice j: one 16-byte load per row.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint4 v = tile::lds128(base + w_off + r * 8 * kRowBytes<W>);
          const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const V s2 = pair_of(sz[S][r][0], B, j / 2);
            const V nzs2 = neg_zero_scale(s2, pair_of(sz[S][r][1], B, j / 2));
            const uint32_t shifted = kHalf ? 0u : words[j] >> 2;
#pragma unroll
            for (int h = 0; h < 2; ++h)
              frag[B][j][2 * h + r] = dequant_crumbs<T>(words[j], shifted, sel2[h], mask2,
                                                        unshift2, bias2, s2, nzs2);
          }
        }
      } else if constexpr (W == 8) {
        // Slice j is 16-byte chunk j of a row: lane c takes words c / 2 and
        // 2 + c / 2 of it (one 4-byte load each, the lanes of a warp on 16
        // distinct banks under the swizzle).
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const V s2 = pair_of(sz[S][r][0], B, j / 2);
            const V nzs2 = neg_zero_scale(s2, pair_of(sz[S][r][1], B, j / 2));
            const uint32_t at = base + w_off + r * 8 * kRowBytes<W> + ((j << 4) ^ w_swz);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint32_t w = tile::lds32(at + ((2 * h + (c >> 1)) << 2));
              frag[B][j][2 * h + r] = dequant_bytes8<T>(w, sel8, s2, nzs2);
            }
          }
        }
      } else {
        uint32_t words[2][8];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
          for (int ch = 0; ch < 2; ++ch) {
            const uint4 v = tile::lds128(base + w_off + r * 8 * kRowBytes<W> + ((ch << 4) ^ w_swz));
            words[r][ch * 4 + 0] = v.x;
            words[r][ch * 4 + 1] = v.y;
            words[r][ch * 4 + 2] = v.z;
            words[r][ch * 4 + 3] = v.w;
          }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const V s2 = pair_of(sz[S][r][0], B, j / 2);  // slices 2, 3: the second half
            const V nzs2 = neg_zero_scale(s2, pair_of(sz[S][r][1], B, j / 2));
            frag[B][j][r] = dequant_byte<T>(words[r][2 * j], sel, unshift, s2, nzs2);
            frag[B][j][2 + r] = dequant_byte<T>(words[r][2 * j + 1], sel, unshift, s2, nzs2);
          }
        }
      }
      if constexpr (decltype(last)::value) {
        const int unit = i / U;
        if (unit + D < n_units) load_params(unit + D, sz[S]);
      }

      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j)
        wgmma_m64<T, BM>(acc, frag[B][j],
                         kNarrow ? desc_k_major_sw128_of(desc + 2 * j)
                                 : desc_k_major_sw128(base + 32 * j));
      wgmma_commit();
      // (Measured and not taken: step i + 1's codes read a step early, so that
      // their shared-memory loads overlap this step's decode, once its wgmmas
      // are issued (about 136 instructions per step against 125, SASS of the
      // 16-row stream-K kernel) or before its decode, its stage waited for a
      // step earlier (158). H200, float16 g128, medians of two alternating
      // rounds, landed / after the wgmmas / before the decode (us): (8192,
      // 28672) M = 16 63.5 / 68.3 / 74.7, M = 32 69.3 / 73.3 / 81.8, M = 64
      // (the second for up to 32 rows only) 86.7 / 89.9 / -; (28672, 8192)
      // M = 16 64.3 / 67.4 / 74.3; (4096, 14336) 23.9 / 24.3 / 26.8; bfloat16
      // (8192, 28672) M = 16 67.5 / 70.5 / 74.4. The consumers' instructions,
      // not the latency of the loads, set the pace.)
      wgmma_wait<1>();
      // This warp's wgmmas of step i - 1 are done (and its reads of the codes
      // long before): release that stage.
      __syncwarp();
      if ((SK ? ig0 + i : i) > 0 && lane == 0) mbar_arrive(empty + 8 * pos.prev(i));
      pos.advance();
    };

    auto run_steps = [&] {
#pragma unroll
      for (int d = 0; d < D; ++d)
        if (d < n_units) load_params(d, sz[d]);
      // D units per pass, one per slot, in pairs of steps (n_steps is even):
      // only the pairs past the first need a bound check.
      constexpr int kPass = D * U;
      static_assert(kPass % 2 == 0, "steps go in pairs (two fragment buffers)");
      for (int i = 0; i < n_steps; i += kPass) {
        for_each(std::make_integer_sequence<int, kPass / 2>{}, [&](auto p) {
          if (p == 0 || i + 2 * p < n_steps) {
            for_each(std::integer_sequence<int, 2 * p, 2 * p + 1>{}, [&](auto s) {
              step(i + s, std::integral_constant<int, s % 2>{},
                   std::integral_constant<int, s / U>{}, std::bool_constant<s % U == U - 1>{});
            });
          }
        });
      }
    };
    if constexpr (!SK) run_steps();
    wgmma_wait<0>();

    // acc[4i + 2h + e]: weight row g + 8h of this warp's 16, x row 8i + 2c + e.
    //
    // y through shared memory, so that it leaves in 16-byte stores along its
    // rows: a thread holds two weight rows (y's columns) of 2 * BM / 8 x rows,
    // i.e. 2-byte pieces 2 * N bytes apart. Bias is added before the one
    // rounding. The ring is free once every consumer's wgmmas are done (each
    // waited for its own; the barrier waits for the others).
    auto store_y = [&] {
      asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumers) : "memory");
      // Rows of kRowsW + 8 halves: lanes c write rows 2 apart, 8 banks apart.
      constexpr int kLd = kRowsW + 8;
      static_assert(BM * kLd * sizeof(T) <= STAGES * L::kStage, "y's tile fits the ring");
      T* const staged = reinterpret_cast<T*>(
          smem_raw + (smem - static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw))));
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int nl = row0 + 8 * h;
        const float b = bias != nullptr && n0 + nl < N ? static_cast<float>(bias[n0 + nl]) : 0.f;
#pragma unroll
        for (int i = 0; i < BM / 8; ++i) {
#pragma unroll
          for (int e = 0; e < 2; ++e)
            staged[(8 * i + 2 * c + e) * kLd + nl] = static_cast<T>(acc[4 * i + 2 * h + e] + b);
        }
      }
      asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumers) : "memory");
      const bool whole_chunks = N % 8 == 0;  // 16-byte aligned rows of y
      for (int idx = tid; idx < BM * (kRowsW / 8); idx += kConsumers) {
        const int ml = idx / (kRowsW / 8), n = n0 + 8 * (idx % (kRowsW / 8));
        const int m = m0 + ml;
        if (m >= M || n >= N) continue;
        const T* src = staged + ml * kLd + (n - n0);
        T* dst = y + static_cast<size_t>(m) * N + n;
        if (whole_chunks && n + 8 <= N) {
          *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
          for (int q = 0; q < 8 && n + q < N; ++q) dst[q] = src[q];
        }
      }
    };
    // Partial sums of a K split into a float32 workspace, element (m, n) at
    // part[at(m, n)].
    auto store_partial = [&](float* part, auto at, bool zero = false) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = n0 + row0 + 8 * h;
        if (n >= N) continue;
#pragma unroll
        for (int i = 0; i < BM / 8; ++i) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int m = m0 + 8 * i + 2 * c + e;
            if (m < M) part[at(m, n)] = zero ? 0.f : acc[4 * i + 2 * h + e];
          }
        }
      }
    };
    if constexpr (SK) {
      for (int p = pb0, pe = 0; p < pb1; p = pe) {
        if (p != pb0) {
          segment(p, pe);
          off_a = row_offset(0), off_b = row_offset(8);
          n_units = n_steps / U;
#pragma unroll
          for (int i = 0; i < BM / 2; ++i) acc[i] = 0.f;
        } else {
          pe = min(pb1, (p / passes_t + 1) * passes_t);
        }
        run_steps();
        wgmma_wait<0>();
        const long first = static_cast<long>(p / passes_t) * passes_t;
        const int b_first = block_of(first);
        const int slot = static_cast<int>(blockIdx.x) - b_first;
        const auto at = [&](int m, int n) { return static_cast<size_t>(m) * N + n; };
        store_partial(ws + static_cast<size_t>(slot) * M * N, at);
        if (slot == 0) {
          for (int z = block_of(first + passes_t - 1) - b_first + 1; z < 3; ++z)
            store_partial(ws + static_cast<size_t>(z) * M * N, at, true);
        }
        ig0 += n_steps;
      }
    } else if constexpr (TAIL) {
      // Blocks past `full` split a last-wave tile: their partial sums go to
      // the tile's part of the workspace, [tail_splits][tail][BM][kRowsW]
      // (Schedule); the whole tiles store y as the kernels without a tail do.
      if (static_cast<int>(blockIdx.x) < sched.full) {
        store_y();
      } else {
        store_partial(ws + (static_cast<size_t>(sched.split_of(blockIdx.x)) * sched.tail() +
                            sched.tile_of(blockIdx.x) - sched.full) * (BM * kRowsW),
                      [&](int m, int n) { return (m - m0) * kRowsW + (n - n0); });
      }
    } else if (ws == nullptr) {
      store_y();
    } else {
      // Split over blockIdx.y: partial sums in the workspace as [gridDim.y][M][N].
      store_partial(ws + static_cast<size_t>(blockIdx.y) * M * N,
                    [&](int m, int n) { return static_cast<size_t>(m) * N + n; });
    }
  }  // consumers
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

}  // namespace mpq::cuda::sm90
