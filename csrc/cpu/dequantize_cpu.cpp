// mpq::dequantize on the CPU.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../mpq.h"
#include "unpack.h"

namespace mpq::cpu {

at::Tensor dequantize_cpu(const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t w_bit, int64_t group_size) {
  const int64_t K = infer_k("mpq::dequantize", qweight, w_bit);
  const auto shape = check_weight("mpq::dequantize", qweight, scales, zeros, w_bit, group_size, K);
  auto out = at::empty({shape.N, K}, scales.options());
  if (out.numel() == 0) return out;
  const auto q = qweight.contiguous();
  const auto s = scales.contiguous();
  const auto z = zeros.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dequantize_cpu", [&] {
    const int32_t* qp = q.data_ptr<int32_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, shape.N, 16, [&](int64_t n0, int64_t n1) {
      dequantize_rows<scalar_t, scalar_t>(qp, sp, zp, n0, n1, K, w_bit, shape.group_size,
                                          op + n0 * K);
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(mpq, CPU, m) { m.impl("dequantize", &dequantize_cpu); }

}  // namespace mpq::cpu
