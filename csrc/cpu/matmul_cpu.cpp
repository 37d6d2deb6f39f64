// mpq::matmul on the CPU.
//
// Two paths, both accumulating in float32:
//  - up to fused_max_rows(...) rows (decode): fused_rows.h, the packed weights read
//    once and each weight decoded once for all rows, no [N, K] temporary;
//  - more rows: blocks of weight rows dequantized into cache-sized float32
//    buffers, one per thread, each block's product by at::mm (BLAS) into its
//    columns of y (blocked_mm). A whole [N, K] temporary would be fresh memory
//    on every call (page faults on every first touch: a new 64 MB float32
//    tensor took ten times as long to fill as a reused one here).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "../mpq.h"
#include "fused_rows.h"
#include "isa.h"
#include "to_float.h"
#include "unpack.h"

namespace mpq::cpu {

namespace {

constexpr int64_t kWeightRowsPerTurn = 16;

// The fused kernel's tiles per code width, in the AVX2 build and the baseline
// one (isa.h). (Not yet an AVX-512 build: two weight rows per 16-lane
// register, x laid out twice, measured mixed against these tiles on a 2-core
// Sapphire Rapids VM, 0.92-1.32x by cell, e.g. 2-bit 4096 x 4096 M = 1 980 ->
// 742 us but 2-bit g32 576 x 1536 135 -> 147;
// scripts/results/ab_cpu_avx512_pairs.log, branch exp/avx512-pairs.)
#define MPQ_FUSED_ROWS_W(NAME, W, TARGET)                                                     \
  TARGET void NAME(int mr, const float* xb, const float* xg, int64_t K, const uint32_t* q,    \
                   const float* s, const float* z, int64_t G, int64_t gs, const int32_t* gw,  \
                   int64_t rows, int64_t N, float* y) {                                       \
    switch (mr) {                                                                             \
      case 8: return fused_rows_tile<W, 8>(xb, xg, K, q, s, z, G, gs, gw, rows, N, y);        \
      case 4: return fused_rows_tile<W, 4>(xb, xg, K, q, s, z, G, gs, gw, rows, N, y);        \
      case 2: return fused_rows_tile<W, 2>(xb, xg, K, q, s, z, G, gs, gw, rows, N, y);        \
      default: return fused_rows_tile<W, 1>(xb, xg, K, q, s, z, G, gs, gw, rows, N, y);       \
    }                                                                                         \
  }
MPQ_FUSED_ROWS_W(fused_rows_w2, 2, )
MPQ_FUSED_ROWS_W(fused_rows_w4, 4, )
MPQ_FUSED_ROWS_W(fused_rows_w8, 8, )
#if defined(MPQ_X86_AVX2)
MPQ_FUSED_ROWS_W(fused_rows_w2_avx2, 2, MPQ_TARGET_AVX2)
MPQ_FUSED_ROWS_W(fused_rows_w4_avx2, 4, MPQ_TARGET_AVX2)
MPQ_FUSED_ROWS_W(fused_rows_w8_avx2, 8, MPQ_TARGET_AVX2)
#endif

using Tile = void (*)(int, const float*, const float*, int64_t, const uint32_t*, const float*,
                      const float*, int64_t, int64_t, const int32_t*, int64_t, int64_t, float*);

template <int W>
Tile tile_for_cpu(bool avx2) {
#if defined(MPQ_X86_AVX2)
  if (avx2) {
    return W == 2 ? fused_rows_w2_avx2 : W == 4 ? fused_rows_w4_avx2 : fused_rows_w8_avx2;
  }
#else
  (void)avx2;  // only x86-64 has a second build
#endif
  return W == 2 ? fused_rows_w2 : W == 4 ? fused_rows_w4 : fused_rows_w8;
}

// Up to how many rows of x the fused kernel beats the blocked path
// (blocked_mm): with AVX2 about 1000 / sqrt(K) rows, from 16 to 40 (the
// fused kernel's work grows with the rows, the blocked path's BLAS calls run
// the faster the longer K). Measured (2-core EPYC, w4 g64, interleaved calls,
// fused / blocked, us; scripts/results/ab_cpu_fused_rows_limit.log): 576 x
// 1536 M = 32 537 / 636, M = 40 664 / 713, M = 48 786 / 794; 960 x 2560 M =
// 32 1391 / 1626, M = 48 2084 / 1794; 1024 x 4096 M = 28 2063 / 2313, M = 32
// 2311 / 2106; 1536 x 576 M = 24 499 / 589, M = 32 653 / 638; 2048 x 2048
// M = 20 1685 / 1940, M = 24 2005 / 1871; 2560 x 960 M = 20 1049 / 1083,
// M = 24 1241 / 1204; 4096 x 4096 M = 16 5292 / 5297, M = 20 6558 / 6064,
// M = 24 7805 / 6652. The baseline build (eight lanes in
// two SSE registers, no FMA) took 14599 us at 4096 x 4096 M = 16 against about
// 7100 blocked, 7446 at M = 8 (2-core Xeon).
int64_t fused_max_rows(bool avx2, int64_t K) {
  if (!avx2) return 8;
  const auto rows = static_cast<int64_t>(1000.0 / std::sqrt(static_cast<double>(K)));
  return std::clamp<int64_t>(rows, 16, 40);
}

// What each thread does with its columns of y's float32 sums once its tiles
// are done: each row times XOrder::unscale, plus bias (float32, or nullptr),
// then written to `out` in x's dtype by to_out (nullptr: y is the output).
struct Epilogue {
  const float* bias;
  FromFloat to_out;
  void* out;
};

// y [M, N] float32 = x [M, K] float32 @ W^T (+ bias, out: Epilogue); s, z [N,
// K / group_size], float32 where to_s / to_z are nullptr, else what they
// convert (to_float.h).
template <int W>
void fused_rows(const float* x, int64_t M, int64_t K, const uint32_t* q, const void* s,
                const void* z, ToFloat to_s, ToFloat to_z, int64_t N, int64_t group_size,
                float* y, Epilogue ep, bool avx2) {
  constexpr int P = 32 / W;
  const int64_t G = K / group_size, words = K / P;
  const XOrder xo = block_order<W>(x, M, K, group_size);
  std::vector<int32_t> gw(static_cast<size_t>(words));
  for (int64_t w = 0; w < words; ++w) gw[w] = static_cast<int32_t>(w * P / group_size);
  const Tile tile = tile_for_cpu<W>(avx2);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    // This thread's rows of scales and zeros as float32, where they are not,
    // converted in one pass: two ops fewer per call than converting the whole
    // tensors before the kernel. 2-core EPYC, M = 1, caches flushed, builds
    // alternating (scripts/results/ab_cpu_half_scales.log): a float16 call's
    // time over the float32 call's at 576 x 1536 g64, two runs, w4 25.2 /
    // 26.4 -> 12.1 / 20.2 us, w2 26.1 / 26.7 -> 12.4 / 15.9, w8 25.3 / 29.4
    // -> 12.4 / 17.3; 4096 x 4096 level (w4 g64 one thread 1106-1120 ->
    // 1027-1091 us). (Measured and not taken: a turn's rows at a time into
    // a buffer that stays in L1, the next turn's asked for ahead: at 4096 x
    // 4096 on one thread 1180-1278 us against 1066-1200.)
    const int64_t rows = n1 - n0;
    // (not a std::vector: its zero fill would be one more pass over the buffer)
    const std::unique_ptr<float[]> sz(
        to_s != nullptr || to_z != nullptr ? new float[2 * rows * G] : nullptr);
    const auto converted = [&](const void* t, ToFloat to, float* buf) {
      if (to == nullptr) return static_cast<const float*>(t) + n0 * G;
      to(t, n0 * G, rows * G, buf);
      return static_cast<const float*>(buf);
    };
    const float* s0 = converted(s, to_s, sz.get());
    const float* z0 = converted(z, to_z, sz.get() + rows * G);
    // Each tile of rows of x decodes the weights once; the tiles take turns
    // over a few weight rows at a time, so that a later tile finds those
    // rows in cache rather than in memory. (Measured and not taken: each
    // weight row dequantized once into a buffer in x's block order that
    // every tile reads, one load per vector in place of the decode's four
    // operations: slower in all but two of 54 cells at M = 9 .. 24, e.g.
    // 4096 x 4096 w4 g64 M = 16 5574 -> 6872 us, 576 x 1536 w4 g64 417 ->
    // 471; scripts/results/ab_cpu_decode_once.log.)
    for (int64_t nb = n0; nb < n1; nb += kWeightRowsPerTurn) {
      const int64_t ne = std::min(n1, nb + kWeightRowsPerTurn);
      // The tile takes the turn's codes, scales, zeros and columns of y from
      // row nb on.
      const float* st = s0 + (nb - n0) * G;
      const float* zt = z0 + (nb - n0) * G;
      for (int64_t m0 = 0; m0 < M;) {
        const int mr = tile_rows(M - m0);
        tile(mr, xo.xb.data() + m0 * K, xo.xg.data() + m0 * G, K, q + nb * words, st, zt, G,
             group_size, gw.data(), ne - nb, N, y + m0 * N + nb);
        m0 += mr;
      }
    }
    // This thread's columns, in the order the ops after the kernel applied
    // them before (times unscale, plus bias, one rounding to x's dtype).
    for (int64_t m = 0; m < M; ++m) {
      float* yr = y + m * N + n0;
      if (const float u = xo.unscale[m]; u != 1.f)
        for (int64_t n = 0; n < rows; ++n) yr[n] *= u;
      if (ep.bias != nullptr)
        for (int64_t n = 0; n < rows; ++n) yr[n] += ep.bias[n0 + n];
      if (ep.to_out != nullptr) ep.to_out(yr, rows, ep.out, m * N + n0);
    }
  });
}

