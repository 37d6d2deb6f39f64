// mpq::dequantize on the CPU.
#include <torch/library.h>

#include "../mpq.h"
#include "unpack.h"

namespace mpq::cpu {

at::Tensor dequantize_cpu(const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t w_bit, int64_t group_size) {
  const int64_t K = infer_k("mpq::dequantize", qweight, w_bit);
  const auto shape = check_weight("mpq::dequantize", qweight, scales, zeros, w_bit, group_size, K);
  return dequantize_tensor(qweight.contiguous(), scales.contiguous(), zeros.contiguous(), K, w_bit,
                           shape.group_size, /*as_float=*/false);
}

TORCH_LIBRARY_IMPL(mpq, CPU, m) { m.impl("dequantize", &dequantize_cpu); }

}  // namespace mpq::cpu
