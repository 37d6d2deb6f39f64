// The CPU kernel for few rows of x: y[m, n] = sum_k x[m, k] * W[n, k] with
// each weight decoded once for all rows and the packed weights read once.
//
// Eight words of a weight row are decoded side by side, one code of each per
// lane: code j of eight words is one shift by j * W, one mask and one
// int-to-float conversion for all eight, i.e. plain 8-wide vector operations.
// For that, x is reordered once per call into the same order (block_order):
// block b of eight words holds, for each code j, the x values of the eight
// words' code j next to each other. Scales and zeros are float32 here (the
// caller converts float16 / bfloat16 ones, each thread for its weight rows);
// the sums are float32.
//
// A tile of one row of x scales late: y = sum_g s_g * sum_k c_k x_k -
// sum_g z_g s_g X_g, with X_g the sum of x over group g, so that a code costs
// two vector operations besides its multiply-add: code j masked where it
// lies in the word (c * 2^(W j), exact in float32) and converted, its x
// values multiplied by 2^-(W j) when x is reordered (the top code is shifted
// down instead). That keeps a mask per code, which with more rows of x (one
// load of x per row and code) made the loads the limit: on a 2-core EPYC
// (Zen 4), one thread, 4096 x 4096, g64, us: 4-bit M = 1 1003 -> 794, but
// M = 2 1359 -> 1476, M = 4 2673 -> 2904; so tiles of more rows scale each
// weight before its multiply-adds (c * s - z * s), a cost they share.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

// The 8-lane helpers below are always inlined, so the ABI of a 32-byte vector
// argument in the baseline build (GCC's -Wpsabi note) never applies.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace mpq::cpu {

constexpr int kLanes = 8;  // words decoded side by side

