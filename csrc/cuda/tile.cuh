// Pieces shared by the fused kernels (gemv.cuh, gemm.cuh): streaming loads,
// the m16n8k16 tensor-core MMA, and split-K over a float32 workspace.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "decode.cuh"
#include "load_stream.cuh"

namespace mpq::cuda::tile {

template <typename T>
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack_pair(T lo, T hi) {
  typename Pair<T>::type v;
  v.x = lo;
  v.y = hi;
  return as_bits(v);
}

// 16 bytes of shared memory. Volatile: the loads stay where they are written
// relative to the barriers and the copies' waits (the kernels that use it
// read a stage only after both).
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}
// 4 bytes of shared memory, likewise.
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}

// v, through a move the compiler cannot see into: a value so passed stays in
// its register, where the compiler otherwise recomputes it from the thread
// index wherever it is used (the per-step loads' offsets: 20 instructions per
// step).
__device__ __forceinline__ uint32_t opaque(uint32_t v) {
  uint32_t r;
  asm("mov.b32 %0, %1;" : "=r"(r) : "r"(v));
  return r;
}

// Division by the group size with a multiply-high, an add and a shift
// (Granlund-Montgomery, exact for 0 <= n < 2^31): the group index of a step
// is needed on every step, and an integer division costs ~25 instructions.
struct Groups {
  int size;
  uint32_t mul;
  int shift;
  static Groups of(int64_t group_size) {
    int l = 0;
    while ((int64_t{1} << l) < group_size) ++l;
    const uint64_t m = ((uint64_t{1} << 32) * ((uint64_t{1} << l) - group_size)) / group_size + 1;
    return {static_cast<int>(group_size), static_cast<uint32_t>(m), l};
  }
  __device__ __forceinline__ int index(int k) const {
    return static_cast<int>((__umulhi(static_cast<uint32_t>(k), mul) + static_cast<uint32_t>(k)) >>
                            shift);
  }
};

// f(T{}) with T the CUDA type of x's dtype (fp16 or bf16): the one dtype
// dispatch of the fused kernels' entry points.
template <typename F>
void by_dtype(const at::Tensor& x, F&& f) {
  if (x.scalar_type() == at::kHalf) {
    f(__half{});
  } else {
    f(__nv_bfloat16{});
  }
}

// The fused kernels' entry points (gemv_w, gemm_w, gemm_sm90_w: x, qweight,
// scales, zeros, bias, y, group_size) are templates over the codes' width,
// each width instantiated in a .cu file of its own (MPQ_FUSED_WIDTH(fn, W)),
// so that the widths build in parallel; the extern declarations
// (MPQ_FUSED_WIDTHS_ELSEWHERE(fn)) keep every other file that includes the
// header from compiling them again.
#define MPQ_FUSED_WIDTH(fn, W)                                                                \
  template void fn<W>(const at::Tensor&, const at::Tensor&, const at::Tensor&,               \
                      const at::Tensor&, const std::optional<at::Tensor>&, at::Tensor&, int64_t)
#define MPQ_FUSED_WIDTHS_ELSEWHERE(fn) \
  extern MPQ_FUSED_WIDTH(fn, 2);       \
  extern MPQ_FUSED_WIDTH(fn, 4);       \
  extern MPQ_FUSED_WIDTH(fn, 8)

