// The fused GEMV kernels for 8-bit codes (one file per width, so they build in parallel).
#include "gemv.cuh"

namespace mpq::cuda {

template <>
void gemv_w<8>(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
                int64_t group_size) {
  if (x.scalar_type() == at::kHalf) {
    gemv_detail::gemv_bits<__half, 8>(x, qweight, scales, zeros, bias, y, group_size);
  } else {
    gemv_detail::gemv_bits<__nv_bfloat16, 8>(x, qweight, scales, zeros, bias, y, group_size);
  }
}

}  // namespace mpq::cuda