// Rows of x go through the kernel in tiles of 8, 4, 2, 1 rows; the tile that
// starts with `left` rows to go.
inline int tile_rows(int64_t left) { return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

// Whether a tile of mr rows scales late (above).
constexpr bool late_scaling(int mr) { return mr == 1; }

// x in the kernel's order, and what the one-row tiles need besides.
struct XOrder {
  std::vector<float> xb;       // block order (block_order)
  std::vector<float> xg;       // [M, G]: a one-row tile's sums of x over each group's whole blocks
  std::vector<float> unscale;  // [M]: the power of two each row of y is multiplied by
};

// x [M, K] (row-major float32) in the kernel's order: per tile of mr rows
// (tile_rows), an mr * K region holding, for each whole block of kLanes words
// and each code j, the tile's rows one after the other, each with the x values
// of the block's words' code j side by side; then each row's remaining x in
// order. A tile thus reads its x at fixed offsets from one pointer per block.
// In a one-row tile's region the x values of code j < P - 1 are multiplied
// by 2^-(W j); if the row's largest |x| lies outside [2^-60, 2^60], the row
// is first scaled by a power of two to about 1 (undone on y by
// XOrder::unscale), so that those products stay normal numbers and the late
// sums do not overflow where the result would not: exact, but for elements
// below the row's largest by more than float32's range.
template <int W>
XOrder block_order(const float* x, int64_t M, int64_t K, int64_t group_size) {
  constexpr int P = 32 / W;
  const int64_t G = K / group_size;
  XOrder o{std::vector<float>(static_cast<size_t>(M * K)),
           std::vector<float>(static_cast<size_t>(M * G)),
           std::vector<float>(static_cast<size_t>(M), 1.f)};
  const int64_t blocks = K / P / kLanes, whole = blocks * kLanes * P;
  float code_scale[P];
  for (int j = 0; j < P; ++j) code_scale[j] = j == P - 1 ? 1.f : std::ldexp(1.f, -W * j);
  for (int64_t m0 = 0; m0 < M;) {
    const int mr = tile_rows(M - m0);
    float* out = o.xb.data() + m0 * K;
    for (int m = 0; m < mr; ++m) {
      const float* xr = x + (m0 + m) * K;
      float f = 1.f;  // the row's scale
      float c[P];     // each code's factor
      std::fill(c, c + P, 1.f);
      if (late_scaling(mr)) {
        float amax = 0.f;
        for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
        if (std::isfinite(amax) && amax > 0.f && (amax < 0x1p-60f || amax > 0x1p60f)) {
          const int e = std::max(std::ilogb(amax), -100);
          f = std::ldexp(1.f, -e);
          o.unscale[m0 + m] = std::ldexp(1.f, e);
        }
        for (int j = 0; j < P; ++j) c[j] = f * code_scale[j];
        for (int64_t g = 0; g * group_size < whole; ++g) {
          double sum = 0.0;
          for (int64_t k = g * group_size; k < std::min(whole, (g + 1) * group_size); ++k)
            sum += static_cast<double>(xr[k] * f);
          o.xg[(m0 + m) * G + g] = static_cast<float>(sum);
        }
      }
      for (int64_t b = 0; b < blocks; ++b)
        for (int j = 0; j < P; ++j)
          for (int l = 0; l < kLanes; ++l)
            out[((b * P + j) * mr + m) * kLanes + l] = xr[(b * kLanes + l) * P + j] * c[j];
      float* tail = out + whole * mr + m * (K - whole);
      for (int64_t k = whole; k < K; ++k) tail[k - whole] = xr[k] * f;
    }
    m0 += mr;
  }
  return o;
}

#if defined(__GNUC__)
#define MPQ_ALWAYS_INLINE inline __attribute__((always_inline))
#define MPQ_LAMBDA_INLINE __attribute__((always_inline))
#else
#define MPQ_ALWAYS_INLINE inline
#define MPQ_LAMBDA_INLINE
#endif

// Eight lanes: GCC/clang vector types (one AVX register, or two SSE ones in
// the baseline build); elsewhere plain arrays with the same operations.
#if defined(__GNUC__)
typedef float F8 __attribute__((vector_size(32)));
typedef uint32_t U8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));
MPQ_ALWAYS_INLINE F8 load8(const float* p) {
  F8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
MPQ_ALWAYS_INLINE U8 load8(const uint32_t* p) {
  U8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
MPQ_ALWAYS_INLINE F8 splat8(float v) { return F8{} + v; }
template <int SHIFT>
MPQ_ALWAYS_INLINE F8 code8(U8 w, uint32_t mask) {
  return __builtin_convertvector((I8)((w >> SHIFT) & mask), F8);
}
MPQ_ALWAYS_INLINE float sum8(F8 v) {
  float t = 0.f;
  for (int l = 0; l < kLanes; ++l) t += v[l];
  return t;
}
// Code J of eight words times 2^(W J) (the top code: the code), as floats.
template <int W, int J>
MPQ_ALWAYS_INLINE F8 field8(U8 w) {
  if constexpr (J == 32 / W - 1) {
    return __builtin_convertvector((I8)(w >> (32 - W)), F8);
  } else {
    return __builtin_convertvector((I8)(w & (((1u << W) - 1u) << (W * J))), F8);
  }
}
// Codes H * 8 .. H * 8 + 7 of one word, one per lane (a variable shift per lane).
template <int W, int H>
MPQ_ALWAYS_INLINE F8 word_codes8(uint32_t word, uint32_t mask) {
  constexpr uint32_t b = 8 * H * W;
  const U8 shifts = {b, b + W, b + 2 * W, b + 3 * W, b + 4 * W, b + 5 * W, b + 6 * W, b + 7 * W};
  return __builtin_convertvector((I8)(((U8{} + word) >> shifts) & mask), F8);
}
#else
struct F8 {
  float v[kLanes];
  float operator[](int l) const { return v[l]; }
};
struct U8 {
  uint32_t v[kLanes];
};
inline F8 operator+(F8 a, F8 b) { for (int l = 0; l < kLanes; ++l) a.v[l] += b.v[l]; return a; }
inline F8 operator-(F8 a, F8 b) { for (int l = 0; l < kLanes; ++l) a.v[l] -= b.v[l]; return a; }
inline F8 operator*(F8 a, F8 b) { for (int l = 0; l < kLanes; ++l) a.v[l] *= b.v[l]; return a; }
inline F8& operator+=(F8& a, F8 b) { return a = a + b; }
inline F8 load8(const float* p) { F8 v; std::memcpy(v.v, p, sizeof v.v); return v; }
inline U8 load8(const uint32_t* p) { U8 v; std::memcpy(v.v, p, sizeof v.v); return v; }
inline F8 splat8(float x) { F8 v; for (int l = 0; l < kLanes; ++l) v.v[l] = x; return v; }
template <int SHIFT>
inline F8 code8(U8 w, uint32_t mask) {
  F8 v;
  for (int l = 0; l < kLanes; ++l)
    v.v[l] = static_cast<float>(static_cast<int32_t>((w.v[l] >> SHIFT) & mask));
  return v;
}
inline float sum8(F8 v) { float t = 0.f; for (int l = 0; l < kLanes; ++l) t += v.v[l]; return t; }
template <int W, int J>
inline F8 field8(U8 w) {
  F8 v;
  for (int l = 0; l < kLanes; ++l) {
    const uint32_t f =
        J == 32 / W - 1 ? w.v[l] >> (32 - W) : w.v[l] & (((1u << W) - 1u) << (W * J));
    v.v[l] = static_cast<float>(static_cast<int32_t>(f));
  }
  return v;
}
template <int W, int H>
inline F8 word_codes8(uint32_t word, uint32_t mask) {
  F8 v;
  for (int l = 0; l < kLanes; ++l)
    v.v[l] = static_cast<float>(static_cast<int32_t>((word >> ((8 * H + l) * W)) & mask));
  return v;
}
#endif

// f(integral_constant<int, j>) for j = 0 .. N-1, unrolled.
template <int... J, typename F>
MPQ_ALWAYS_INLINE void unroll(std::integer_sequence<int, J...>, F&& f) {
  (f(std::integral_constant<int, J>{}), ...);
}

// Columns [0, rows) of y for MR rows of x and `rows` weight rows (xb: their
// region of block_order's output; xg: their rows of XOrder::xg; q, s, z, y:
// from the first of those weight rows on, y with row stride N). s, z: float32
// [rows, G]. gw[w]: the group of word w, read only where a block straddles
// groups and for the last words.
template <int W, int MR>
MPQ_ALWAYS_INLINE void fused_rows_tile(const float* xb, const float* xg, int64_t K,
                                       const uint32_t* q, const float* s, const float* z,
                                       int64_t G, int64_t group_size, const int32_t* gw,
                                       int64_t rows, int64_t N, float* y) {
  constexpr int P = 32 / W;
  constexpr uint32_t mask = (1u << W) - 1u;
  constexpr bool late = late_scaling(MR);
  // A sums per row, code j adding to sum j % A: with fewer than four rows
  // one sum per row would chain every multiply-add on the one before it. The
  // late tile's chains end at each group (or block), so consecutive ones
  // overlap, and its vector registers hold the masks as well.
  constexpr int A = late ? 2 : MR >= 4 ? 1 : std::min(P, 4 / MR);
  const int64_t words = K / P, blocks = words / kLanes;
  const int64_t words_per_group = group_size / P;
  // Groups that are whole blocks: one scale and zero per block, looped by group.
  const bool whole_groups = words_per_group % kLanes == 0;
  const int64_t blocks_per_group = whole_groups ? words_per_group / kLanes : 0;
  // Groups that divide a block (groups of 32 for 2- and 4-bit codes, 64 for
  // 2-bit): 2 or 4 consecutive groups per block, each over a run of lanes,
  // so the lane vectors come from that many scales and zeros, not from a
  // group index per lane (gw): eight scalar lookups and products per block,
  // with which g32 took 1.2x the time of g64 (576 x 576, M = 1).
  const int64_t groups_per_block =
      !whole_groups && kLanes % words_per_group == 0 ? kLanes / words_per_group : 0;
  for (int64_t n = 0; n < rows; ++n) {
    const uint32_t* qr = q + n * words;
    const float* sr = s + n * G;
    const float* zr = z + n * G;
    // acc: the row's sums; the late tile adds each group's (or block's) codes
    // times x into part first, then part times the lanes' scales into acc.
    F8 acc[MR][A], part[MR][A];
    for (int m = 0; m < MR; ++m)
      for (int a = 0; a < A; ++a) acc[m][a] = part[m][a] = splat8(0.f);
    // Block b (kLanes words), lane l's scale in sl[l] and -zero * scale in
    // zl[l] (a weight is then one multiply-add from its code).
    const auto block = [&](int64_t b, F8 sl, F8 zl) MPQ_LAMBDA_INLINE {
      const U8 wq = load8(qr + b * kLanes);
      const float* xk = xb + b * kLanes * P * MR;
      unroll(std::make_integer_sequence<int, P>{}, [&](auto j) MPQ_LAMBDA_INLINE {
        constexpr int jj = decltype(j)::value;
        if constexpr (late) {
          const F8 cv = field8<W, jj>(wq);
          for (int m = 0; m < MR; ++m) part[m][jj % A] += cv * load8(xk + (jj * MR + m) * kLanes);
        } else {
          const F8 wv = code8<jj * W>(wq, mask) * sl + zl;
          for (int m = 0; m < MR; ++m) acc[m][jj % A] += wv * load8(xk + (jj * MR + m) * kLanes);
        }
      });
    };
    // After the blocks that sl covers: their sums times the scales.
    const auto scale = [&](F8 sl) MPQ_LAMBDA_INLINE {
      if constexpr (late) {
        for (int m = 0; m < MR; ++m)
          for (int a = 0; a < A; ++a) {
            acc[m][a] += sl * part[m][a];
            part[m][a] = splat8(0.f);
          }
      }
    };
    // Lane vectors for GPB groups per block, from groups g0 .. g0 + GPB - 1.
    const auto group_runs = [&](auto gpb, int64_t g0) MPQ_LAMBDA_INLINE {
      constexpr int GPB = decltype(gpb)::value, RUN = kLanes / GPB;
      float sv[kLanes], zv[kLanes];
      for (int g = 0; g < GPB; ++g) {
        const float sc = sr[g0 + g], zc = -zr[g0 + g] * sc;
        for (int l = 0; l < RUN; ++l) {
          sv[g * RUN + l] = sc;
          zv[g * RUN + l] = zc;
        }
      }
      return std::make_pair(load8(sv), load8(zv));
    };
    // Groups of one block as one flat loop: as the group loop's inner loop of
    // one pass, the late tile's sums and masks left their registers (this and
    // two sums per row instead of four: w4 g64, one thread, 4096 x 4096,
    // M = 1, 1190 -> 838 us).
    if (blocks_per_group == 1) {
      for (int64_t b = 0; b < blocks; ++b) {
        const F8 sl = splat8(sr[b]);
        block(b, sl, splat8(-zr[b] * sr[b]));
        scale(sl);
      }
    } else if (whole_groups) {
      for (int64_t g = 0; g < G; ++g) {
        const F8 sl = splat8(sr[g]), zl = splat8(-zr[g] * sr[g]);
        for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b)
          block(b, sl, zl);
        scale(sl);
      }
    } else if (groups_per_block == 2) {
      for (int64_t b = 0; b < blocks; ++b) {
        const auto [sl, zl] = group_runs(std::integral_constant<int, 2>{}, 2 * b);
        block(b, sl, zl);
        scale(sl);
      }
    } else if (groups_per_block == 4) {
      for (int64_t b = 0; b < blocks; ++b) {
        const auto [sl, zl] = group_runs(std::integral_constant<int, 4>{}, 4 * b);
        block(b, sl, zl);
        scale(sl);
      }
    } else {
      for (int64_t b = 0; b < blocks; ++b) {
        float sv[kLanes], zv[kLanes];
        for (int l = 0; l < kLanes; ++l) {
          sv[l] = sr[gw[b * kLanes + l]];
          zv[l] = -zr[gw[b * kLanes + l]] * sv[l];
        }
        block(b, load8(sv), load8(zv));
        scale(load8(sv));
      }
    }
    float out[MR];
    for (int m = 0; m < MR; ++m) {
      F8 t = acc[m][0];
      for (int a = 1; a < A; ++a) t += acc[m][a];
      out[m] = sum8(t);
    }
    // The late tile's zero points: -sum_g z_g s_g X_g.
    if constexpr (late) {
      const int64_t G8 = G / kLanes * kLanes;
      for (int m = 0; m < MR; ++m) {
        const float* xgm = xg + m * G;
        F8 t = splat8(0.f);
        for (int64_t g = 0; g < G8; g += kLanes)
          t += load8(zr + g) * load8(sr + g) * load8(xgm + g);
        float zsum = sum8(t);
        for (int64_t g = G8; g < G; ++g) zsum += zr[g] * sr[g] * xgm[g];
        out[m] -= zsum;
      }
    }
    // Words past the last whole block (4-bit codes where K % 64 != 0, 2-bit
    // where K % 128 != 0), in order, each row's x for them contiguous: a
    // word's codes eight at a time across the lanes (8-bit codes have no
    // such words: K is a multiple of 32). Code by code, these few words of
    // 2-bit codes at K = 576 (4 of 36 per row) took as long as the blocks.
    const int64_t tail_k = K - blocks * kLanes * P;
    const float* xt0 = xb + blocks * kLanes * P * MR;
    if constexpr (P >= kLanes) {
      F8 tacc[MR];
      for (int m = 0; m < MR; ++m) tacc[m] = splat8(0.f);
      for (int64_t w = blocks * kLanes; w < words; ++w) {
        const uint32_t word = qr[w];
        const float sc = sr[gw[w]];
        const F8 sl = splat8(sc), zl = splat8(-zr[gw[w]] * sc);
        const float* xt = xt0 + (w - blocks * kLanes) * P;
        unroll(std::make_integer_sequence<int, P / kLanes>{}, [&](auto h) MPQ_LAMBDA_INLINE {
          constexpr int hh = decltype(h)::value;
          const F8 wv = word_codes8<W, hh>(word, mask) * sl + zl;
          for (int m = 0; m < MR; ++m) tacc[m] += wv * load8(xt + m * tail_k + hh * kLanes);
        });
      }
      for (int m = 0; m < MR; ++m) out[m] += sum8(tacc[m]);
    } else {
      for (int64_t w = blocks * kLanes; w < words; ++w) {
        const uint32_t word = qr[w];
        const float sc = sr[gw[w]], zc = -zr[gw[w]] * sc;
        const float* xt = xt0 + (w - blocks * kLanes) * P;
        for (int j = 0; j < P; ++j) {
          const auto code = static_cast<int32_t>((word >> (j * W)) & mask);
          const float wv = static_cast<float>(code) * sc + zc;
          for (int m = 0; m < MR; ++m) out[m] += wv * xt[m * tail_k + j];
        }
      }
    }
    for (int m = 0; m < MR; ++m) y[m * N + n] = out[m];
  }
}

}  // namespace mpq::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