// The weight side of a warp's RT tiles of 16 output features, as both fused
// kernels walk it: lane (g, t) owns rows g and g + 8 of each tile and reads a
// 16-byte chunk of each per step of SUPER_K inputs (a quad of lanes covers 64
// contiguous bytes of a row). Rows past N read row 0 and are never stored.
//
// KR = 2 (k-paired, for up to 4 rows of x, one tile; 4- and 8-bit codes): the 16
// rows of the MMA's A operand hold 8 weight rows, each twice, over two
// consecutive k ranges of SUPER_K: A row g is weight row g / 2 (g + 8:
// 4 + g / 2) over k range g % 2, so a step covers 2 * SUPER_K inputs of 8
// rows and each load instruction of the warp reads 128 contiguous bytes of 4
// rows instead of 64 of 8 (streaming reads of 128-byte row spans measured
// ~8% faster than of 64-byte ones). x row m over k range h is the B operand's
// column 2m + h, so lane (g, t) finds x row t's product for its A rows in
// column 2t + g % 2, and the two k ranges of a weight row meet in lanes g and
// g ^ 1 (one shuffle at the end).
// KR = 8 (one row of x): the same over eight k ranges. A row g (g + 8) is
// weight row 0 (1) over range g, a step covers 8 * SUPER_K inputs of 2 rows,
// and each load instruction reads 512 contiguous bytes of one row. Column n is
// x's range n, so A row g's product is column g, which lane (g, g / 2) holds;
// a row's eight ranges are added up across the warp at the end.
//
// OPAQUE: the offsets below are kept in registers, where the compiler
// otherwise rebuilds them from the thread index at every load (for kernels
// with the registers to spare: with 64 rows of x they spilled).
//
// WIDE (2-bit codes with groups a multiple of 64): a lane's 64 codes of a row
// per step lie in one group, so one scale and zero per row and step are loaded
// instead of one per 32-wide half.
template <typename T, int W, int RT, int KR = 1, bool WIDE = false, bool OPAQUE = false>
struct WeightRows {
  using V = typename Pair<T>::type;
  static constexpr int P = 32 / W;            // codes per word
  static constexpr int LANE_K = 4 * P;        // codes per lane per row per step
  static constexpr int SUPER_K = 4 * LANE_K;  // inputs per step
  static constexpr int R = 2 * RT;            // rows of W per lane
  static constexpr int HALVES = W == 2 ? 2 : 1;  // 32-wide halves of a lane's chunk
  static constexpr int GROUPS = W == 2 && !WIDE ? 2 : 1;  // groups a lane's chunk may span
  static constexpr int STEP_K = KR * SUPER_K;  // inputs per step
  static constexpr int ROWS = 16 / KR;         // weight rows per tile
  static_assert(KR == 1 || KR == 2 || KR == 8, "k ranges per row: 1, 2 or 8");
  static_assert(KR == 1 || RT == 1, "k ranges: one tile");
  // Everything a step reads from W's side, so that it can be loaded ahead:
  // the packed words of the lane's rows and their scales and zeros.
  struct Step {
    uint4 w[R];
    T s[R][GROUPS], z[R][GROUPS];
  };

  // 32-bit offsets from the three base pointers, so that an address is one
  // add and one wide multiply-add (fused_supported keeps the tensors under 2^31
  // elements).
  int row[R];
  uint32_t qo[R];  // 16-byte units, this lane's chunk of step 0
  uint32_t so[R];  // first group of the row
  const uint4* qb;
  const T* sb;
  const T* zb;
  int k_lane;  // this lane's first input within a step (t * LANE_K for KR = 1)
  int k_end;   // K (load<true>)
  Groups groups;

