// Where the wgmma kernels (gemm_sm90.cuh) serve, and the entry that picks the
// code width's instantiation (gemm_sm90_w2.cu, gemm_sm90_w4.cu, gemm_sm90_w8.cu).
#include "gemm_sm90.cuh"

namespace mpq::cuda {

bool sm90_preferred(int64_t M, int64_t N, int64_t K, int64_t w_bit) {
  if (M > kSm90MaxRows) return false;
  if (w_bit == 8)
    return M > kGemmMaxRowsSm90W8 || (M > kGemmMaxRowsSm90W8Large && N * K >= kSm90W8LargeCodes);
  if (w_bit == 2) return M > kGemmMaxRowsSm90W2;
  if (w_bit != 4) return false;
  if (M > kGemmMaxRowsSm90) return true;
  return M > kGemmMaxRowsSm90Wide && 4 * sm90::weight_tiles(N) >= 3 * tile::sm_count() &&
         tile::peak_dram_gbps() >= kSm90WideMinGbps;
}

bool sm90_supported(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                    const at::Tensor& zeros, int64_t w_bit, int64_t group_size) {
  if (!sm90::kBuilt || (w_bit != 2 && w_bit != 4 && w_bit != 8)) return false;
  // Groups of whole step pairs, or of 32 / 64 whose scales and zeros a block
  // reads 8 / 4 bytes at a time (gemm_sm90_kernel's FINE).
  const int64_t fine_bytes = group_size == 32 ? 8 : group_size == 64 ? 4 : 0;
  const auto aligned = [&](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % fine_bytes == 0;
  };
  if (group_size % (2 * sm90::kStepK) != 0 &&
      (fine_bytes == 0 || !aligned(scales) || !aligned(zeros)))
    return false;
  // Compute capability 9.0 exactly: sm_90a code runs on nothing else.
  static const auto is_sm90 = [] {
    std::vector<bool> v(c10::cuda::device_count());
    for (size_t d = 0; d < v.size(); ++d) {
      int major = 0, minor = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d));
      v[d] = major == 9 && minor == 0;
    }
    return v;
  }();
  return is_sm90[x.get_device()] &&
         (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) &&
         x.size(1) % (2 * sm90::kStepK) == 0 && x.size(0) < (int64_t{1} << 30) &&
         qweight.size(0) < (int64_t{1} << 30) && aligned16(x) && aligned16(qweight) &&
         // scales' and zeros' offsets in 32 bits: [N, K / group] elements with
         // groups of 32 or more, at most half qweight's elements (2-bit codes)
         qweight.numel() < (int64_t{1} << 33);
}

void gemm_sm90_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                    const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
                    int64_t w_bit, int64_t group_size) {
  if (w_bit == 2) return gemm_sm90_w<2>(x, qweight, scales, zeros, bias, y, group_size);
  if (w_bit == 8) return gemm_sm90_w<8>(x, qweight, scales, zeros, bias, y, group_size);
  gemm_sm90_w<4>(x, qweight, scales, zeros, bias, y, group_size);
}

}  // namespace mpq::cuda
