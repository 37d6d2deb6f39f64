// The host side of the staged fused kernels (gemm_kernel.cuh): which
// instantiation serves a call (rows of x, widths, groups), its grid, K splits,
// stream-K and where the split sums are added up, and the launch.
#pragma once

#include "gemm_kernel.cuh"

namespace mpq::cuda {

namespace gemm_detail {

// The most shared memory one row of x's resident slice (gemm_cuda_kernel's
// XR) may take per block, so that five blocks still fit an SM.
constexpr int kResidentXBytes = 40 * 1024;

// One row of x against 2-bit codes in late scaling over B columns
// (gemm_cuda_kernel's COLS), its x resident in KR k ranges per row: the
// shared memory per step (x, its sums, padding: cols_range chunks for each of
// the 4 * KR lane ranges), the zero chunks after the slice, and the most
// steps a slice holds within kResidentXBytes.
template <int KR>
constexpr int cols_step_bytes() {
  return 4 * KR * cols_range<KR>() * 16;
}
template <int KR>
constexpr int cols_zero_bytes() {
  return cols_zero<KR>() * 16;
}
template <int KR>
constexpr int cols_most_steps() {
  return (kResidentXBytes - cols_zero_bytes<KR>()) / cols_step_bytes<KR>();
}

// Rows of x per block: 8, 16, 32 or 64 (32 at most for 2-bit codes, whose
// 64-row stage would not fit three steps in 48 KB).
inline int x_tiles(int64_t M, int w_bit) {
  return M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 || w_bit == 2 ? 4 : 8;
}

// K splits of a grid of `blocks` blocks over several x tiles, each walking
// `steps` steps (launch_kernel's rule, which small_grid applies to the
// 128-row tiles): until the grid has about two blocks per SM, at least four
// steps per split.
inline long tiles_splits(long blocks, long steps) {
  return std::max(1L, std::min(2L * tile::sm_count() / blocks, std::max(1L, steps / 4)));
}

// K splits of a grid of `blocks` blocks of one x tile, each walking `steps`
// steps, on `slots` resident blocks (launch_kernel's rule for a streaming
// GEMV, whose workspace is tiny): past one wave, so that the last wave is
// full (up to 4 splits); within one, until about 4/5 of the wave is filled,
// up to 8 splits of at least 4 steps.
inline int tile_splits_one_x(long blocks, int steps, int slots) {
  if (blocks > slots)
    return tile::wave_filling_splits(blocks, steps, slots, std::min(4, std::max(1, steps / 4)),
                                     true, true);
  return (int)std::max<long>(
      1, std::min<long>({4L * slots / (5L * blocks), 8L, std::max(1, steps / 4)}));
}

// Whether M rows of x, in the x tiles gemm_bits takes for them (x_tiles: 9
// rows or more, so more than one tile of 8), against an [N, K] weight of
// W-bit codes take the small-grid kernel (gemm_bits): where
// the grid of 128-row tiles, split by launch_kernel's rule for several x
// tiles, would fill at most one wave of the SMs (2- and 4-bit codes) or half
// of one (8-bit codes). That kernel takes 64-row weight tiles (one W tile per
// warp), x tiles of 16 or 32 rows, and splits K down to single steps
// (launch_kernel's kSmallGrid), the splits added up in a thread block cluster
// (4- and 8-bit codes; 2-bit codes through the workspace, which ran faster
// for them: 576 x 576, M = 32, 3.6 against 4.7 us; run 10 mixed). Such
// weights are a small model's (the 128-row tiles gave SmolLM2's up
// projection, K = 576, 12 blocks and no split) or those whose K the wgmma
// kernel does not take. H200, float16, layers back to
// back from a CUDA graph (scripts/bench_chain.py, 8 pairs K -> N -> K, g64, us
// per layer), 128-row tiles / small grids (fp16 F.linear in brackets;
// scripts/results/ab_h200_small_grids.log): w4 (576, 1536) M = 16 5.3 / 4.1
// (3.9), M = 64 8.1 / 6.1 (4.1); (576, 576) M = 16 4.5 / 3.2 (3.2), M = 32
// 6.0 / 4.2, M = 64 10.0 / 6.0; (960, 2560) M = 16 6.1 / 4.9 (5.8); w8 (576,
// 576) M = 16 5.1 / 3.5, M = 64 8.5 / 6.1; w2 (576, 576) M = 32 6.4 / 3.7
// (3.2), (960, 2560) M = 16 7.0 / 4.4. Level where the 128-row tiles already
// fill half the GPU ((960, 2560) M = 128: 9.9 / 9.9). Single calls, L2
// flushed, w4 g128 (1024, 1024) M = 16 13.4 / 6.6 us, (2048, 2048) 9.4 / 8.6.
// Not taken (an earlier run): more splits than a cluster holds, through the
// workspace ((4096, 1024) M = 16 14.9 against 9.4 us), and the rule at a
// quarter of the SMs, which left (2048, 2048) and (1024, 4096) M = 16 on the
// 128-row tiles (21.2 and 18.8 us in that run against 13.5 and 10.4).
// One wave rather than half of one, same chain (run 12; the rules part only
// where the 128-row grid with its splits fills between half a wave and one):
// w4 (960, 2560) M = 96 9.4 -> 7.3, M = 128 9.9 -> 8.3 (fp16 6.0); (960,
// 5120) M = 16 6.5 -> 5.3 (6.8), M = 64 9.4 -> 7.8 (7.1); w2 (960, 2560) M =
// 128 8.4 -> 8.0, (960, 5120) M = 96 9.0 -> 8.6 but M = 48 7.5 -> 7.8; the
// other 63 of 72 cells of 2- and 4-bit codes within 0.1 us.
// 8-bit codes: (960, 2560) M = 96 9.2 -> 8.4 but M = 128 9.7 -> 10.4 (run 11),
// so they keep half a wave.
template <int W>
bool small_grid(int64_t M, int64_t K, int64_t N) {
  const int n_tiles = x_tiles(M, W);
  if (n_tiles == 1) return false;
  constexpr int SUPER_K = step_inputs(W);
  const long blocks = (M + 8 * n_tiles - 1) / (8 * n_tiles) * ((N + 127) / 128);
  const long steps = (K + SUPER_K - 1) / SUPER_K;
  const long fill = W == 8 ? 2 : 1;  // one wave, or half of one (above)
  return tile::small_grids() && fill * blocks * tiles_splits(blocks, steps) <= tile::sm_count();
}

template <typename T, int W, int N_TILES, int RT, int U, int WARPS, int MIN_BLOCKS, bool PAIRED,
          bool LATE, int KR = 1>
void launch_kernel(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                   const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
                   int64_t group_size) {
  constexpr int SUPER_K = step_inputs(W);
  static_assert(SUPER_K == tile::WeightRows<T, W, RT>::SUPER_K, "one step width");
  constexpr int BM = 8 * N_TILES;
  constexpr int STAGE_BYTES = BM * SUPER_K * 2;
  // As many steps in flight as fit the default 48 KB of dynamic shared memory, up to 4.
  constexpr int STAGES = std::min(4, 48 * 1024 / STAGE_BYTES);
  static_assert(STAGES >= 2, "a staged step must leave room for two");
  constexpr int SMEM = STAGES * STAGE_BYTES;
  // 2-bit codes in k ranges: only late scaling over B columns (gemm_cuda_kernel's COLS).
  constexpr bool COLS_ONLY = W == 2 && KR > 1;
  const auto kernel =
      gemm_cuda_kernel<T, W, N_TILES, RT, WARPS, STAGES, U, MIN_BLOCKS, COLS_ONLY || PAIRED,
                       LATE, KR, COLS_ONLY ? KR : 0, COLS_ONLY>;
  using Rows = tile::WeightRows<T, W, RT, KR>;
  const int M = x.size(0), K = x.size(1), N = qweight.size(0);
  const int x_rows = BM / KR, w_rows = Rows::ROWS * RT * WARPS;
  const int m_chunks = (M + x_rows - 1) / x_rows;
  const int row_blocks = (N + w_rows - 1) / w_rows;
  // A partial last step (gemm_cuda_kernel's TAIL) where K is not a whole number of them.
  const bool tail = K % Rows::STEP_K != 0;
  const int steps = (K + Rows::STEP_K - 1) / Rows::STEP_K;
  // Several x tiles with one W tile per warp: the small-grid kernel (gemm_bits).
  constexpr bool kSmallGrid = N_TILES > 1 && RT == 1;
  // Split K until the grid has about two blocks per SM. More (up to the three
  // that fit) only adds workspace traffic and pipeline fills: measured at M=64
  // on (8192, 28672) / (28672, 8192) / (4096, 14336) / (4096, 4096) the best
  // splits were 1 / 4 / 2 / 4-8, each the most that stays within two per SM.
  // A single x tile is a streaming GEMV with a tiny workspace: split until the
  // grid fills about 4/5 of one wave of resident blocks, up to 8 splits of at
  // least 4 steps. Measured on the H100 (w4 g128, M=1, splits 1..8): the best
  // grids held 448-512 blocks of the 660 slots, e.g. (14336, 4096) 24.8 us with
  // 4 splits -> 22.9 with 8, (4096, 14336) 25.6 -> 23.8 with 2, (8192, 28672)
  // 65.3 -> 64.4 with 1, (28672, 8192) 62.0 with 4, as before, when a fixed 4
  // was the rule. Checked again with the k-paired rows (H100, g128, M = 1,
  // medians of three alternating rounds, the rule / 1 / 2 / 3 / 4 / 6 splits
  // forced, us): w8 (28672, 8192) 96.1 (2 splits) / 110.4 / 96.1 / 97.2 /
  // 101.5 / 95.0, bfloat16 96.5 / 111.9 / 96.5 / 112.4 / 102.0 / 101.7; w4
  // 54.4 / 63.2 / 54.5 / 63.9 / 58.5 / 58.8; w8 (4096, 14336) 28.6 (1) / 28.7
  // / 32.4 / 30.7 / 30.8 / 30.3, w4 17.9 / 18.5 / 21.4 / 20.9 / 20.7 / 21.9;
  // w8 (28672, 4096) 52.6 (4) / 83.0 / 58.6 / 55.3 / 52.5 / 52.3: the rule's
  // count the fastest or within 1.1 us of it (branch exp/one-row-splits,
  // scripts/results/ab_h100_one_row_splits.log). 2-bit codes keep the fixed
  // 4 (half the bytes per step: at (8192, 28672) one split took 61.5 us
  // against 56.9 with 4), except in late
  // scaling over B columns (COLS, below), whose fewer instructions per step
  // take the rule above. H200, w2 g128, medians of three alternating rounds,
  // 4 splits / the rule (us): (8192, 28672) 37.3 / 36.2 (1 split), (4096,
  // 14336) 15.9 / 15.0 (2), (14336, 4096) 14.7 / 14.4 (8); (28672, 8192) and
  // (4096, 4096) 4 either way; 8 splits everywhere or 2 slower. In stream-K
  // instead (one block per slot, x resident over all of K, a row block's
  // parts in as many workspace slots as blocks it spans) it measured no
  // faster: H200, medians of three alternating rounds, this rule / stream-K
  // (us): float16 (8192, 28672) 36.3 / 36.9, (28672, 8192) 33.0 / 33.0,
  // (4096, 14336) 17.0 / 16.8, (14336, 4096) 14.3 / 21.9, (4096, 4096) 9.5 /
  // 10.8; bfloat16 38.3 / 37.1, 35.0 / 35.0; g64 36.9 / 37.7. A grid of more
  // than one wave (k-paired rows at (8192, 28672): 896 blocks, 660 slots) is
  // split so that its last wave is full (up to 4; of equally full waves the
  // most splits): 63.9 us with 1 split, 60.4 with 2, 59.9 with 4; w8 107.9
  // with 2, 98.9 with 4. Up to 6 or 8, whose 5 or 8 splits fill the waves
  // better by this count (0.97 / 0.99 against 0.91), ran slower on the H200
  // (w4 48.7 -> 50.6 / 52.8 us, bfloat16 49.3 -> 51.0 / 53.4, M = 3 51.6 ->
  // 52.8 / 55.8, w8 74.4 -> 76.8 / 75.2): shorter blocks cost more than the
  // last wave's idle slots. One row of x of 4- or 8-bit codes runs such a grid
  // in stream-K instead where it can (below).
  static tile::PerDevice slots_on;
  const int slots = slots_on.get([&] { return tile::resident_slots(kernel, WARPS * 32, SMEM); });
  if constexpr (KR == 2 && W != 2) {
    // One row of x: eight k ranges per row (tile::WeightRows), whose loads read
    // 512 bytes of a row at a time and whose grid has four times the blocks,
    // where that grid fits one wave unsplit. H100, g128, M = 1, KR = 2 / 8
    // (us): w4 (4096, 4096) 12.4 / 10.8, (14336, 4096) 21.1 / 20.1; w8 14.5 /
    // 13.8, 31.4 / 30.8. Past one wave the k-paired grid with its K splits
    // won: w4 (4096, 14336) 19.8 / 20.2, (28672, 8192) 57.5 / 61.4, (8192,
    // 28672) 60.1 / 62.7; w8 30.5 / 33.0, 101.1 / 101.6, 98.4 / 99.6.
    // Its x slice stays resident unsplit (kResidentXBytes, below).
    // Not taken past one wave either: eight ranges in stream-K (x resident
    // over all of K, up to 56 KB at four blocks per SM; branch
    // exp/one-row-ranges-sk), though their order of loads alone streams the
    // bytes faster when each step is refilled by itself (scripts/ldg_stream.cu
    // after do_bench's kind of flush, 5 blocks per SM: 49.9 against 52.6 us
    // at (8192, 28672), 50.4 / 53.9 at (28672, 8192)); this kernel asks for
    // two steps at once, and so its order takes 49.0 / 49.7, as a plain
    // read's (ldg_runs_h100.log). H100, g128, M = 1, medians of three
    // alternating rounds, eight ranges / k-paired stream-K or split grid
    // (us): float16 w4 (8192, 28672) 57.1 / 56.0, (28672, 8192) 59.9 / 56.0,
    // (4096, 14336) 21.4 / 18.9; bfloat16 57.3 / 56.2, 59.7 / 56.0; g64 62.6
    // / 62.2, 64.6 / 63.1; w8 98.3 / 96.9, 102.5 / 99.3, 31.4 / 29.2
    // (scripts/results/ab_h100_one_row_ranges_sk.log).
    using Ranges8 = tile::WeightRows<T, W, RT, 8>;
    constexpr int ROWS8 = Ranges8::ROWS * RT * WARPS;  // weight rows per block
    if (M == 1 && K % Ranges8::STEP_K == 0 && (N + ROWS8 - 1) / ROWS8 <= slots &&
        K * (int)sizeof(T) <= kResidentXBytes)
      return launch_kernel<T, W, N_TILES, RT, U, WARPS, MIN_BLOCKS, PAIRED, LATE, 8>(
          x, qweight, scales, zeros, bias, y, group_size);
  }
  const T* bias_ptr = bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Launches that overlap the kernel before (gemm_cuda_kernel's
  // wait_prerequisites) where the device and the build allow: the next
  // call's blocks start while this one's end (it calls launch_dependents
  // once past its main loop). Single calls after an L2 flush, where the
  // kernel before is not ours, level (8192 x 28672 w4 43.1 / 43.0 us with
  // the trigger at the kernel's start, scripts/results/ab_h200_pdl.log).
  // Not taken: asking L2 for the first steps' codes before the wait
  // (prefetch.global.L2), which gained nothing more in graphs and cost
  // single calls up to 1.3 us (4096 x 4096 w4 9.2 -> 10.5). The wgmma
  // kernel is launched so as well; the GEMV (only ever forced) in plain
  // stream order.
  // (The same check allows clusters, below.)
  static tile::PerDevice sm90_on;
  const bool sm90 = sm90_on.get([&] { return tile::sm90_launchable(kernel) ? 1 : 0; }) != 0;
  // One launch of `launched` over `grid` (in clusters of `cluster` blocks),
  // then the sum of its partial products where they went to the workspace ws.
  const auto run = [&](auto launched, dim3 grid, int smem, dim3 cluster, const at::Tensor& ws,
                       int per_split, bool cluster_sum) {
    tile::launch(launched, grid, WARPS * 32, smem, stream, cluster,
                 sm90 && tile::programmatic_launches(),
                 reinterpret_cast<const T*>(x.data_ptr()),
                 reinterpret_cast<const uint32_t*>(qweight.data_ptr()),
                 reinterpret_cast<const T*>(scales.data_ptr()),
                 reinterpret_cast<const T*>(zeros.data_ptr()), bias_ptr,
                 reinterpret_cast<T*>(y.data_ptr()),
                 ws.defined() ? ws.data_ptr<float>() : nullptr, M, N, K,
                 tile::Groups::of(group_size), per_split, cluster_sum);
    if (ws.defined()) tile::finish_split<T>(ws, bias_ptr, y, (int)ws.size(0), stream);
  };
  if constexpr (KR == 2 && W != 2) {
    // One row of x past one wave of k-paired row blocks: stream-K
    // (gemm_cuda_kernel's SK), one block per slot, x resident over all of K.
    // The split grid below ran (8192, 28672) as 3584 blocks of 8 steps in 5.4
    // waves, 12% slower than (28672, 8192) in one wave for the same bytes.
    // H200, M = 1, g128, medians of three alternating rounds, split grid /
    // stream-K (us): w4 (8192, 28672) 48.4 / 44.4, bfloat16 49.1 / 44.8, g64
    // 50.1 / 48.0; w8 73.8 / 71.6; with 4 blocks per SM instead of 5, 44.7.
    // Its two parts of a row block are added by finish_split: added in the
    // kernel instead, by the warp that finishes second (an atomic count per
    // warp's rows, in a buffer of counters per stream), one launch fewer
    // measured slower, finish_split / in the kernel (us): w4 (8192, 28672)
    // 43.2 / 43.8, bfloat16 43.8 / 44.7, g64 47.0 / 47.9, (4096, 28672) 26.7 /
    // 27.3; w8 71.7 / 72.4, bfloat16 73.2 / 73.2.
    // Nor within one wave, where the split grid leaves slots idle (each
    // block's x then only its items' steps, in their order, so that K =
    // 28672 fits; outputs the same; branch exp/one-row-sk-items). H100, M = 1,
    // g128, medians of three alternating rounds, split grid / stream-K (us):
    // float16 w4 (28672, 8192) 56.6 / 56.9, w8 99.6 / 99.6; bfloat16 56.6 /
    // 57.2, w8 99.6 / 100.0; g64 62.6 / 62.1; (14336, 4096) 19.3 / 19.3, w8
    // 30.0 / 30.0; (4096, 14336) 18.3 / 20.9, w8 29.2 / 31.0; (8192, 8192)
    // 21.7 / 22.3; with L2 emptied by a read, w4 (28672, 8192) 50.8 / 50.7,
    // w8 91.5 / 90.1 (scripts/results/ab_h100_one_row_sk_within_wave*.log).
    const int sk_smem = steps * KR * (SUPER_K / 8) * 16;
    if (M == 1 && N % w_rows == 0 && steps % U == 0 && row_blocks > slots &&
        sk_smem <= kResidentXBytes) {
      const auto sk = gemm_cuda_kernel<T, W, N_TILES, RT, WARPS, STAGES, U, MIN_BLOCKS, true,
                                       LATE, KR, KR, false, true>;
      // (at the most shared memory a slice may take: the count holds for every K)
      static tile::PerDevice sk_slots_on;
      const int sk_slots =
          sk_slots_on.get([&] { return tile::resident_slots(sk, WARPS * 32, kResidentXBytes); });
      // Shares of whole row blocks (`per` each, the fewest that divide the row
      // blocks evenly into a grid within the slots) for 4-bit codes where the
      // rows are short, if that grid fills enough of the slots: no row block
      // in two parts, y written by the blocks, no workspace and no second
      // kernel; but fewer blocks streaming at once (the loads alone of 8192 x
      // 28672 in 448 such blocks took 51.1 us against 48.9 in 660 even
      // shares, scripts/ldg_stream.cu). H100, M = 1, g128, medians of three
      // alternating rounds, even shares / whole (us), grid over the 660
      // slots: float16 (2048, 28672) 68% 20.7 / 18.4, (4096, 28672) 68% 32.6
      // / 31.1, bfloat16 32.4 / 31.4, (4096, 22016) 52% 26.8 / 26.2, (4096,
      // 40000) 95% 41.4 / 38.6; (8192, 32000) 76% 61.6 / 60.4, (8192, 40000)
      // 95% 74.1 / 72.4, (8192, 42240) 100% 77.7 / 76.2; not taken: (8192,
      // 28672) 68% 55.9 / 55.8, g64 62.0 / 61.7, (8192, 22016) 52% 45.4 /
      // 46.0, (14336, 28672) 68% 92.3 / 93.3, and 8-bit codes, e.g. (8192,
      // 28672) 96.9 / 100.7, (8192, 40000) 130.6 / 133.3, (4096, 28672) 52.7
      // / 53.6, (4096, 32000) 59.0 / 59.0 (scripts/results/ab_h100_sk_whole.log).
      // (the rule takes 4-bit codes only, so other widths search only when forced)
      if (const int whole = tile::sk_whole_row_blocks(); whole == 1 || (whole == -1 && W == 4)) {
        // (the search for `per` stops where the grid would fill less than half
        // the slots, which the rule never takes: a few steps per call, however
        // many row blocks)
        const int most = whole == 1 ? row_blocks : 2 * row_blocks / sk_slots;
        int per = (row_blocks + sk_slots - 1) / sk_slots;
        while (per <= most && row_blocks % per != 0) ++per;
        const int grid = row_blocks / per;
        const bool rule = per <= most &&
                          ((K <= 4096 && 2 * grid >= sk_slots) ||
                           (K <= 8192 && 4 * grid >= 3 * sk_slots));
        if (whole == 1 || rule)
          return run(sk, dim3(1, grid, 1), sk_smem, dim3(1, 1, 1), at::Tensor(), 1, false);
      }
      const int sk_blocks = std::min(sk_slots, row_blocks);
      // (a share of at least `steps` items: a row block in at most two parts)
      return run(sk, dim3(1, sk_blocks, 1), sk_smem, dim3(1, 1, 1),
                 at::empty({2, M, N}, x.options().dtype(at::kFloat)), 2, false);
    }
  }
  if constexpr (KR == 1 && N_TILES == 2 && RT == 2) {
    // The 16-row kernel (two blocks per SM for 4- and 8-bit codes, three for
    // 2-bit) where its grid is left unsplit (more than half as many row
    // blocks as SMs) yet does not fill the slots: stream-K through the ring,
    // one block per slot, each as many steps as the next, where that gives
    // each at least 8 steps (its prologue fills the ring). At (8192, 28672)
    // the split grid has 224 blocks of 64 steps, stream-K 264 of 54. H100,
    // g128, medians of three alternating rounds, split grid / stream-K (us):
    // float16 w4 (8192, 28672) M = 16 69.1 / 67.8, M = 9 68.2 / 67.1, g64
    // 73.2 / 69.4; bfloat16 70.3 / 66.9; w2 60.9 / 59.1; w8 110.7 / 109.8.
    // Not where the grid splits K already, whose slots it nearly fills and
    // whose workspace stream-K makes larger (a row block in up to six parts
    // at (28672, 8192) against four splits): w4 M = 16 (28672, 8192) 64.1 /
    // 64.9, (14336, 4096) 23.3 / 25.5, (4096, 14336) 24.6 / 25.1; w2 (28672,
    // 8192) 55.3 / 57.5 (scripts/results/ab_h100_stream_k16.log).
    // MPQ_OPS_CUDA_STREAM_K=0 keeps the split grid (A/B runs).
    // Not taken: two steps' scales and zeros per 32-bit load where groups
    // are one step (half the scalar loads, each touching 8 rows' sectors;
    // outputs the same; branch exp/scale-pairs). Mixed: H100, float16 w4
    // g128 M = 16, medians of five alternating rounds, 16-bit loads / pairs
    // (us): (8192, 28672) 65.3 / 64.9, M = 12 65.5 / 64.1, bfloat16 66.0 /
    // 64.9, (8192, 20480) 50.4 / 49.0, but (4096, 28672) 39.0 / 40.4 and
    // (14336, 28672) 104.0 / 106.8; w8 g64 113.5 / 113.5 in three rounds
    // (scripts/results/ab_h100_scale_pairs.log).
    const long runs = (long)row_blocks * (steps / U);
    if (tile::stream_k() && M <= x_rows && N % w_rows == 0 && steps % U == 0 && !tail &&
        tiles_splits(row_blocks, steps) == 1 && row_blocks < slots &&
        runs * U >= 8L * slots) {
      // (PAIRED and sm_90: mbarriers instead of a barrier per step,
      // gemm_cuda_kernel's MB; MPQ_OPS_CUDA_RING_SYNC=barrier keeps the barrier)
      const bool mb = PAIRED && sm90 && tile::ring_mbarriers();
      const auto sk = mb ? gemm_cuda_kernel<T, W, N_TILES, RT, WARPS, STAGES, U, MIN_BLOCKS,
                                            PAIRED, LATE, 1, 0, false, true, false, PAIRED>
                         : gemm_cuda_kernel<T, W, N_TILES, RT, WARPS, STAGES, U, MIN_BLOCKS,
                                            PAIRED, LATE, 1, 0, false, true>;
      const int sk_smem = SMEM + (mb ? 2 * STAGES * 8 : 0);
      static tile::PerDevice ring_slots_on[2];
      const int ring_slots = ring_slots_on[mb].get(
          [&] { return tile::resident_slots(sk, WARPS * 32, sk_smem); });
      // (std::min<long>(ring_slots, runs) here stopped nvcc 13.0's front end
      // with an internal error)
      const int sk_blocks = runs < ring_slots ? (int)runs : ring_slots;
      // A row block in at most this many parts: blocks take at least `share` items.
      const int share = U * (int)(runs / sk_blocks);
      const int parts = std::min(sk_blocks, (steps + share - 1) / share + 1);
      return run(sk, dim3(1, sk_blocks, 1), sk_smem, dim3(1, 1, 1),
                 at::empty({parts, M, N}, x.options().dtype(at::kFloat)), parts, false);
    }
  }
  const long blocks = (long)m_chunks * row_blocks;
  // One row of x against 2-bit codes in late scaling over B columns
  // (gemm_cuda_kernel's COLS), split at least so that a slice stays within
  // kResidentXBytes (cols_most_steps; groups of less than a step need that
  // kernel).
  const bool cols = W == 2 && LATE && N_TILES == 1 && M == 1;
  TORCH_INTERNAL_ASSERT(W != 2 || KR == 1 || (cols && group_size % 64 == 0),
                        "2-bit codes in k ranges: late scaling over B columns only");
  constexpr int cols_steps = cols_most_steps<KR>();
  const int one_tile_splits = tile_splits_one_x(blocks, steps, slots);
  const int splits =
      cols ? std::max(one_tile_splits, (steps + cols_steps - 1) / cols_steps)
      : N_TILES == 1 && W == 2 ? std::min(4, std::max(1, steps / 4))
      : N_TILES == 1 ? one_tile_splits
      : kSmallGrid ? [&] {
          // K split until the grid has about two blocks per SM, down to single
          // steps, into no more parts than a cluster adds up (kMaxCluster; for
          // 2-bit codes too, whose parts go through the workspace), and no
          // more than its steps per part need.
          const long most = std::max<long>(
              1, std::min<long>({2L * tile::sm_count() / blocks, steps, tile::kMaxCluster}));
          const int per = std::max(1L, (steps + most - 1) / most);
          return std::max(1, (steps + per - 1) / per);
        }()
                     : (int)tiles_splits(blocks, steps);
  if constexpr (W == 2 && KR == 1 && N_TILES == 1 && LATE) {
    // One row of x against 2-bit codes: k-paired rows (KR = 2, 32-row blocks)
    // where one range per row (64-row blocks) would split K and their grid of
    // twice the blocks fills a wave unsplit, so that no partial sums go through
    // the workspace and no second kernel adds them. Their order of loads alone
    // reads the 2-bit bytes of (8192, 28672) in 29.4 us after do_bench's kind
    // of flush, against 35.7 in the one-range order (16 rows x 64 bytes per
    // warp and step; scripts/results/ldg_orders_h100.log), yet where both grids
    // split K, or one range per row splits it not at all, neither is ahead by
    // much. H100, M = 1, medians of five alternating rounds, k-paired / one
    // range (us): taken, 14336 rows: float16 g128 K = 4096 15.6 / 16.5, 8192
    // 22.5 / 24.3, 14336 33.8 / 34.5; bfloat16 15.8 / 16.8; g64 16.7 / 18.1;
    // g256 15.3 / 16.0. Not taken: 4096 rows, K = 4096 / 8192 / 14336 / 28672
    // 11.1 / 10.3, 12.4 / 12.7, 15.7 / 16.3, 22.7 / 22.4; 8192 rows 13.3 /
    // 12.5, 17.5 / 16.9, 23.1 / 22.4, 37.2 / 37.6 (K = 28672, both split:
    // bfloat16 37.2 / 38.0, g64 40.2 / 42.3, ahead there but on one shape
    // only); 28672 rows (896 blocks of 32 rows for 660 slots) 23.3 / 21.8, 36.4
    // / 37.0, g256 34.8 / 33.3, g64 40.4 / 40.2
    // (scripts/results/ab_h100_w2_k_pairs_rule.log). MPQ_OPS_CUDA_W2_RANGES=2
    // takes them wherever K is a whole number of their steps, =1 never.
    const int ranges = tile::two_bit_ranges();
    if (cols && K % (2 * SUPER_K) == 0 && ranges == 2)
      return launch_kernel<T, W, N_TILES, RT, U, WARPS, MIN_BLOCKS, PAIRED, LATE, 2>(
          x, qweight, scales, zeros, bias, y, group_size);
    if (cols && splits > 1 && K % (2 * SUPER_K) == 0 && ranges == 0) {
      using Pairs = tile::WeightRows<T, W, RT, 2>;
      constexpr int PAIR_ROWS = Pairs::ROWS * RT * WARPS;
      const auto pairs = gemm_cuda_kernel<T, W, N_TILES, RT, WARPS, STAGES, U, MIN_BLOCKS, true,
                                          LATE, 2, 2, true>;
      static tile::PerDevice pair_slots_on;
      const int pair_slots =
          pair_slots_on.get([&] { return tile::resident_slots(pairs, WARPS * 32, SMEM); });
      const long pair_blocks = (N + PAIR_ROWS - 1) / PAIR_ROWS;
      const int pair_steps = K / Pairs::STEP_K;
      if (pair_blocks <= pair_slots && pair_steps <= cols_most_steps<2>() &&
          tile_splits_one_x(pair_blocks, pair_steps, pair_slots) == 1)
        return launch_kernel<T, W, N_TILES, RT, U, WARPS, MIN_BLOCKS, PAIRED, LATE, 2>(
            x, qweight, scales, zeros, bias, y, group_size);
    }
  }
  const int per_split = (steps + splits - 1) / splits;
  // One row of x: its whole slice per block in shared memory (gemm_cuda_kernel's
  // XR) where that takes at most kResidentXBytes.
  // H100, M = 1, g128, against the ring of staged steps (us): w4 at (4096,
  // 14336) 20.5 -> 18.3, (8192, 28672) 60.9 -> 59.2; w2 at (8192, 28672)
  // 56.4 -> 52.5, (28672, 8192) 57.5 -> 54.0.
  constexpr int XR = KR;
  const int resident_smem = cols ? per_split * cols_step_bytes<KR>() + cols_zero_bytes<KR>()
                                 : per_split * XR * (SUPER_K / 8) * 16;
  // Its x is paired for 2-bit codes too (their ring is not: a word's pairs
  // span two chunks that two threads copy), and 2-bit codes with groups of
  // 64 or more take one scale and zero per row and step (WIDE): 17% fewer
  // instructions in the loop (PRMTs 76 -> 8 per two steps). H100, w2 g128,
  // M = 1 (us): (8192, 28672) 47.6 -> 44.4, (28672, 8192) 47.8 -> 44.4,
  // (14336, 4096) 19.8 -> 18.8.
  const bool resident = N_TILES == 1 && M == 1 && !tail && resident_smem <= kResidentXBytes;
  // (2-bit codes take late scaling in groups of less than a step only in COLS)
  TORCH_INTERNAL_ASSERT(!(W == 2 && LATE) || cols || group_size % SUPER_K == 0);
  auto launched = kernel;
  TORCH_INTERNAL_ASSERT(!tail || (!LATE && KR == 1), "a partial last step: no late scaling");
  if constexpr (!LATE && KR == 1) {
    if (tail)
      launched = gemm_cuda_kernel<T, W, N_TILES, RT, WARPS, STAGES, U, MIN_BLOCKS, PAIRED, false,
                                  1, 0, false, false, true>;
  }
  TORCH_INTERNAL_ASSERT(!COLS_ONLY || resident, "2-bit codes in k ranges: a resident x");
  if constexpr (N_TILES == 1) {
    if (resident) {
      if constexpr (!COLS_ONLY)
        launched =
            gemm_cuda_kernel<T, W, N_TILES, RT, WARPS, STAGES, U, MIN_BLOCKS, true, LATE, KR, XR>;
      if constexpr (W == 2) {
        if (group_size % 64 == 0)
          launched = gemm_cuda_kernel<T, W, N_TILES, RT, WARPS, STAGES, U, MIN_BLOCKS, true, LATE,
                                      KR, XR, true>;
      }
    }
  }
  // The splits of a tile add up in a thread block cluster (sum_in_cluster)
  // where the device and the build allow, for one x tile of 4- or 8-bit codes
  // whose split grid runs in one wave of clusters (tile::clusters_fit_one_wave:
  // a cluster needs room for all its blocks in one GPC, so fewer blocks may
  // run at once than the occupancy says, e.g. 62 clusters of 4 for the 16-row
  // kernel's 264 slots); elsewhere in a float32 workspace that a second kernel
  // reduces. H100, g128, M = 1, clusters / workspace in one run, alternating
  // (us): w4 (4096, 4096) 12.2 / 13.1, (14336, 4096) 21.1 / 22.0, (28672,
  // 8192) 57.8 / 59.4; w8 14.3 / 15.8, 31.5 / 32.6, 100.3 / 102.4; w4 M = 3 at
  // (4096, 4096) 12.0 / 13.4. Slower in clusters: grids of more than one wave
  // (w4 M = 16 at (28672, 8192), 256 blocks for 248 places: 96.6 / 67.2) and,
  // fitting, 2-bit codes (M = 1 at (28672, 8192): 52.2 / 45.7, for reasons not
  // established); the 16-row kernel where it fits gained at most 4% (w8 at
  // (4096, 14336)), and the wgmma kernel's splits (M = 48..64) nothing.
  const dim3 grid(m_chunks, row_blocks, splits);
  const int x_smem = resident ? resident_smem : SMEM;
  // sum_in_cluster's partial sums, over the memory x took
  const int cluster_smem = std::max(x_smem, x_rows * w_rows * 4);
  const bool cluster_sum =
      (N_TILES == 1 || kSmallGrid) && W != 2 && sm90 && splits > 1 &&
      splits <= tile::kMaxCluster &&
      blocks * splits <= slots && tile::split_sum_in_cluster() &&
      tile::clusters_fit_one_wave(launched, grid, WARPS * 32, cluster_smem, dim3(1, 1, splits));
  const int smem = cluster_sum ? cluster_smem : x_smem;
  at::Tensor ws;
  if (splits > 1 && !cluster_sum) ws = at::empty({splits, M, N}, x.options().dtype(at::kFloat));
  run(launched, grid, smem, dim3(1, 1, cluster_sum ? splits : 1), ws, per_split, cluster_sum);
}

// Late scaling (tile::WeightRows::codes) where no step straddles a group and
// x has at most two tiles: with few x rows the dequantize's multiply and
// subtract per weight are most of a step's instructions, while the extra MMA
// for the sum of x costs one per x tile and word. Measured and not taken
// (H100, M = 1, g128, medians of three alternating rounds, us): 2-bit codes,
// whose 256-input steps span two groups, in late scaling over two B columns
// each zero outside one group's half of the step (a third fewer instructions
// per step, twice the MMAs): (8192, 28672) 45.4 -> 50.8, (28672, 8192) 46.0 ->
// 50.3 (their late scaling now puts each lane's range in a column of its own
// with no more MMAs: gemm_cuda_kernel's COLS); the sums of x made once per
// block from its resident slice instead of the MMA with A = 1 (half the
// MMAs, a longer prologue): w4 (8192, 28672) 60.3 -> 58.7 and (4096, 14336)
// 19.8 -> 18.9, but (28672, 8192) 57.8 -> 61.5 and w8 slower on four of five
// shapes (e.g. (4096, 14336) 29.4 -> 31.3). Nor for the 16-row kernel's ring:
// each warp made the sums of its share of a staged step's chunks (one such
// MMA per chunk and x tile) a step ahead into shared memory, which every warp
// then read, 36 MMAs per 4-bit step and warp instead of 48, the ring one step
// shallower; slower wherever it took 4- or 8-bit codes. H100, medians of three
// alternating rounds, per-warp MMAs / shared sums (us): float16 w4 M = 16
// (8192, 28672) 68.1 / 71.1, (28672, 8192) 63.9 / 64.7, (4096, 14336) 24.4 /
// 25.0; bfloat16 67.1 / 70.6; M = 9 66.9 / 70.3; w8 109.6 / 110.3; w2 g256
// 51.4 / 50.7 (scripts/results/ab_h100_xsum_shared.log).
template <typename T, int W, int N_TILES, int RT, int U, int WARPS = 4, int MIN_BLOCKS = 1>
void launch(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
            const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
            int64_t group_size) {
  // 2-bit codes' ring of staged steps stays unpaired: each warp pairs its x
  // fragments as it reads them. Measured and not taken: the ring paired as
  // for 4- and 8-bit codes, each thread copying both chunks that hold a
  // word's x and pairing them once landed (and in stream-K the mbarriers
  // that pairing allows; 204 -> 170 registers for 32-row tiles, outputs the
  // same bit for bit; branch exp/w2-ring-paired). Slower in every cell: H100,
  // g128, medians of three alternating rounds, unpaired / paired (us):
  // float16 M = 16 (8192, 28672) 59.0 / 60.5, (28672, 8192) 54.1 / 56.6,
  // (4096, 14336) 21.9 / 22.8, (14336, 4096) 20.6 / 20.9; M = 9 57.5 / 59.8;
  // bfloat16 61.2 / 62.6; g64 60.2 / 61.6; 32-row tiles (forced) M = 32 81.7
  // / 90.3 (scripts/results/ab_h100_w2_ring_paired.log). Nor pairing through
  // shuffles, the copies left as they are (a lane per chunk, each swapping
  // its landed chunk with its neighbour's and writing its own half of the
  // pair, the mbarriers in stream-K; outputs the same; branch
  // exp/w2-shfl2): unpaired / shuffled (us) float16 M = 16 (8192, 28672)
  // 59.6 / 61.4, (28672, 8192) 55.6 / 56.9; bfloat16 61.8 / 63.7
  // (scripts/results/ab_h100_codes_ring_w2_shfl.log).
  constexpr bool PAIRED = W != 2;
  constexpr int SUPER_K = tile::WeightRows<T, W, RT>::SUPER_K;
  // (groups of whole steps: then so is K)
  const bool late = N_TILES <= 2 && group_size % SUPER_K == 0;
  // Up to 4 rows of x, 4- and 8-bit codes: k-paired rows (tile::WeightRows),
  // whose loads read 128 bytes of a row at a time, and for one row eight
  // ranges (launch_kernel). With late scaling or without: a lane's chunk of a
  // range lies in one group either way. H200, M = 1 / 3, groups smaller than
  // a step (k-paired against one range per row, us): w4 g64 (28672, 8192)
  // 63.0 -> 51.2 / 68.7 -> 53.1, (8192, 28672) 54.9 -> 51.8 / 63.8 -> 54.4,
  // (4096, 4096) 11.4 -> 10.3; w4 g32 (28672, 8192) 69.2 -> 54.9; w8 g32
  // (28672, 8192) 105.8 -> 85.0 / 104.3 -> 81.4, (4096, 14336) 29.7 -> 25.7.
  if constexpr (N_TILES == 1 && RT == 1 && W != 2) {
    if (x.size(0) <= 4 && x.size(1) % (2 * SUPER_K) == 0) {
      if (late)
        return launch_kernel<T, W, N_TILES, RT, U, WARPS, MIN_BLOCKS, PAIRED, true, 2>(
            x, qweight, scales, zeros, bias, y, group_size);
      return launch_kernel<T, W, N_TILES, RT, U, WARPS, MIN_BLOCKS, PAIRED, false, 2>(
          x, qweight, scales, zeros, bias, y, group_size);
    }
  }
  // One row of x, 2-bit codes, groups of 64 or more: late scaling over B
  // columns (gemm_cuda_kernel's COLS), whatever the group's size. H200,
  // medians of three alternating rounds, against scaling before the MMAs
  // (g64, g128) and late scaling of whole steps with an MMA for the sums of x
  // (g256), us: float16 g128 (8192, 28672) 41.5 -> 37.2, (28672, 8192) 41.9
  // -> 33.6, (14336, 4096) 17.1 -> 14.9, (4096, 4096) 10.3 -> 9.4; g64 42.5 ->
  // 39.2, g256 38.0 -> 32.6; bfloat16 g128 42.0 -> 37.7, 43.0 -> 35.2 (loop
  // instructions per two steps: float16 586 -> 329, bfloat16 663 -> 408).
  // Error of y against float64 lower too (float16 g128 512 -> 287 ppm: no
  // float16 rounding of each weight).
  // launch_kernel takes k-paired rows (gemm_cuda_kernel's COLS with KR = 2:
  // two ranges per step, a row's 128 bytes at a time, 32-row blocks) instead
  // where its rule or MPQ_OPS_CUDA_W2_RANGES says.
  if constexpr (W == 2 && N_TILES == 1) {
    if (x.size(0) == 1 && group_size % 64 == 0 && x.size(1) % SUPER_K == 0)
      return launch_kernel<T, W, N_TILES, RT, U, WARPS, MIN_BLOCKS, PAIRED, true, 1>(
          x, qweight, scales, zeros, bias, y, group_size);
  }
  if constexpr (N_TILES <= 2) {
    if (late)
      return launch_kernel<T, W, N_TILES, RT, U, WARPS, MIN_BLOCKS, PAIRED, true, 1>(
          x, qweight, scales, zeros, bias, y, group_size);
  }
  launch_kernel<T, W, N_TILES, RT, U, WARPS, MIN_BLOCKS, PAIRED, false, 1>(
      x, qweight, scales, zeros, bias, y, group_size);
}

// Whether 5 to 8 rows of x against W-bit codes take the 16-row kernel
// (gemm_bits' case 2) rather than the 8-row one: 4-bit codes where K > N
// and the 16-row kernel's split grid (K split until about two blocks per
// SM) fills nine tenths of its two blocks per SM or more. H100, float16 w4
// g128, M = 8, medians of three alternating rounds, 8-row / 16-row kernel
// (us): (28672, 8192) 65.7 / 63.3, (14336, 4096) 23.6 / 23.0, g32 (28672,
// 8192) 81.8 / 80.7; but (4096, 1024) 9.2 / 9.7 (64 blocks), (4096, 4096)
// 12.9 / 13.2, (8192, 28672) 62.5 / 66.5 in stream-K, M = 5 62.8 / 66.1,
// (4096, 14336) 22.1 / 24.0 (scripts/results/ab_h100_x16_for_5_to_8.log).
// MPQ_OPS_CUDA_X16=1 takes it for all such rows of 4-bit codes, =0 for none
// (tests of both kernels at these rows, A/B runs).
template <int W>
bool x16_for_few_rows(int64_t M, int64_t K, int64_t N) {
  if (W != 4 || M < 5 || M > 8) return false;
  if (const char* v = std::getenv("MPQ_OPS_CUDA_X16")) return std::strcmp(v, "0") != 0;
  const long row_blocks = (N + 127) / 128, steps = (K + step_inputs(W) - 1) / step_inputs(W);
  return K > N && 10 * row_blocks * tiles_splits(row_blocks, steps) >= 9 * 2L * tile::sm_count();
}

template <typename T, int W>
void gemm_bits(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
               int64_t group_size) {
  const bool small = small_grid<W>(x.size(0), x.size(1), qweight.size(0));
  if constexpr (W == 4) {
    if (x16_for_few_rows<W>(x.size(0), x.size(1), qweight.size(0)))
      return launch<T, W, 2, 2, 2>(x, qweight, scales, zeros, bias, y, group_size);
  }
  switch (x_tiles(x.size(0), W)) {
    // One W tile per warp for one x tile: twice the warps, as many MMAs per weight.
    // Five blocks per SM (late scaling needs 105 registers uncapped, which
    // leaves four): the single-tile kernel is bound by loads in flight.
    // Measured and not taken (H100, g128, M = 1, medians of three
    // alternating rounds, us): three steps in flight (w4 (8192, 28672) 60.1
    // -> 62.9, w8 98.7 -> 102.6), four at four blocks per SM (59.9, 98.0),
    // six blocks (59.7, 98.7), eight warps per block (61.1, 99.8); for 2-bit
    // codes other split counts than 4 (2 / 3 / 6 / 8 at (8192, 28672): 49.1 /
    // 47.1 / 45.5 / 45.9 against 45.5) and three steps in flight (46.9); on
    // the H200, for their late scaling over B columns (one round, us), two /
    // three / four steps in flight at five / four / four blocks per SM:
    // (8192, 28672) 36.4 / 37.3 / 39.3, (28672, 8192) 33.1 / 33.4 / 35.1,
    // (4096, 14336) 15.2 / 13.8 / 14.6, bfloat16 (8192, 28672) 38.8 / 37.7 /
    // 42.0 (M = 4, whose kernel spills with four: 53.2 / 52.4 / 67.7). Nor
    // two 16-row tiles per warp there (each x fragment feeding two MMAs;
    // branch exp/w2-rt2). H100, M = 1, medians of three alternating rounds,
    // one tile / two at three blocks per SM / two with one step in flight at
    // four (us): float16 g128 (8192, 28672) 37.0 / 37.1 / 48.5, (28672, 8192)
    // 37.5 / 37.9 / 44.8, (4096, 14336) 15.6 / 16.8 / 17.1; bfloat16 38.1 /
    // 37.8 / 48.1; g64 41.1 / 40.7 / 52.1 (scripts/results/ab_h100_w2_rt2.log).
    // Nor k-paired rows with registers capped for seven or six blocks per SM
    // (branch exp/w2-pairs-occupancy): k-paired at five / seven / six blocks
    // (us), float16 g128 (8192, 28672) 37.0 / 39.2 / 40.0, (28672, 8192) 37.4
    // / 47.1 / 46.4 (scripts/results/ab_h100_w2_pair_occupancy.log).
    // Also not taken: the codes brought in by cp.async into a ring of 3 / 4 /
    // 6 steps in shared memory, each thread reading back its own chunks (no
    // barrier; 95 -> 66 registers). H200, against the loads into registers
    // (us): w4 M = 1 (8192, 28672) 52.3 -> 52.2 / 58.3 / 64.5, (28672, 8192)
    // 49.0 -> 56.2 / 56.8 / 59.9, w8 75.5 -> 82.0 / 90.6 / 94.7; the 16-row
    // kernel so (188 -> 132 registers) w4 70.2 -> 75.0 / 74.4 / 85.4. More
    // bytes in flight made it slower, as more steps in registers had. With L2
    // emptied by a read (where a plain read of the w4 bytes at (8192, 28672)
    // takes 31.4 us against the kernel's 42), three / four steps in flight at
    // four blocks per SM did not help either (H200, float16 g128, M = 1,
    // medians of three alternating rounds, us): w4 (8192, 28672) 42.7 -> 47.0
    // / 41.9, (28672, 8192) 43.7 -> 54.0 / 61.7, w8 63.2 -> 67.0 / 62.1; in
    // layers back to back (bench_chain.py) 40.1 -> 47.3 / 48.0 and w8 60.3 ->
    // 69.2 / 67.4, though (4096, 14336) w8 18.9 -> 17.3 / 17.1
    // (scripts/results/ab_h200_one_row_depth_clean.log); on an H100 likewise,
    // w4 (8192, 28672) 50.0 -> 54.5 / 51.6, (28672, 8192) 51.5 -> 56.2 / 63.4
    // (ab_h100_one_row_depth_clean.log).
    // (5 to 8 rows of 4-bit codes take case 2 where x16_for_few_rows says.)
    case 1: return launch<T, W, 1, 1, 2, 4, 5>(x, qweight, scales, zeros, bias, y, group_size);
    // 2-bit codes: one step in flight and three blocks per SM (H100, M = 16,
    // g128: (8192, 28672) 70.0 -> 67.8 us, (28672, 8192) 65.2 -> 61.7; 4- and
    // 8-bit codes measured slower so, e.g. w4 at (8192, 28672) 71.2 -> 85.4,
    // and with two steps in flight under the 168 registers of three blocks
    // too: 71.1 -> 73.6, (28672, 8192) 66.9 -> 69.9, bfloat16 73.1 -> 80.7).
    // Its 188 registers leave 7-8 warps per SM, and at (8192, 28672) its 224
    // blocks (no split) keep DRAM at 44% and the issue slots at 36% (ncu), but
    // more warps lost: one W tile per warp at four or five blocks per SM with
    // K splits up to the slots, 71.6 -> 81.3 / 85.7 us ((28672, 8192) 67.1 ->
    // 74.5), their splits summed in clusters no better; three or four steps in
    // flight at two blocks, 72.2 -> 74.4 / 79.3. Nor did scaling before the
    // MMAs instead of late, which frees 19 registers (168: three blocks per
    // SM, no spills) but doubles the error against float64 (208 -> 408 ppm),
    // nor late scaling capped at 168 registers (12 bytes of spills; bfloat16
    // 64). H100, g128, medians of two alternating rounds, late at two blocks
    // / early at three / late at three (us): float16 (28672, 8192) M = 16
    // 63.8 / 66.3 / 69.5, M = 12 63.9 / 66.5 / 69.2, (8192, 28672) 68.3 /
    // 70.5 / 73.7, (4096, 14336) 24.7 / 25.0 / 25.5, (14336, 4096) 23.3 / 24.2
    // / 24.8; bfloat16 (28672, 8192) 64.6 / 68.7 / 86.3
    // (scripts/results/ab_h100_two_tile_occupancy.log, branch
    // exp/two-tile-occupancy). Nor blocks of eight warps (256 rows, one block
    // per SM, the same warps per SM), whose one copy of each step of x serves
    // twice the rows (half the copies and reads of x from L2): H100, 4-bit
    // codes, g128, medians of three alternating rounds, four / eight warps
    // (us): float16 (8192, 28672) M = 16 65.2 / 66.2 in stream-K, M = 9 64.6
    // / 65.5, (28672, 8192) 63.6 / 66.1; bfloat16 65.9 / 66.6
    // (scripts/results/ab_h100_x16_eight_warps.log, branch exp/x16-eight-warps).
    case 2:
      if constexpr (W == 2) {
        if (small)
          return launch<T, W, 2, 1, 1>(x, qweight, scales, zeros, bias, y, group_size);
        return launch<T, W, 2, 2, 1, 4, 3>(x, qweight, scales, zeros, bias, y, group_size);
      } else {
        if (small)
          return launch<T, W, 2, 1, 2>(x, qweight, scales, zeros, bias, y, group_size);
        return launch<T, W, 2, 2, 2>(x, qweight, scales, zeros, bias, y, group_size);
      }
    case 4:
      if (small)
        return launch<T, W, 4, 1, 1>(x, qweight, scales, zeros, bias, y, group_size);
      return launch<T, W, 4, 2, 1>(x, qweight, scales, zeros, bias, y, group_size);
    default:
      // 4-bit: three blocks per SM (registers capped at 168) measured faster
      // than two (M=64: 165 -> 157 us at (8192, 28672), 198 -> 136 us at
      // (28672, 8192)); 8-bit codes would spill under that cap. (4-bit codes
      // spill a little under it too: ptxas -v, sm_90a, 4-36 bytes of spill
      // stores by dtype and a partial last step.)
      if constexpr (W != 2) {
        // Small grids past 32 rows keep x tiles of 32 rows (as 2-bit codes
        // do): twice the blocks or more of 64-row x tiles for the same weight
        // tiles and splits. H200, float16, layers back to back
        // (scripts/bench_chain.py, 8 pairs, g64, us per layer), x tiles of 64
        // / 32 rows (fp16 F.linear in brackets;
        // scripts/results/ab_h200_small_grids.log, runs 8 and 10): M = 64 w4
        // (576, 576) 4.1 / 3.5 (3.2), (576, 1536) 5.2 / 4.9 (4.1), (960,
        // 2560) 6.4 / 6.3 (5.9); w8 4.4 / 3.7, 5.3 / 5.1, but (960, 2560) 6.4
        // / 6.7; M = 128 w4 (576, 576) 4.4 / 3.9 (3.2), (576, 1536) 6.7 / 6.3
        // (4.0), w8 4.5 / 4.2, 6.8 / 6.7; M = 80 and 96 alike.
        if (small)
          return launch<T, W, 4, 1, 1>(x, qweight, scales, zeros, bias, y, group_size);
        return launch<T, W, 8, 2, 1, 4, W == 4 ? 3 : 1>(x, qweight, scales, zeros, bias, y,
                                                          group_size);
      }
  }
}

}  // namespace gemm_detail

// The staged kernels for W-bit codes, fp16 or bf16 x; instantiated once per
// width in gemm_w<W>.cu, like gemv_w.
template <int W>
void gemm_w(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
            const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
            int64_t group_size) {
  tile::by_dtype(x, [&](auto t) {
    gemm_detail::gemm_bits<decltype(t), W>(x, qweight, scales, zeros, bias, y, group_size);
  });
}

MPQ_FUSED_WIDTHS_ELSEWHERE(gemm_w);

}  // namespace mpq::cuda