  __device__ __forceinline__ WeightRows(const uint32_t* qweight, const T* scales, const T* zeros,
                                        int tile0, int g, int t_, int N, int K, Groups groups_)
      : qb(reinterpret_cast<const uint4*>(qweight)), sb(scales), zb(zeros), k_end(K),
        groups(groups_) {
    const uint32_t chunks = K / (4 * P), n_groups = K / groups_.size;
    // The lane's chunk is t of k range g % KR, i.e. chunk 4 (g % KR) + t of the step.
    const int chunk = 4 * (g % KR) + t_;
    k_lane = static_cast<int>(OPAQUE ? opaque(chunk * LANE_K) : chunk * LANE_K);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      row[r] = KR > 1 ? tile0 + (8 / KR) * r + g / KR : tile0 + (r >> 1) * 16 + (r & 1) * 8 + g;
      const uint32_t safe = row[r] < N ? row[r] : 0;
      qo[r] = OPAQUE ? opaque(safe * chunks + chunk) : safe * chunks + chunk;
      so[r] = OPAQUE ? opaque(safe * n_groups) : safe * n_groups;
    }
  }

  // dq, ds: further offsets of the words and of the scales (rows further on).
  // TAIL (K not a whole number of steps, KR = 1; K a multiple of LANE_K): a
  // lane's chunk past K reads its row's first chunk and group instead, so
  // that every load stays inside the row; its x is zero, and the weights it
  // decodes are those of a group the row has, finite where the row's are.
  template <bool TAIL = false>
  __device__ __forceinline__ void load(int s, Step& st, uint32_t dq = 0, uint32_t ds = 0) const {
    static_assert(!TAIL || KR == 1, "a partial last step: one k range per row");
    constexpr uint32_t step_chunks = STEP_K / LANE_K;
    const bool in = !TAIL || s * STEP_K + k_lane < k_end;
    // (the row's first chunk: qo[r] less the lane's chunk, k_lane / LANE_K)
    const uint32_t q_step =
        in ? step_chunks * s : 0u - static_cast<uint32_t>(k_lane / LANE_K);
#pragma unroll
    for (int r = 0; r < R; ++r) st.w[r] = load_stream(qb + (qo[r] + dq + q_step));
    const int k0 = in ? s * STEP_K + k_lane : 0;
#pragma unroll
    for (int h = 0; h < GROUPS; ++h) {
      const uint32_t grp = groups.index(k0 + 32 * h);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        st.s[r][h] = sb[so[r] + ds + grp];
        st.z[r][h] = zb[so[r] + ds + grp];
      }
    }
  }

  // Word j (0..3) of every row of a loaded step, dequantized: d[r][i] =
  // (c_i, c_{i+P/2}). A lane's 16 bytes hold 32 (w4) or 16 (w8) codes, one
  // group, as groups are multiples of 32 and aligned; 2-bit chunks hold two.
  // FMA: c * s - z * s, one instruction fewer per pair (dequant_word), for
  // all but the widest kernels, where its -z * s per row would spill.
  template <bool FMA = true>
  __device__ __forceinline__ static void dequant(const Step& st, int j, V (&d)[R][P / 2]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int h = (GROUPS == 2 && j >= 2) ? 1 : 0;
      const T sc = st.s[r][h], zc = st.z[r][h];
      const V s2{sc, sc};
      const V zz2 = FMA ? neg_zero_scale(s2, V{zc, zc}) : V{zc, zc};
      dequant_word<T, W, FMA>((&st.w[r].x)[j], s2, zz2, float(zc), float(sc), d[r]);
    }
  }

  // Late scaling, for groups that no step straddles (group_size % SUPER_K
  // == 0): the MMAs take the codes (word j of every row, as pairs like
  // dequant's) into per-step partial sums, and apply() scales them once per
  // step: acc += s * (sum_k x c - z * sum_k x). The sums of x come from one
  // more MMA per two (mma_sums). float16 codes enter as subnormals
  // (c * 2^-24: the word masked, nothing added), 4-bit bfloat16 codes biased
  // by the magic value 128 (late_codes); apply() undoes both with s and z:
  // no packed subtract per pair. H200, g128, medians of three alternating
  // rounds against exact codes (us): M = 1 float16 w4 (8192, 28672) 52.7 ->
  // 49.6, (28672, 8192) 49.9 -> 46.7, w2 g256 42.5 -> 40.1; bfloat16 w4
  // 54.7 -> 50.9, 52.1 -> 48.4; float16 w8 75.1 -> 73.5, M = 16 104.1 -> 99.6
  // (then biased by 1024, which the subnormal codes match within 1% on the
  // large shapes). Error of y unchanged (float16 w4, x offset by 4 or 64:
  // 199-206 ppm against float64; dequantize + cuBLAS 216-222).
  __device__ __forceinline__ static void codes(const Step& st, int j, V (&d)[R][P / 2]) {
#pragma unroll
    for (int r = 0; r < R; ++r) late_codes<T, W>((&st.w[r].x)[j], d[r]);
  }
  // The sums of x per column of B (x row, or row and k range) for apply(),
  // from the B fragments of two MMAs of codes taken as A against B = 1: A
  // rows g and g + 8 are lane g's column, its first (e0, e1: k 2t, 2t + 1)
  // and second (o0, o1: k 2t + 8, 2t + 9) halves, which for paired x are one
  // 16-byte chunk's words in order (no register moves). One MMA per two of
  // codes, where A = 1 against each MMA's own B (x as the codes see it) took
  // one per MMA of codes. H100, medians of three alternating rounds, one per
  // MMA of codes / one per two (us): float16 w4 g128 (8192, 28672) M = 16
  // 65.2 / 64.3, M = 9 63.8 / 63.6, (28672, 8192) M = 16 63.0 / 62.9,
  // (4096, 14336) 24.4 / 24.1; bfloat16 66.0 / 65.3; w8 101.5 / 101.1; M = 1
  // 54.7 / 54.5, M = 4 57.3 / 57.2 (scripts/results/ab_h100_x_sums.log).
  // Not taken, on top of it: float16 x's odd pairs staged times 1/16 so that
  // the 4-bit codes at bit 4 of their bytes enter as masked, without
  // late_codes' packed multiply (64.3 -> 64.2, 63.6 -> 63.1, 57.2 -> 56.9):
  // x below 2^-10 then loses bits as a float16 subnormal. Error against
  // float64 for x scaled by 2^-12 / 2^-14 / 2^-16 (ppm, (8192, 4096) M =
  // 16): 832 / 3254 / 12891 against 207 / 208 / 209 as it is (cuBLAS on
  // the dequantized weights: 292 / 295 / 296).
  __device__ __forceinline__ static void mma_sums(float (&xs)[4], uint32_t e0, uint32_t o0,
                                                  uint32_t e1, uint32_t o1) {
    const uint32_t one = pack_pair<T>(T(1.f), T(1.f));
    const uint32_t a[4] = {e0, o0, e1, o1};
    mma_16816<T>(xs, a, one, one);
  }
  // xsum[nt][c]: the sum of x over column 2t + c (mma's, for_each_output's)
  // of x tile nt, from lane 4 (2t + c), which holds that column's halves in
  // xs[nt][0] (A row g) and xs[nt][2] (A row g + 8).
  template <int N_TILES>
  __device__ __forceinline__ static void sums_of_columns(const float (&xs)[N_TILES][4],
                                                         float (&xsum)[N_TILES][4]) {
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int nt = 0; nt < N_TILES; ++nt) {
      const float v = xs[nt][0] + xs[nt][2];
#pragma unroll
      for (int c = 0; c < 2; ++c) xsum[nt][c] = __shfl_sync(0xffffffffu, v, 4 * (2 * t + c));
    }
  }
  // Rows (g, g + 8) of tile rt are c[0..1] and c[2..3]; x rows 2t and 2t + 1
  // are c[0], c[2] and c[1], c[3], whose sums of x are xsum[0] and xsum[1].
  template <int N_TILES>
  __device__ __forceinline__ static void apply(const Step& st, const float (&part)[N_TILES][RT][4],
                                               const float (&xsum)[N_TILES][4],
                                               float (&acc)[N_TILES][RT][4]) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        using C = LateCodes<T, W>;
        float sc = float(st.s[2 * rt + hr][0]), zc = float(st.z[2 * rt + hr][0]);
        if constexpr (C::kBias != 0.f) zc += C::kBias;
        if constexpr (C::kScale != 1.f) zc *= C::kScale, sc *= 1.f / C::kScale;