// x [M, K] as float32 with its columns in perm's order (out[m, k] = x[m,
// perm[k]]), perm's values checked first: loops over K and M x K elements in
// place of an index_select, a conversion and perm's check by three more ops
// (int64 copy, min, max). 2-core EPYC, M = 1, w4 g64, a call with perm over
// one without, medians over SmolLM2's four shapes, float32 and bfloat16, and
// three rounds: 4.9 -> 0.7 us (scripts/results/ab_cpu_perm_gather.log).
template <typename S, typename I>
void gather_to_float(const S* x, int64_t M, int64_t K, const I* perm, float* out) {
  I lo = perm[0], hi = perm[0];
  for (int64_t k = 1; k < K; ++k) {
    lo = std::min(lo, perm[k]);
    hi = std::max(hi, perm[k]);
  }
  check_perm_range(lo, hi, K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) out[m * K + k] = static_cast<float>(x[m * K + perm[k]]);
}

template <typename S>
void gather_to_float(const S* x, int64_t M, int64_t K, const at::Tensor& perm, float* out) {
  if (perm.scalar_type() == at::kInt)
    gather_to_float(x, M, K, perm.const_data_ptr<int32_t>(), out);
  else
    gather_to_float(x, M, K, perm.const_data_ptr<int64_t>(), out);
}

