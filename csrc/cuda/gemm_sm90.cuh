// The host side of the wgmma kernels (gemm_sm90_kernel.cuh): tensor maps of x
// and the codes, the choice of tile and ring per call, the grid (whole tiles,
// the last wave's split, stream-K) and the launch.
#pragma once

#include "gemm_sm90_kernel.cuh"

namespace mpq::cuda::sm90 {

#if defined(MPQ_SM90A)
constexpr bool kBuilt = true;
#else
constexpr bool kBuilt = false;
#endif

// cuTensorMapEncodeTiled from the driver, through the runtime (no libcuda link).
inline PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const auto fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult status{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000,
                                                    cudaEnableDefault, &status));
    TORCH_CHECK(f != nullptr && status == cudaDriverEntryPointSuccess,
                "mpq::matmul: cuTensorMapEncodeTiled is not available from the CUDA driver");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A row-major [rows, cols] matrix read in boxes of [box_rows, box_cols].
inline CUtensorMap tensor_map(const void* base, CUtensorMapDataType type, int elem_bytes,
                              uint64_t rows, uint64_t cols, uint32_t box_rows, uint32_t box_cols,
                              CUtensorMapSwizzle swizzle) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {cols * elem_bytes};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode_tiled()(&map, type, 2, const_cast<void*>(base), dims, strides, box,
                                    elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                                    CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "mpq::matmul: cuTensorMapEncodeTiled failed (", int(r), ")");
  return map;
}

// Past one wave, a last wave that is at most half full (one block per SM)
// has its tiles split, so that it takes a fraction of the time of a full one;
// the other tiles are whole (Schedule). The split count: as many as fill the
// wave, up to 4; 0 where the last wave stays whole. H100, w4 g128, 256-row
// tiles, split / not (us): (8192, 28672) M = 512 (448 tiles, 52 split in 2)
// 391 / 413, M = 640 (672, 12 in 4) 553 / 576, M = 768 590 / 622; (28672,
// 8192) M = 640 (192, 60 in 2) 522 / 605, M = 768 555 / 641; (14336, 4096)
// M = 1280 (160, 28 in 4) 234 / 308; (4096, 4096) M = 1280 (160, 28 in 4)
// 80.2 / 94.3; (4096, 6144) M = 1536 (288, 24 in 4) 128 / 143. Two-way splits of K = 4096 or less
// lost in every case measured (the partial sums and the second kernel cost
// more than half a wave of short tiles saves): (4096, 4096) M = 1536 (192, 60)
// 103.0 / 94.8, M = 2560 151.4 / 146.1; (4096, 14336) M = 1024 200.3 / 196.0;
// (4096, 6144) M = 1024 102.8 / 94.5, M = 3072 261.5 / 254.1; (2048, 8192)
// M = 1280 95.2 / 80.0; so those tails stay whole (and at K = 8192, (8192,
// 8192) M = 1280, two ways still gained: 273 / 285).
inline int tail_split_ways(long tiles, int sms, int K) {
  const long tail = tiles % sms;
  if (tiles <= sms || tail == 0 || 2 * tail > sms) return 0;
  const int pairs = K / (2 * kStepK);
  const int want = static_cast<int>(std::min<long>({sms / tail, 4L, pairs}));
  if (want < 2 || (want == 2 && K <= 4096)) return 0;
  const int per = (pairs + want - 1) / want;
  return (pairs + per - 1) / per;
}

// A last wave of 256-row tiles that stays whole (tail_split_ways) and is at
// most half full goes to a second launch of 128-row tiles instead, which cover
// it in one wave at about 0.6 of a wide wave's time (prefer_narrow_tiles) and
// write y directly: no partial sums. Taken where the tail is whole weight
// tiles (x-row tiles fastest in Schedule: at most kGroupM of them, and the full
// waves a multiple of them). Returns the wide tiles left to that launch, or 0.
// H100, w4 g128, (4096, 14336) (448 tiles, 52 left), narrow tail / last wave
// whole, medians of five alternating rounds (us): M = 1024 184.3 / 201.5
// (fp16 F.linear 178.3), M = 960 183.3 / 197.6, M = 904 183.0 / 193.3;
// bfloat16 M = 1024 184.4 / 194.8. The outputs were bitwise the same.
inline long narrow_tail(long m_tiles, long n_tiles, int sms, int K) {
  const long tiles = m_tiles * n_tiles, tail = tiles % sms;
  if (tiles <= sms || tail == 0 || 2 * tail > sms) return 0;
  if (m_tiles > kGroupM || tail % m_tiles != 0) return 0;
  return tail_split_ways(tiles, sms, K) > 1 ? 0 : tail;
}