#pragma unroll
        for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c)
            acc[nt][rt][2 * hr + c] = fmaf(sc, fmaf(-zc, xsum[nt][c], part[nt][rt][2 * hr + c]),
                                           acc[nt][rt][2 * hr + c]);
      }
    }
  }

  // COLS (gemm_kernel.cuh): lane (g, t)'s sums of x * code over its range t of a
  // step, class c of codes (ColsCodes) in part[c], are column 2t of the MMAs:
  // elements 0 and 2 (rows g, g + 8). xs is the range's sum of x, xb its sum
  // weighted by ColsCodes' bias over each class's factor. The range lies in
  // one group: the lane's scale and zero.
  template <int CLS>
  __device__ __forceinline__ static void apply_cols(const Step& st,
                                                    const float (&part)[CLS][RT][4], int col,
                                                    float xs, float xb, float (&acc)[RT][4]) {
    using C = ColsCodes<T>;
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        // (selected, not indexed by col: an index known only at run time
        // would put both arrays in local memory)
        const auto pick = [&](int c) {
          return col ? part[c][rt][2 * hr + 1] : part[c][rt][2 * hr];
        };
        float v = pick(0);
#pragma unroll
        for (int c = 1; c < CLS; ++c) v = fmaf(pick(c), 1.f / float(1 << C::shift(c)), v);
        if constexpr (C::kBias != 0.f) v -= xb;
        const float sc = float(st.s[2 * rt + hr][0]) * (1.f / C::kUnit);
        const float zc = float(st.z[2 * rt + hr][0]) * C::kUnit;
        acc[rt][2 * hr] = fmaf(sc, fmaf(-zc, xs, v), acc[rt][2 * hr]);
      }
    }
  }

  // The MMAs of pair mi of word j against one x tile: A = rows (g, g+8) of
  // tile rt x pairs 2mi and 2mi+1; B = (b0, b1).
  __device__ __forceinline__ static void mma(float (&acc)[RT][4], const V (&d)[R][P / 2], int mi,
                                             uint32_t b0, uint32_t b1) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      const uint32_t a[4] = {as_bits(d[2 * rt][2 * mi]), as_bits(d[2 * rt + 1][2 * mi]),
                             as_bits(d[2 * rt][2 * mi + 1]), as_bits(d[2 * rt + 1][2 * mi + 1])};
      mma_16816<T>(acc[rt], a, b0, b1);
    }
  }

  // One output (x row m, weight row n), if inside y: into y (+ bias, one
  // rounding) or, with a workspace, into split `split` of it.
  __device__ __forceinline__ static void put(float v, int m, int n, int M, int N, int split,
                                             float* ws, const T* bias, T* y) {
    if (n < N && m < M) {
      if (ws != nullptr) {
        ws[((size_t)split * M + m) * N + n] = v;
      } else {
        if (bias != nullptr) v += float(bias[n]);
        y[(size_t)m * N + n] = T(v);
      }
    }
  }

  // f(v, m, n) for every output of x rows m0 + [0, 8 * N_TILES) this lane
  // holds: c0, c1 are row g, x rows 2t, 2t+1 of a tile; c2, c3 row g + 8.
  // Every (m, n) of the block's rows goes to exactly one lane.
  template <int N_TILES, typename F>
  __device__ __forceinline__ void for_each_output(const float (&acc)[N_TILES][RT][4], int m0,
                                                  F&& f) const {
    if constexpr (KR == 8) {
      // Lane (g, t): A rows g and g + 8 (weight rows row[0], row[1]) over
      // range g, whose product is column g: element g % 2 where t = g / 2.
      const int g = (threadIdx.x >> 2) & 7, t = threadIdx.x & 3;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float c = (g & 1) ? acc[0][0][2 * r + 1] : acc[0][0][2 * r];
        float v = t == g >> 1 ? c : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if ((threadIdx.x & 31) == 0) f(v, m0, row[r]);
      }
    } else if constexpr (KR == 2) {
      // Lane (g, t): x row m0 + t, weight rows row[0] (A row g, c[h]) and
      // row[1] (A row g + 8, c[2 + h]) over k range h = g % 2; lane g ^ 1
      // (lane ^ 4) holds the other range. Every lane shuffles; even g hand on.
      const int h = (threadIdx.x >> 2) & 1, t = threadIdx.x & 3;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float v = h ? acc[0][0][2 * r + 1] : acc[0][0][2 * r];
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        if (h == 0) f(v, m0 + t, row[r]);
      }
    } else {
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
        for (int nt = 0; nt < N_TILES; ++nt) {
#pragma unroll
          for (int i = 0; i < 4; ++i)
            f(acc[nt][rt][i], m0 + nt * 8 + 2 * (k_lane / LANE_K) + (i & 1),
              row[2 * rt + (i >> 1)]);
        }
      }
    }
  }

  // Into y or split `split` of the workspace (put): no atomics, no memset.
  template <int N_TILES>
  __device__ __forceinline__ void store(const float (&acc)[N_TILES][RT][4], int m0, int M, int N,
                                        int split, float* ws, const T* bias, T* y) const {
    for_each_output(acc, m0,
                    [&](float v, int m, int n) { put(v, m, n, M, N, split, ws, bias, y); });
  }
};

