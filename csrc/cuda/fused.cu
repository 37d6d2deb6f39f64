// Host entry of the fused kernels (gemv.cuh, gemm.cuh): which inputs they
// serve, which one takes how many rows of x, and the code-width dispatch.
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "gemm.cuh"
#include "gemv.cuh"
#include "kernels.h"

namespace mpq::cuda {

bool fused_supported(const at::Tensor& x, const at::Tensor& qweight, int64_t w_bit) {
  const int64_t K = x.size(1);
  // K in whole lanes' chunks: a K that is not a whole number of steps takes
  // the staged kernel with a partial last step (gemm_cuda_kernel's TAIL), as
  // models with a hidden size of 576 or 960 need (else dequantize + cuBLAS,
  // two launches and the weight's float copy written and read back each call).
  // 32-bit element offsets (tile::WeightRows): qweight, and with it the
  // smaller scales and zeros, under 2^31 elements.
  return (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) &&
         K % lane_inputs(w_bit) == 0 && K < (int64_t{1} << 22) &&
         qweight.numel() < (int64_t{1} << 31) && aligned16(x) && aligned16(qweight);
}

MatmulKernel choose_kernel(const at::Tensor& x, const at::Tensor& qweight,
                           const at::Tensor& scales, const at::Tensor& zeros, int64_t w_bit,
                           int64_t group_size) {
  if (!fused_supported(x, qweight, w_bit)) return MatmulKernel::Dequantize;
  const int64_t M = x.size(0);
  // Only the staged kernel takes a partial last step (sm90_supported checks its own K).
  const bool whole_steps = x.size(1) % step_inputs(w_bit) == 0;
  const int64_t gemv_max = w_bit == 2 ? kGemvMaxRows / 2 : kGemvMaxRows;
  // MPQ_OPS_CUDA_KERNEL=gemv|gemm|dequantize forces a path wherever it can
  // serve the input: for tests of every path and benchmarks of the policy.
  const auto sm90 = [&] { return sm90_supported(x, qweight, scales, zeros, w_bit, group_size); };
  if (const char* forced = std::getenv("MPQ_OPS_CUDA_KERNEL")) {
    if (std::strcmp(forced, "gemv") == 0 && M <= gemv_max && whole_steps)
      return MatmulKernel::Gemv;
    if (std::strcmp(forced, "gemm") == 0) return MatmulKernel::Gemm;
    if (std::strcmp(forced, "sm90") == 0 && sm90()) return MatmulKernel::Sm90;
    if (std::strcmp(forced, "dequantize") == 0) return MatmulKernel::Dequantize;
  }
  if (sm90_preferred(M, qweight.size(0), x.size(1), w_bit) && sm90()) {
    // 2-bit codes up to 64 rows against few weight rows (where the staged
    // kernel's 128-row tiles would not fill one wave: gemm_detail::small_grid):
    // its small grids, not the wgmma kernel. H200, float16, layers back to back
    // (scripts/bench_chain.py, 8 pairs, g64, us per layer), this policy / the
    // wgmma kernel (scripts/results/ab_h200_small_grids.log, run 9): 1024 x
    // 1024 M = 24 3.7 / 4.1, M = 48 3.9 / 4.4, M = 64 4.1 / 5.1; 576 x 1536
    // M = 64 4.7 / 5.4 (its down projection); 2048 x 2048 M = 24 4.9 / 5.5,
    // M = 64 6.3 / 6.4, but M = 48 6.2 / 5.9. 4- and 8-bit codes were slower
    // so in most cells (run 7).
    if (w_bit == 2 && M <= 64 && gemm_detail::small_grid<2>(M, x.size(1), qweight.size(0)))
      return MatmulKernel::Gemm;
    // 4-bit codes from 65 to 96 rows (two 64-row tiles of the wgmma kernel,
    // three 32-row x tiles of the small grids) against weights of at most
    // 1536 inputs and outputs: the small grids too. Same chains, g64, this
    // policy / the wgmma kernel forced (fp16 F.linear in brackets;
    // scripts/results/ab_h200_w4_small_grid_policy.log, run 2), M = 65..96:
    // 576 x 1536 4.9 / 5.7 (3.9-4.0), 1024 x 1024 4.8 / 5.8-6.3 (4.7), 1280 x
    // 1280 5.6-5.7 / 6.8-7.2 (4.8-5.1), 1536 x 1536 6.5-6.6 / 7.5-7.9 (5.5-5.6).
    // Not at 64 rows or fewer (one wgmma tile; run 1, 1024 x 1024 M = 48 5.6
    // against 4.6), nor against larger weights (1024 x 2048 M = 72 7.4
    // against 6.9, 2048 x 2048 10.7 against 8.1), nor for 8-bit codes (level
    // or slower in every cell of run 1).
    if (w_bit == 4 && M > 64 && M <= 96 && x.size(1) <= 1536 && qweight.size(0) <= 1536 &&
        gemm_detail::small_grid<4>(M, x.size(1), qweight.size(0)))
      return MatmulKernel::Gemm;
    return MatmulKernel::Sm90;
  }
  if (M <= kGemmMaxRows) return MatmulKernel::Gemm;
  return MatmulKernel::Dequantize;
}

// f(std::integral_constant<int, W>{}) for the code width W = w_bit.
template <typename F>
static void by_width(int64_t w_bit, F&& f) {
  switch (w_bit) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

void gemv_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
               int64_t w_bit, int64_t group_size) {
  by_width(w_bit, [&](auto w) { gemv_w<w.value>(x, qweight, scales, zeros, bias, y, group_size); });
}

void gemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
               int64_t w_bit, int64_t group_size) {
  by_width(w_bit, [&](auto w) { gemm_w<w.value>(x, qweight, scales, zeros, bias, y, group_size); });
}

}  // namespace mpq::cuda