// The fused path from x to the output: x converted to float32 and the
// output's bias and rounding to x's dtype done inside the kernel (Epilogue),
// not by three or four ops around it. 2-core EPYC, M = 1, bfloat16 x with
// bias, op calls back to back, builds alternating in pairs (us;
// scripts/results/ab_cpu_half_epilogue.log): 576 x 192 w4 g64 21.3 / 21.4 /
// 21.4 -> 18.4 / 18.4 / 13.8, 576 x 576 28.0 / 28.6 / 28.7 -> 25.9 / 26.2 /
// 21.0; 576 x 1536 and 1536 x 576 level within the machine's drift.
at::Tensor fused(const at::Tensor& x, const std::optional<at::Tensor>& perm, const at::Tensor& q,
                 const at::Tensor& s, const at::Tensor& z, const std::optional<at::Tensor>& bias,
                 int64_t w_bit, int64_t group_size, bool avx2) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  const bool f32 = x.scalar_type() == at::kFloat;
  auto out = at::empty({M, N}, x.options());
  // (unique_ptr buffers: a std::vector's zero fill would be one more pass)
  std::unique_ptr<float[]> xbuf, ybuf, bbuf;
  if (perm.has_value()) {  // (act-order: x's columns gathered as they are converted)
    xbuf.reset(new float[M * K]);
    const auto p = perm->contiguous();
    if (f32)
      gather_to_float(x.const_data_ptr<float>(), M, K, p, xbuf.get());
    else if (x.scalar_type() == at::kHalf)
      gather_to_float(x.const_data_ptr<c10::Half>(), M, K, p, xbuf.get());
    else
      gather_to_float(x.const_data_ptr<c10::BFloat16>(), M, K, p, xbuf.get());
  } else if (!f32) {
    xbuf.reset(new float[M * K]);
    to_float_for(x.scalar_type(), avx2)(x.const_data_ptr(), 0, M * K, xbuf.get());
  }
  if (!f32) ybuf.reset(new float[M * N]);
  const float* xp = xbuf ? xbuf.get() : x.const_data_ptr<float>();
  float* yp = f32 ? out.mutable_data_ptr<float>() : ybuf.get();
  Epilogue ep{nullptr, f32 ? nullptr : from_float_for(x.scalar_type(), avx2),
              out.mutable_data_ptr()};
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    if (b.scalar_type() == at::kFloat) {
      ep.bias = b.const_data_ptr<float>();
    } else {
      bbuf.reset(new float[N]);
      to_float_for(b.scalar_type(), avx2)(b.const_data_ptr(), 0, N, bbuf.get());
      ep.bias = bbuf.get();
    }
  }
  // float16 / bfloat16 scales and zeros are converted by each thread for its
  // rows inside the kernel (to_float.h; they have x's dtype, check_matmul).
  const ToFloat to_s = to_float_for(s.scalar_type(), avx2);
  const ToFloat to_z = to_float_for(z.scalar_type(), avx2);
  const auto* qp = reinterpret_cast<const uint32_t*>(q.data_ptr<int32_t>());
  const void *sp = s.const_data_ptr(), *zp = z.const_data_ptr();
  switch (w_bit) {
    case 2: fused_rows<2>(xp, M, K, qp, sp, zp, to_s, to_z, N, group_size, yp, ep, avx2); break;
    case 4: fused_rows<4>(xp, M, K, qp, sp, zp, to_s, to_z, N, group_size, yp, ep, avx2); break;
    default: fused_rows<8>(xp, M, K, qp, sp, zp, to_s, to_z, N, group_size, yp, ep, avx2); break;
  }
  return out;
}