// Programmatic dependent launch (Hopper): a kernel launched with
// programmatic stream serialization may start once every block of the kernel
// before it has called launch_dependents (or exited), and waits in
// wait_prerequisites until that kernel has completed and its writes are
// visible; its launch overlaps the end of the one before. Both are no-ops
// where there is no such launch.
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_prerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Whether the current device has compute capability 9.0+ (Hopper and later).
inline bool device_sm90() {
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 9;
}

// A property of the current device (an int), computed the first time each
// device asks for it: a function-local static would keep the first device's
// value for every GPU of the process, whatever their kinds. Devices past
// kDevices compute it on every call.
class PerDevice {
 public:
  PerDevice() {
    for (auto& v : values_) v.store(kUnset, std::memory_order_relaxed);
  }
  template <typename F>
  int get(F&& compute) {
    int device = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    if (device < 0 || device >= kDevices) return compute();
    int v = values_[device].load(std::memory_order_relaxed);
    if (v == kUnset) {  // (two threads may both compute it: the same value)
      v = compute();
      values_[device].store(v, std::memory_order_relaxed);
    }
    return v;
  }

 private:
  static constexpr int kDevices = 64;
  static constexpr int kUnset = std::numeric_limits<int>::min();
  std::array<std::atomic<int>, kDevices> values_;
};