// n_count > 0: only weight tiles [n_first, n_first + n_count), whole (the
// narrow tail of a wide launch).
template <int W, typename T, int BM, int STAGES, int D, int BLOCKS = 1>
void launch(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                   const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
                   int64_t group_size, int n_first = 0, int n_count = 0) {
  using L = Layout<BM, STAGES, W>;
  const int M = static_cast<int>(x.size(0)), K = static_cast<int>(x.size(1));
  const int N = static_cast<int>(qweight.size(0));
  const int m_tiles = (M + BM - 1) / BM;
  const int n_tiles = n_count > 0 ? n_count : static_cast<int>(weight_tiles(N));
  // x: boxes of BM rows x 64 halves, 128-byte swizzle (the layout wgmma's B
  // descriptor names); codes: 128 rows x 32 bytes, 32-byte swizzle (so the
  // lanes' 16-byte reads of 8 rows fall in distinct banks), 8-bit codes 128
  // rows x 64 bytes, 64-byte swizzle (their 4-byte reads likewise). Both maps have
  // L2 fetch 256 bytes of a row at a time: for the codes' 32-byte reads, a
  // row's next seven steps then hit L2. Promotion of the codes by 128 bytes
  // measured the same, by 64 or none slower. H200, w4 g128, medians of three
  // alternating rounds, 256 / 64 / none (us): (8192, 28672) float16 M = 16
  // 63.7 / 72.5 / 72.5, bfloat16 M = 16 67.5 / 73.2 / 73.1, float16 M = 64
  // 84.0 / 84.8 / 84.5; (28672, 8192) float16 M = 48 72.9 / 74.8 / 74.8.
  // (DRAM read at M = 16, 256 / none: 132.5 / 131.0 MB, ncu.) Stages of two
  // steps, the codes of both in one box of 64-byte rows (half the copies'
  // rows), measured the same (one round against the same day's build, us):
  // (8192, 28672) float16 M = 16 64.5 -> 65.8, bfloat16 67.4 -> 66.4, M = 64
  // 84.3 -> 85.0.
  const auto x_map = tensor_map(
      x.data_ptr(),
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
      2, M, K, BM, kStepK, CU_TENSOR_MAP_SWIZZLE_128B);
  const auto w_map = tensor_map(qweight.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_UINT32, 4, N,
                                K / (32 / W), kRowsW, kRowWords<W>,
                                W == 2   ? CU_TENSOR_MAP_SWIZZLE_NONE
                                : W == 4 ? CU_TENSOR_MAP_SWIZZLE_32B
                                         : CU_TENSOR_MAP_SWIZZLE_64B);
  // Split K when the tiles leave at least half the SMs idle (one block per
  // SM), e.g. few rows of x against a long, narrow weight; steps are split in
  // pairs. (Filling the last few SMs by splitting costs more in partial sums
  // than it gains: 112 tiles at (4096, 14336), M = 128, 7 splits took 84 us,
  // none 45.5 us.) A 64-row tile does less math per byte of codes: splits fill
  // its one wave as far as they can, and where the tiles already cover half
  // the SMs, only while the float32 partial sums (written and read once) stay
  // under a quarter of the codes' bytes (measured at M = 64: (28672, 8192)
  // 120 -> 110 us with 2 splits, (14336, 4096) 98 -> 37 us with 4;
  // (8192, 28672) 132 us unsplit, 146 us with 4).
  // The 128- and 256-row tiles, one block per SM, count a grid a few blocks
  // short of a wave as full: those SMs idle, where a second wave would cost a
  // whole one's time. (Scored as below a full wave, as for the kernels with
  // several blocks per SM, they took twice the splits and were slower in 34
  // of 88 cells of M = 96..512 on eleven shapes by 3-23% and faster in none
  // by 3%: H100, w4 g128, us, e.g. (4096, 4096) M = 128 27.0 -> 21.6 with 4
  // splits instead of 8, (14336, 4096) M = 256 66.3 -> 61.1 with 2 instead of
  // 4, (8192, 4096) M = 160 49.8 -> 40.1, (2048, 2048) M = 256 22.0 -> 17.0.)
  // And only as many splits as keep the grid in one wave: the fuller waves of
  // more splits (48 tiles: 8 splits in three waves against 2 in one at 0.73)
  // lost to the partial sums, (2048, 2048) M = 384 28.7 -> 20.5 us, (8192,
  // 2048) M = 384 45.6 -> 40.5.
  // Past one wave: tail_split_ways.
  const int pairs = K / (2 * kStepK);
  const long tiles = static_cast<long>(m_tiles) * n_tiles;
  const int sms = BLOCKS * tile::sm_count();  // block slots of one wave
  int splits = 1, tail_splits = 1;  // of every tile (blockIdx.y), of the last wave's
  long tail = 0, narrow = 0;           // tiles split in the last wave, left to 128-row tiles
  // Groups of 32 or 64 (else whole step pairs: sm90_supported).
  const bool fine = group_size < 2 * kStepK;
  bool stream_k = false;  // (gemm_sm90_kernel's SK)
  // Which launches may run stream-K: 16-row tiles, two blocks per SM, not for
  // 8-bit codes (launch_one_tile says why).
  constexpr bool kMayStreamK = W != 8 && BM == 16 && BLOCKS == 2;
  if (n_count > 0) {
    // a wide launch's narrow tail: whole tiles, no splits
  } else if (BM < 64 && 4 * tiles >= 3 * sms) {
    // 16- to 48-row tiles that fill 3/4 of a wave unsplit stay whole: H200,
    // M = 17 at (8192, 28672), 224 tiles on 264 slots, 7 splits 79.2 us,
    // none 70.0; M = 16, 7 splits 73.7, none 66.2. Or, for 16-row tiles two
    // blocks per SM, stream-K over the slots where the tiles do not fill
    // whole waves (shares over half a tile). H200, g128, medians of three
    // alternating rounds (us): (8192, 28672) float16 M = 16 67.9 -> 64.4,
    // M = 12 65.1 -> 62.5, bfloat16 M = 16 67.6 -> 67.1. Measured slower and
    // not taken: 32-row tiles, M = 24 68.5 -> 70.0, M = 32 69.6 -> 71.7; one
    // block per SM, (4096, 14336) M = 16 (112 tiles on 132) 23.7 -> 25.6;
    // 64-row tiles (224 on 264 slots), M = 64 85.7 -> 95.1, M = 56 86.0 ->
    // 92.8, bfloat16 M = 64 91.4 -> 99.9.
    // Nor with the parts added in the kernel instead of tile::finish_split
    // (each later part of a tile in its block's own slot of float32 sums
    // behind a flag, the tile's owner adding them and writing y: only split
    // parts through memory, no second kernel), although the idle slots cost:
    // 264 tiles take little longer than 224 (w4 (8192, 33792) against
    // (8192, 28672), M = 16 66.6 / 63.7 us, M = 32 71.8 / 70.1, M = 64 91.0
    // / 83.5). H200, float16 g128 (8192, 28672), medians of three
    // alternating rounds, whole tiles / that stream-K (us): w4 M = 16 65.1 /
    // 63.4 (the landed stream-K 63.7 in a run of that session), M = 32 69.5
    // / 69.2, M = 48 76.1 / 76.6, M = 64 84.0 / 86.4 ((4096, 28672) 44.6 /
    // 47.7; bfloat16 90.0 / 89.0, g64 90.0 / 88.8); w2 M = 32 67.5 / 65.5,
    // M = 64 81.4 / 78.7; w8 M = 32 80.8 / 87.1, M = 64 98.0 / 100.8. (Its
    // first form, one loop over a block's segments around the steps, had
    // ptxas keep the ring position and wgmma descriptors out of the uniform
    // registers, an R2UR before every wgmma: per step 11-17% slower than
    // these kernels, M = 16 72.2 against 65.0 us on a grid of whole tiles.)
    // (scripts/results/ab_h200_sm90_stream_k_wide.)
    const int pass_steps = 2 * D, steps = K / kStepK;
    const long passes = tiles * (steps / pass_steps);
    stream_k = kMayStreamK && tiles % sms != 0 && passes >= sms &&
               steps % pass_steps == 0 && 2 * (passes / sms) >= steps / pass_steps - 1;
  } else if (BM <= 64) {
    const long bound = 2 * tiles <= sms ? 8 : std::clamp<long>(K / (64L * M), 1, 8);
    splits = tile::wave_filling_splits(tiles, pairs, sms, static_cast<int>(bound), false);
  } else if (2 * tiles <= sms) {
    splits = tile::wave_filling_splits(
        tiles, pairs, sms, static_cast<int>(std::clamp<long>(sms / tiles, 1, 8)),
        /*idle_penalty=*/false);
  } else if (const int ways = tail_split_ways(tiles, sms, K); ways > 1) {
    tail = tiles % sms;
    tail_splits = ways;
  } else if (BM == 256 && BLOCKS == 1) {
    narrow = narrow_tail(m_tiles, n_tiles, sms, K);
  }
  const Schedule sched{m_tiles,
                       n_tiles,
                       kGroupM,
                       static_cast<int>(tiles - tail - narrow),
                       narrow > 0 ? 0 : tail_splits,
                       2 * ((pairs + splits - 1) / splits),
                       2 * ((pairs + tail_splits - 1) / tail_splits),
                       n_first};
  // (Partial sums tile by tile for a split last wave, whose tiles are a part
  // of y; that layout for every tile measured up to 17% slower than y's,
  // M = 256 at (4096, 4096) 37.4 against 32.0 us.)
  // x permuted by the copy warpgroup (PERM) for bfloat16 tiles of up to 32
  // rows: the consumers' steps shorter (SASS, sm_90a, 16-row tile: 142 -> 120
  // instructions per step and warp) against the copy warps' 2 BM half-rows of
  // PRMTs per stage. H200, g128, medians of three alternating rounds (us):
  // bfloat16 (8192, 28672) M = 16 72.0 -> 67.1, M = 32 77.8 -> 73.9; (28672,
  // 8192) M = 24 74.5 -> 71.8. float16, whose step saves less (124.5 -> 110),
  // ran slower with it: M = 24 69.2 -> 72.7, (4096, 14336) M = 32 23.6 -> 25.1;
  // at M = 16 (high codes decoded unshifted: 248 -> 219 instructions per two
  // steps) level, three alternating rounds: (8192, 28672) 63.4 -> 64.6, M = 12
  // 62.8 -> 63.9, g64 67.5 -> 68.6, (28672, 8192) 64.4 -> 63.8, (4096, 14336)
  // 23.7 -> 23.1.
  // (Not taken either: late scaling here, as the staged kernels do it, for the
  // one-block 16-row tiles: with x permuted each code pair one LOP3 from an
  // MMA operand, scale and zero point applied to per-pair-of-steps sums, the
  // sums of x from one more wgmma with A = 1, splits of whole passes. 12-13%
  // fewer instructions per step, yet slower: H200, (4096, 14336), medians of
  // three alternating rounds (us), float16 M = 16 23.6 -> 25.3, M = 12 23.6 ->
  // 25.3, bfloat16 M = 16 24.7 -> 25.4.)
  // (What any cheaper decode could buy, bounded with outputs wrong on purpose:
  // the byte permute dropped, each word used as it lands (a LOP3 and two
  // packed FMAs per pair, as a weight layout prepared for this kernel would
  // allow), and one LOP3 per pair with nothing else (late scaling on such a
  // layout, before its own costs). H200, float16 w4 g128, medians of three
  // alternating rounds, landed / no permute / one LOP3 (us): (8192, 28672)
  // M = 16 63.4 / 61.1 / 57.3, M = 64 83.9 / 77.4 / 68.4; (28672, 8192)
  // M = 64 78.0 / 73.4 / 65.8; (4096, 14336) M = 16 23.0 / 22.0 / 21.0,
  // M = 64 26.2 / 25.7 / 23.5 (scripts/results/ab_h200_sm90_decode_bounds).
  // A second layout would have to be read by every other path as well (the
  // one-row kernels, dequantize) or double the weights' memory: not for the
  // 2-8% that dropping the permute bought.)
  constexpr bool P = W == 4 && std::is_same_v<T, __nv_bfloat16> && BM <= 32;
  auto* kernel = fine ? gemm_sm90_kernel<W, T, BM, STAGES, D, BLOCKS, true, false, P>
                      : gemm_sm90_kernel<W, T, BM, STAGES, D, BLOCKS, false, false, P>;
  if constexpr (kMayStreamK) {
    if (stream_k)
      kernel = fine ? gemm_sm90_kernel<W, T, BM, STAGES, D, BLOCKS, true, false, P, true>
                    : gemm_sm90_kernel<W, T, BM, STAGES, D, BLOCKS, false, false, P, true>;
  }
  if constexpr (BM > 64) {  // (the 64-row tiles' rule splits no last wave)
    if (tail > 0)
      kernel = fine ? gemm_sm90_kernel<W, T, BM, STAGES, D, BLOCKS, true, true, P>
                    : gemm_sm90_kernel<W, T, BM, STAGES, D, BLOCKS, false, true, P>;
  }
  // Per call, not once: the limit belongs to the current device.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      L::kBytes));
  at::Tensor ws;
  if (stream_k)
    ws = at::empty({3, M, N}, x.options().dtype(at::kFloat));
  else if (splits > 1)
    ws = at::empty({splits, M, N}, x.options().dtype(at::kFloat));
  else if (tail > 0)
    ws = at::empty({tail_splits, tail, BM * kRowsW}, x.options().dtype(at::kFloat));
  const T* bias_ptr = bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // Launched to overlap the end of the kernel before (programmatic dependent
  // launch: gemm_sm90_kernel waits before its first read), as the staged
  // kernel is; MPQ_OPS_CUDA_PDL=0 turns it off. (sm90_supported: a
  // compute capability 9.0 device and sm_90a code.) H200, layers (4096,
  // 14336) and (14336, 4096) in turn replayed from a CUDA graph, M = 64, g128,
  // on / off (us per layer): w4 23.9 / 24.7, w2 23.1 / 24.0, w8 24.4 / 25.3
  // (scripts/bench_chain.py, scripts/results/bench_chain_h200.log); single
  // calls after an L2 flush level, (8192, 28672) w4 M = 16 64.3 / 64.1, M =
  // 64 83.6 / 84.4, (4096, 4096) M = 64 15.8 / 15.8.
  tile::launch(kernel, dim3(stream_k ? sms : sched.blocks(), splits), kThreads, L::kBytes, stream,
               dim3(1), tile::programmatic_launches(), x_map, w_map,
               reinterpret_cast<const T*>(scales.data_ptr()),
               reinterpret_cast<const T*>(zeros.data_ptr()), bias_ptr,
               reinterpret_cast<T*>(y.data_ptr()), ws.defined() ? ws.data_ptr<float>() : nullptr,
               M, N, K, tile::Groups::of(group_size), sched);
  if (stream_k) {
    tile::finish_split<T>(ws, bias_ptr, y, 3, stream);
  } else if (splits > 1) {
    tile::finish_split<T>(ws, bias_ptr, y, splits, stream);
  } else if (tail > 0) {
    finish_tail_sm90<T><<<dim3(sched.tail(), BM * kRowsW / 256), 256, 0, stream>>>(
        ws.data_ptr<float>(), bias_ptr, reinterpret_cast<T*>(y.data_ptr()), M, N, BM, sched);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if constexpr (BM == 256) {
    if (narrow > 0) {
      const int first = static_cast<int>((tiles - narrow) / m_tiles);
      launch<W, T, 128, 6, 2>(x, qweight, scales, zeros, bias, y, group_size, first,
                           n_tiles - first);
    }
  }
}

// 128 rows of x per block rather than 256: for up to 192 rows, and where the
// 256-row tiles would leave more than half the SMs without a tile (the
// narrower tiles then need fewer K splits). H100, w4 g128, 128- / 256-row
// tiles: M = 512 at (4096, 4096) 34.4 / 53.9 us, at (14336, 4096) 99.3 / 105.8;
// M = 1024 at (14336, 4096), where both fill the SMs, 209.3 / 173.3.
// Past one wave of 256-row tiles whose last wave stays whole, also where the
// narrow tiles take fewer waves' time: a wave of them takes 0.6 of a wide
// one's (M = 2048: (4096, 4096) 120.0 / 102.1 us over 4 and 2 waves, (4096,
// 14336) 445.5 / 373.5 over 14 and 7). That picks them for 1.45 waves of wide
// tiles (2 whole) against 2.9 narrow (3): (4096, 4096) M = 1536 90.5 / 94.8,
// (4096, 6144) M = 1024 89.7 / 94.5; 2.4 against 4.8 (3 and 5, even) stays wide.
// Where the narrow tiles too take one wave, they: (5120, 5120) M = 320 38.7 /
// 56.4, M = 384 39.0 / 56.5. Up to 384 rows, where the wide tiles' second row
// block is at most half used, the waves decide even where the wide tiles'
// last wave would be split: M = 264..384 at (4096, 11008) 61.1-71.5 against
// 90.8-105.3 us, at (8192, 28672) 318-336 against 384-411, at (8192, 11008)
// 119-136 against 145-177.
inline bool prefer_narrow_tiles(int64_t M, int64_t N, int K) {
  const long sms = tile::sm_count(), n_tiles = weight_tiles(N);
  const long wide = (M + 255) / 256 * n_tiles, narrow = (M + 127) / 128 * n_tiles;
  if (M <= 192 || 2 * wide <= sms) return true;
  if (narrow <= sms) return true;  // one wave either way
  if (wide <= sms) return false;
  if (M > 384 && tail_split_ways(wide, static_cast<int>(sms), K) > 1) return false;
  return 3 * ((narrow + sms - 1) / sms) < 5 * ((wide + sms - 1) / sms);
}

// Past 64 rows, 64-row tiles (12 stages, one block per SM) where they fill
// 90-100% of one wave unsplit and K is short: no partial sums, and against
// the split 128-row tiles' fixed costs the decode done once per 64 rows is
// cheap. H100, w4 g128, against the rules' 128-row tiles (us): (4096, 8192)
// M = 128 31.1 -> 27.3, (2048, 8192) M = 80 21.6 -> 17.2, (5120, 5120) M = 192
// 37.6 -> 30.5, (4096, 4096) M = 256 28.5 -> 26.4. At K >= 8192 the split
// 128-row tiles won: (8192, 4096) M = 256 42.4 against 45.7, (14336, 4096)
// 62.1 against 73.9.
inline bool prefer_64_row_tiles(int64_t M, int64_t N, int K) {
  const long sms = tile::sm_count(), tiles = (M + 63) / 64 * weight_tiles(N);
  return K <= 5120 && tiles <= sms && 10 * tiles >= 9 * sms;
}

// The launch for one BM-row tile of x (up to 64 rows): two blocks per SM
// where the weight tiles exceed one wave of single blocks, else one block of
// 12 stages (launch_for_rows says why; 8-bit codes: below).
// 8-bit codes in 64-row tiles keep 4 stages per block rather than 6: under
// Nsight Compute the 6-stage kernel (float16, (8192, 28672), M = 64) spent
// 38% of its warps' stall samples on long-scoreboard waits, its busiest
// instruction (9% of the samples) the first use of a unit's scales and zeros
// (loaded three steps ahead), with DRAM at 49% of its peak; fewer copies in
// flight ran faster. H200, g128 unless said, medians of three alternating
// rounds, 6 / 4 / 3 / 5 stages (us): float16 (8192, 28672) M = 64 107.9 /
// 99.4 / 102.5 / 102.6, M = 57 108.6 / 99.0 / 102.1 / 100.9, g64 111.7 /
// 103.3 / 106.5 / 105.4, g32 113.2 / 106.0 / 108.0 / 107.9, bfloat16 112.8 /
// 105.8 / 108.1 / 108.9; (4096, 28672) M = 64 49.3 / 49.3 / 54.2 / 48.5.
// 32-row tiles stay at 6: float16 (8192, 28672) M = 32 82.5 / 83.8 / 89.8 /
// 83.0, M = 24 80.7 / 82.4 / 89.6 / 81.0, bfloat16 M = 32 91.4 / 92.6 / 98.0
// / 91.3; 48-row tiles take 5, float16 6 / 4 / 5 stages, M = 48 92.9 / 90.8 /
// 89.6, M = 40 91.9 / 89.2 / 89.0. 4-bit codes measured level at 4 (M = 64
// 83.2 -> 83.0), 2-bit ones level or slower at 4 or 8 (M = 64 82.0 / 81.8 /
// 83.6, M = 32 67.0 / 68.1 / 66.1); 4-bit 16-row tiles slower at 4, 9 or 12
// (M = 16 63.0 / 66.1 / 64.3 / 66.0; ab_h200_sm90_ablations_m16_m64).
// 8-bit codes in 16-row tiles read scales and zeros three units ahead rather
// than two, and run without stream-K (whole tiles where they fill 3/4 of the
// slots, as wider tiles do): float16, two / three units (us), (8192, 28672)
// M = 16 80.8 / 76.5, M = 12 80.1 / 77.0, (4096, 28672) M = 16 50.0 / 44.4;
// g64 84.2 / 80.3, g32 87.5 / 84.1. bfloat16 (whose decode goes through
// float32) is mixed: (8192, 28672) M = 16 83.6 / 85.0, M = 12 82.5 / 84.9,
// (4096, 28672) M = 16 51.3 / 47.8 (and 48-row tiles at 5 stages, M = 48
// 96.7 -> 94.7); it takes the same rule.
// Three units for 2-bit codes in 32- or 64-row tiles measured slower (M = 64
// 82.0 -> 83.8, M = 32 67.0 -> 68.2). (scripts/results/ab_h200_sm90_w8_*.)
// One block per SM, 8-bit codes in 16- or 64-row tiles take 8 stages rather
// than 12 where the weight tiles are at most half the SMs (K split: shorter
// blocks, whose ring fills are more of their time), and the 4-bit rule
// elsewhere; scales three units ahead measured slower everywhere. H200,
// float16 g128 unless said, 12 / 8 stages / three units, medians of three
// alternating rounds (us): (14336, 4096) M = 16 29.7 / 29.2 / 30.3, M = 64
// 32.9 / 32.2 / 33.9; (4096, 4096) M = 16 17.4 / 16.4 / 17.9; but (4096,
// 14336), 112 tiles, M = 16 27.4 / 28.1 / 28.5, M = 12 27.6 / 29.1 / 28.7,
// M = 64 29.3 / 29.9 / 30.1, bfloat16 M = 16 28.5 / 29.2 / 30.2, g64 29.2 /
// 28.6 / 30.9. Again in another run, 12 / 8 stages where K is split: (14336,
// 4096) M = 16 29.8 / 29.5, M = 64 32.8 / 31.9; (4096, 4096) M = 16 14.9 /
// 14.4; (28672, 8192) M = 64 88.0 / 87.6. 4-bit codes level or slower so
// (M = 64 at (14336, 4096) 27.7 / 28.5, at (28672, 8192) 77.5 / 78.6, g64
// M = 32 25.2 / 27.0), 2-bit codes level (M = 32 24.2 / 24.2).
// (scripts/results/ab_h200_sm90_w8_one_block, ab_h200_sm90_one_block_split.)
template <int W, typename T, int BM>
void launch_one_tile(const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& scales, const at::Tensor& zeros,
                            const std::optional<at::Tensor>& bias, at::Tensor& y,
                            int64_t group_size) {
  constexpr int kTwoBlockStages = W != 8 ? 6 : BM == 64 ? 4 : BM == 48 ? 5 : 6;
  constexpr int kTwoBlockUnits = W == 8 && BM == 16 ? 3 : 2;
  const int64_t tiles = weight_tiles(qweight.size(0));
  if (tiles > tile::sm_count())
    return launch<W, T, BM, kTwoBlockStages, kTwoBlockUnits, 2>(x, qweight, scales, zeros, bias,
                                                               y, group_size);
  if constexpr (W == 8 && (BM == 16 || BM == 64)) {
    if (2 * tiles <= tile::sm_count())
      return launch<W, T, BM, 8, 4>(x, qweight, scales, zeros, bias, y, group_size);
  }
  launch<W, T, BM, 12, 4>(x, qweight, scales, zeros, bias, y, group_size);
}

// The tile, stage and split rules below and in launch() were measured with
// 4-bit codes; the 2- and 8-bit kernels take them as they are (their
// figures against the other paths: kernels.h), but for 8-bit codes' stages,
// units and stream-K where two blocks share an SM, and their stages with one
// block per SM where K is split (launch_one_tile).
template <int W, typename T>
void launch_for_rows(const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& scales, const at::Tensor& zeros,
                            const std::optional<at::Tensor>& bias, at::Tensor& y,
                            int64_t group_size) {
  const int64_t M = x.size(0);
  // Up to 64 rows: one tile of 16, 32, 48 or 64 rows of x (their own split rule;
  // a deeper ring of stages, as the weights' stream is most of the work).
  // Where the weight tiles alone fill more than one wave of single blocks,
  // two blocks per SM (6 stages each, 104 registers per consumer thread)
  // take the tiles in one wave and hide each other's latencies (H100, w4
  // g128, M = 64 at (8192, 28672): 93.5 -> 87.4 us; with fewer tiles than
  // SMs one block of 12 stages ran faster: (4096, 14336) 27.9 against 44.6).
  // Three blocks of 16-row tiles (consumers at 72 registers, each step
  // decoded and multiplied in two halves of two k16 slices: 18 more
  // instructions per step and warp) measured slower, more warps per scheduler
  // notwithstanding. H200, float16 w4 g128, medians of three alternating
  // rounds (us): (8192, 28672) M = 16 63.1 -> 67.6 (8 stages: 71.5), M = 12
  // 62.4 -> 66.7, g64 67.6 -> 71.3, g32 68.7 -> 73.7, bfloat16 (x not
  // permuted) 66.9 -> 71.0; against one block of 12 stages, forced where
  // that takes the tiles, (28672, 8192) 64.1 -> 62.3 (the staged kernel
  // that the policy picks there: 59.2), (4096, 14336) 23.0 -> 27.1.
  // Four consumer warpgroups instead (256 weight rows per block, one block
  // per SM, consumers at 112 registers: each x tile read serves twice the
  // codes) ran faster in some cells and slower in others, too mixed to carry
  // a second tile width for. H200, float16 w4 g128 unless said,
  // medians of two or three alternating rounds (us): (8192, 28672) M = 16
  // 63.4 -> 66.1, M = 32 69.6 -> 67.1, M = 64 85.9 -> 84.9, bfloat16 M = 16
  // 67.6 -> 65.4; (28672, 8192) M = 16 64.2 -> 59.4 (the staged kernel: 59.4);
  // (4096, 14336) M = 16 23.3 -> 30.7.
  // The tile is as narrow as M allows: the tensor cores' time per step grows
  // with its rows, and a 64-row tile for 32 rows or fewer took longer than
  // the stream of codes. H200, w4 g128, 64-row tile / narrow (us): M = 32 at
  // (8192, 28672) 84.4 / 70.7, (28672, 8192) 77.7 / 71.0, (4096, 14336)
  // 26.4 / 24.3, (14336, 4096) 28.3 / 26.3; M = 16 at (8192, 28672) 95.8 /
  // 66.2; M = 40 at (8192, 28672) 83.0 / 77.3, (28672, 8192) 79.3 / 74.7,
  // (4096, 14336) 27.2 / 25.3, (14336, 4096) 28.8 / 27.6, (4096, 4096) 16.5 /
  // 15.9. (Twice the stages per tile measured no faster: 70.7 -> 81.0 at
  // (8192, 28672), M = 32.)
  if (M <= 16) return launch_one_tile<W, T, 16>(x, qweight, scales, zeros, bias, y, group_size);
  if (M <= 32) return launch_one_tile<W, T, 32>(x, qweight, scales, zeros, bias, y, group_size);
  if (M <= 48) return launch_one_tile<W, T, 48>(x, qweight, scales, zeros, bias, y, group_size);
  if (M <= 64) return launch_one_tile<W, T, 64>(x, qweight, scales, zeros, bias, y, group_size);
  if (prefer_64_row_tiles(M, qweight.size(0), static_cast<int>(x.size(1))))
    return launch<W, T, 64, 12, 4>(x, qweight, scales, zeros, bias, y, group_size);
  if (prefer_narrow_tiles(M, qweight.size(0), static_cast<int>(x.size(1))))
    return launch<W, T, 128, 6, 2>(x, qweight, scales, zeros, bias, y, group_size);
  launch<W, T, 256, 5, 2>(x, qweight, scales, zeros, bias, y, group_size);
}

}  // namespace mpq::cuda::sm90

namespace mpq::cuda {

// The wgmma kernels for W-bit codes, instantiated in gemm_sm90_w<W>.cu.
template <int W>
void gemm_sm90_w(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                 const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
                 int64_t group_size) {
  tile::by_dtype(x, [&](auto t) {
    sm90::launch_for_rows<W, decltype(t)>(x, qweight, scales, zeros, bias, y, group_size);
  });
}

MPQ_FUSED_WIDTHS_ELSEWHERE(gemm_sm90_w);

}  // namespace mpq::cuda