// x @ W^T through BLAS, each thread taking an even share of the weight rows and
// dequantizing them block by block into a float32 buffer of its own (about 2
// MB, at least 16 rows), each block multiplied by a single-threaded BLAS call
// into its columns of y: no barrier between the threads, each block read back
// from the cache its thread wrote it to. Against one shared 4 MB buffer
// filled by all threads, then a multithreaded BLAS call, block after block
// (a barrier each), on a 2-core EPYC, w4 g64, medians of interleaved calls
// (us, fp32 F.linear in brackets): 4096 x 4096 M = 32 26392 -> 8072 (15216),
// M = 128 46297 -> 25033 (36910); 2048 x 2048 M = 32 6448 -> 2457 (3813);
// 576 x 1536 M = 32 1036 -> 765 (858); and in a quieter minute 4096 x 4096
// M = 32 11675 -> 8037 (10919). One thread: level (4096 x 4096 M = 32 15487
// -> 15611). Buffers of 4 MB per thread ran level or slower (2048 x 2048
// M = 32 3184 against 2457), of 1 MB level on two threads and up to 5% slower
// on one (4096 x 4096 M = 128 49481 against 47557).
at::Tensor blocked_mm(const at::Tensor& xf, const at::Tensor& q, const at::Tensor& s,
                      const at::Tensor& z, int64_t w_bit, int64_t group_size, bool avx2) {
  const int64_t M = xf.size(0), K = xf.size(1), N = q.size(0);
  const int64_t threads = at::get_num_threads();
  const int64_t share = (N + threads - 1) / threads;
  const int64_t rows = std::min<int64_t>(share, std::max<int64_t>(16, (int64_t{1} << 19) / K));
  auto yf = at::empty({M, N}, xf.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "blocked_mm", [&] {
    const int32_t* qp = q.data_ptr<int32_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    // Inside the parallel region at::mm_out runs on its caller's thread. A
    // worker thread does not inherit the op's place below autograd: the guard
    // puts it there (else mm_out refuses an x that requires grad).
    at::parallel_for(0, N, share, [&](int64_t b0, int64_t b1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto buf = at::empty({rows, K}, xf.options());
      for (int64_t n0 = b0; n0 < b1; n0 += rows) {
        const int64_t nb = std::min(rows, b1 - n0);
        dequantize_rows<scalar_t, float>(qp, sp, zp, n0, n0 + nb, K, w_bit, group_size,
                                         buf.data_ptr<float>(), avx2);
        auto out = yf.narrow(1, n0, nb);
        at::mm_out(out, xf, buf.narrow(0, 0, nb).t());
      }
    });
  });
  return yf;
}

}  // namespace

at::Tensor matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const at::Tensor& zeros, int64_t w_bit, int64_t group_size,
                      const std::optional<at::Tensor>& perm,
                      const std::optional<at::Tensor>& bias) {
  const auto shape = check_matmul(x, qweight, scales, zeros, w_bit, group_size, perm, bias);
  const int64_t K = shape.K, N = shape.N;
  auto [x2, out_sizes] = as_rows(x, K, N);
  const int64_t M = x2.size(0);
  if (M == 0 || N == 0) return at::zeros(out_sizes, x.options());
  if (K == 0) {
    auto y = at::zeros({M, N}, x.options());
    if (bias.has_value()) y.add_(*bias);
    return as_output(y, out_sizes);
  }
  const auto q = qweight.contiguous();
  const auto s = scales.contiguous();
  const auto z = zeros.contiguous();
  const bool avx2 = use_avx2();
  if (M <= fused_max_rows(avx2, K))
    return as_output(fused(x2.contiguous(), perm, q, s, z, bias, w_bit, shape.group_size, avx2),
                     out_sizes);
  if (perm.has_value()) x2 = x2.index_select(1, checked_perm(*perm, K));
  const auto xf = x2.to(at::kFloat).contiguous();
  auto yf = blocked_mm(xf, q, s, z, w_bit, shape.group_size, avx2);
  if (bias.has_value()) yf.add_(bias->to(at::kFloat));
  return as_output(yf.to(x.scalar_type()), out_sizes);
}

TORCH_LIBRARY_IMPL(mpq, CPU, m) { m.impl("matmul", &matmul_cpu); }

}  // namespace mpq::cpu