// Whether `kernel`'s code was built for sm_90+ (binary and PTX): code
// JIT-compiled from an older target's PTX lacks what clusters and
// programmatic launches rely on (sum_in_cluster traps there, and
// wait_prerequisites would not wait).
template <typename Kernel>
bool built_for_sm90(Kernel kernel) {
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  return attr.binaryVersion >= 90 && attr.ptxVersion >= 90;
}

// A launch configuration with one or two attributes (cudaLaunchKernelEx,
// cudaOccupancyMaxActiveClusters).
struct LaunchEx {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attr[2];
  LaunchEx(dim3 grid, int threads, int smem, cudaStream_t stream, cudaLaunchAttribute a) {
    config.gridDim = grid;
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    attr[0] = a;
    config.attrs = attr;
    config.numAttrs = 1;
  }
  void add(cudaLaunchAttribute a) { attr[config.numAttrs++] = a; }
};

// In clusters of `cluster` blocks.
inline cudaLaunchAttribute cluster_attr(dim3 cluster) {
  cudaLaunchAttribute a = {};
  a.id = cudaLaunchAttributeClusterDimension;
  a.val.clusterDim.x = cluster.x;
  a.val.clusterDim.y = cluster.y;
  a.val.clusterDim.z = cluster.z;
  return a;
}

// Programmatic stream serialization (launch_dependents, wait_prerequisites).
inline cudaLaunchAttribute programmatic_attr() {
  cudaLaunchAttribute a = {};
  a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  a.val.programmaticStreamSerializationAllowed = 1;
  return a;
}

// y = T(sum of the splits' partial products + bias): the end of a split-K product.
template <typename T>
__global__ void finish_split_kernel(const float* __restrict__ ws, const T* __restrict__ bias,
                                    T* __restrict__ y, int64_t total, int N, int splits) {
  wait_prerequisites();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    float v = 0.f;
    for (int sp = 0; sp < splits; ++sp) v += ws[sp * total + i];
    if (bias != nullptr) v += float(bias[i % N]);
    y[i] = T(v);
  }
}

