// Host entry of the fused GEMV: which inputs it serves and the code-width dispatch.
#include "gemv.cuh"
#include "kernels.h"

namespace mpq::cuda {

bool gemv_supported(const at::Tensor& x, const at::Tensor& qweight, int64_t w_bit) {
  const int64_t K = x.size(1);
  const int64_t super_k = 4 * 4 * (32 / w_bit);
  const auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  return (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) &&
         x.size(0) <= (w_bit == 2 ? kGemvMaxRows / 2 : kGemvMaxRows) && K % super_k == 0 &&
         K < (int64_t{1} << 22) &&  // group index in float32 (gemv.cuh)
         aligned(x) && aligned(qweight);
}

void gemv_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
               int64_t w_bit, int64_t group_size) {
  switch (w_bit) {
    case 2: return gemv_w<2>(x, qweight, scales, zeros, bias, y, group_size);
    case 4: return gemv_w<4>(x, qweight, scales, zeros, bias, y, group_size);
    default: return gemv_w<8>(x, qweight, scales, zeros, bias, y, group_size);
  }
}

}  // namespace mpq::cuda