template <typename T>
void finish_split(const at::Tensor& ws, const T* bias, at::Tensor& y, int splits,
                  cudaStream_t stream) {
  const int64_t total = y.numel();
  // Measured and not taken: four outputs per thread (16-byte loads of the
  // parts, an 8-byte store; branch exp/sum-vec). H100, g128, medians of three
  // alternating rounds, one / four per thread (us): w4 (8192, 28672) M = 1
  // 55.8 / 55.5, M = 16 65.8 / 65.1, (4096, 14336) M = 16 23.9 / 23.5, but
  // (14336, 4096) M = 16 (K split) 22.9 / 23.4, and w2 M = 1, which adds no
  // parts here, 37.1 / 37.5: mixed, within 0.7 us either way. Nor is much
  // left to take: with the sums not launched at all (outputs wrong) the calls
  // took 1.6-2.4 us less, e.g. 53.8 and 63.0 us at (8192, 28672)
  // (scripts/results/ab_h100_sum_tail.log).
  const int blocks = (int)std::min<int64_t>((total + 255) / 256, 4096);
  // On Hopper and later the launch overlaps the end of the kernel before
  // (programmatic dependent launch; launch_dependents, wait_prerequisites).
  // H200, g128, medians of three alternating rounds (us): M = 1 w4 (8192,
  // 28672) in stream-K 44.4 -> 42.9, w2 split in 4 42.9 -> 41.4; M = 3 w4
  // 51.8 -> 50.4.
  // (binaryVersion: the code loaded for this device, where a build holds several)
  static PerDevice built_90_on;
  const bool built_90 = built_90_on.get([] {
    return built_for_sm90(finish_split_kernel<T>) ? 1 : 0;
  }) != 0;
  if (built_90 && device_sm90()) {
    LaunchEx launch(dim3(blocks), 256, 0, stream, programmatic_attr());
    C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, finish_split_kernel<T>,
                                      (const float*)ws.data_ptr<float>(), bias,
                                      reinterpret_cast<T*>(y.data_ptr()), total,
                                      (int)y.size(1), splits));
    return;
  }
  finish_split_kernel<T><<<blocks, 256, 0, stream>>>(ws.data_ptr<float>(), bias,
                                                      reinterpret_cast<T*>(y.data_ptr()), total,
                                                      (int)y.size(1), splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Thread block clusters (Hopper and later): the most blocks of one that
// sum_in_cluster (gemm_kernel.cuh) adds up, the portable cluster size.
constexpr int kMaxCluster = 8;

// Whether `kernel` may be launched in clusters or programmatically (after
// the kernel before it, launch_dependents / wait_prerequisites): a device of
// compute capability 9.0+ running code built for it.
template <typename Kernel>
bool sm90_launchable(Kernel kernel) {
  return device_sm90() && built_for_sm90(kernel);
}

// The A/B switches below: on unless the variable is set to `off`.
inline bool switched_on(const char* var, const char* off) {
  const char* v = std::getenv(var);
  return v == nullptr || std::strcmp(v, off) != 0;
}

// The A/B switches of more than two ways below: the choice the variable
// names (one digit, one of `choices`), else `rule` (unset or any other
// value: the launch's own rule picks).
inline int forced_choice(const char* var, std::initializer_list<int> choices, int rule) {
  const char* v = std::getenv(var);
  if (v == nullptr || v[0] == '\0' || v[1] != '\0') return rule;
  for (const int c : choices)
    if (v[0] == '0' + c) return c;
  return rule;
}

// MPQ_OPS_CUDA_SPLIT_SUM=workspace adds split-K partial sums through the
// float32 workspace even where clusters could (tests of both ways, A/B runs).
inline bool split_sum_in_cluster() {
  return switched_on("MPQ_OPS_CUDA_SPLIT_SUM", "workspace");
}

// MPQ_OPS_CUDA_SMALL_GRID=0 keeps 9 to 128 rows of x against few weight rows
// on the staged kernel's 128-row tiles instead of its small-grid kernel
// (gemm.cuh's small_grid; A/B runs).
inline bool small_grids() {
  return switched_on("MPQ_OPS_CUDA_SMALL_GRID", "0");
}

// MPQ_OPS_CUDA_STREAM_K=0 keeps the 16-row staged kernel on its split grid
// where stream-K would fill the slots it leaves idle (gemm.cuh's
// launch_kernel; A/B runs).
inline bool stream_k() {
  return switched_on("MPQ_OPS_CUDA_STREAM_K", "0");
}

// MPQ_OPS_CUDA_SK_WHOLE=1 deals one row of x past one wave out in shares of
// whole row blocks wherever the row blocks divide evenly into a grid within
// the slots, =0 never; unset (-1), the rule in gemm.cuh's launch_kernel
// picks (tests of all three, A/B runs).
inline int sk_whole_row_blocks() { return forced_choice("MPQ_OPS_CUDA_SK_WHOLE", {0, 1}, -1); }

// MPQ_OPS_CUDA_W2_RANGES=2 takes one row of x against 2-bit codes in
// k-paired rows wherever K allows, =1 one k range per row; unset (0), the
// rule in gemm.cuh's launch_kernel picks (tests of all three, A/B runs).
inline int two_bit_ranges() { return forced_choice("MPQ_OPS_CUDA_W2_RANGES", {1, 2}, 0); }

// MPQ_OPS_CUDA_RING_SYNC=barrier keeps a block barrier per staged step in the
// 16-row kernel's stream-K ring instead of its mbarriers (gemm_kernel.cuh's MB;
// tests of both, A/B runs).
inline bool ring_mbarriers() {
  return switched_on("MPQ_OPS_CUDA_RING_SYNC", "barrier");
}

// Whether all of `grid` runs at once in clusters of `cluster` blocks: a
// cluster starts only where one GPC has room for all its blocks, so clusters
// may fit fewer blocks than the plain occupancy does. Cached per kernel,
// shared memory and cluster shape.
template <typename... Params>
bool clusters_fit_one_wave(void (*kernel)(Params...), dim3 grid, int threads, int smem,
                           dim3 cluster) {
  static std::mutex mutex;
  // (kernel, device, shared memory, cluster size) -> clusters resident at once
  static std::map<std::tuple<const void*, int, int, int>, int> max_clusters;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const int size = static_cast<int>(cluster.x * cluster.y * cluster.z);
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, smem, size);
  int fit = -1;
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = max_clusters.find(key);
    if (it != max_clusters.end()) fit = it->second;
  }
  if (fit < 0) {
    LaunchEx launch(cluster, threads, smem, nullptr, cluster_attr(cluster));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&fit, kernel, &launch.config));
    std::lock_guard<std::mutex> lock(mutex);
    max_clusters[key] = fit;
  }
  return static_cast<long>(fit) * size >= static_cast<long>(grid.x) * grid.y * grid.z;
}

// MPQ_OPS_CUDA_PDL=0 launches the fused kernels in plain stream order, not
// overlapping the kernel before (A/B runs; tools that serialize launches).
inline bool programmatic_launches() {
  return switched_on("MPQ_OPS_CUDA_PDL", "0");
}

// kernel<<<grid, threads, smem, stream>>>(args...), in clusters of `cluster`
// blocks unless that is a single block; with `programmatic` (sm_90+ code on
// such a device) in programmatic stream serialization, so that it may start
// while the kernel before it ends: it must call wait_prerequisites before
// reading anything that kernel may write and before writing anything.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, int threads, int smem, cudaStream_t stream,
            dim3 cluster, bool programmatic, Args&&... args) {
  const bool clustered = cluster.x * cluster.y * cluster.z > 1;
  if (!clustered && !programmatic) {
    kernel<<<grid, threads, smem, stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  LaunchEx launch(grid, threads, smem, stream,
                  clustered ? cluster_attr(cluster) : programmatic_attr());
  if (clustered && programmatic) launch.add(programmatic_attr());
  C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, kernel, std::forward<Args>(args)...));
}

inline int sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Peak DRAM bandwidth of the current device in GB/s: memory clock (kHz) x 2
// transfers per clock x bus width (bits) / 8; H100 SXM 3352 (2619 MHz, 5120
// bits; the H200's HBM3e is 4.8 TB/s by its specification). 0 where the
// driver does not tell.
inline int peak_dram_gbps() {
  static PerDevice gbps_on;
  return gbps_on.get([] {
    int device = 0, khz = 0, bits = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrMemoryClockRate, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&bits, cudaDevAttrGlobalMemoryBusWidth, device));
    return static_cast<int>(2.0 * khz * bits / 8.0 / 1e6);
  });
}

// Blocks of `kernel` (threads, dynamic shared memory smem) resident on the
// whole GPU at once: the slots a wave of the grid fills.
template <typename Kernel>
int resident_slots(Kernel kernel, int threads, int smem) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  return std::max(1, per_sm) * sm_count();
}

// Number of K splits (at most max_splits) for a grid of `blocks` blocks, each
// walking `steps` steps, on `slots` resident-block slots: the one whose waves
// are busiest, as a second wave that is mostly empty costs as much as a full
// one. With idle_penalty (the rule of the kernels with several blocks per
// SM), a grid of less than one wave scores below any grid that fills one.
// Of equal scores the fewest splits win, or with prefer_more the most.
inline int wave_filling_splits(long blocks, int steps, int slots, int max_splits,
                               bool idle_penalty = true, bool prefer_more = false) {
  int splits = 1;
  double best = -1.0;
  for (int sp = 1; sp <= max_splits; ++sp) {
    const int per = (steps + sp - 1) / sp;
    const int real = (steps + per - 1) / per;
    const long total = blocks * real;
    const long waves = (total + slots - 1) / slots;
    const double score =
        (double)total / (waves * slots) - (idle_penalty && total < slots ? 1.0 : 0.0);
    if (score > best + 1e-9 || (prefer_more && score > best - 1e-9)) {
      best = std::max(best, score);
      splits = real;
    }
  }
  return splits;
}

}  // namespace mpq::cuda::tile
