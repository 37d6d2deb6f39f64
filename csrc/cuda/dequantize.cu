// mpq::dequantize on CUDA: one thread per packed word, its P outputs written
// with one vector store (memory-bound; arithmetic in float32).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../mpq.h"
#include "kernels.h"

namespace mpq::cuda {

namespace {

template <typename T, int W>
__global__ void dequantize_cuda_kernel(const uint32_t* __restrict__ qweight,
                                       const T* __restrict__ scales, const T* __restrict__ zeros,
                                       T* __restrict__ out, int64_t total_words, int words,
                                       int groups, int group_size) {
  constexpr int P = 32 / W;
  constexpr uint32_t kMask = (1u << W) - 1u;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total_words;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = i / words;
    const int k0 = (int)(i - n * words) * P;
    const uint32_t word = qweight[i];
    const int64_t gi = n * groups + k0 / group_size;
    const float s = float(scales[gi]), z = float(zeros[gi]);
    // P outputs of T = P * sizeof(T) bytes: 8 (w8, half) up to 64 (w2, float).
    struct alignas(P * sizeof(T)) Chunk { T v[P]; } chunk;
#pragma unroll
    for (int j = 0; j < P; ++j) chunk.v[j] = T((float((word >> (W * j)) & kMask) - z) * s);
    *reinterpret_cast<Chunk*>(out + n * (int64_t)words * P + k0) = chunk;
  }
}

template <typename T>
void launch(const at::Tensor& q, const at::Tensor& s, const at::Tensor& z, int64_t w_bit,
            int64_t group_size, at::Tensor& out) {
  const int64_t total = q.numel();
  if (total == 0) return;
  const int words = q.size(1), K = words * (32 / w_bit);
  const int groups = K / group_size;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535LL * 8);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* qp = reinterpret_cast<const uint32_t*>(q.data_ptr());
  const auto* sp = reinterpret_cast<const T*>(s.data_ptr());
  const auto* zp = reinterpret_cast<const T*>(z.data_ptr());
  auto* op = reinterpret_cast<T*>(out.data_ptr());
  switch (w_bit) {
    case 2:
      dequantize_cuda_kernel<T, 2><<<blocks, threads, 0, stream>>>(qp, sp, zp, op, total, words,
                                                                   groups, group_size);
      break;
    case 4:
      dequantize_cuda_kernel<T, 4><<<blocks, threads, 0, stream>>>(qp, sp, zp, op, total, words,
                                                                   groups, group_size);
      break;
    default:
      dequantize_cuda_kernel<T, 8><<<blocks, threads, 0, stream>>>(qp, sp, zp, op, total, words,
                                                                   groups, group_size);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void dequantize_into(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                     int64_t w_bit, int64_t group_size, at::Tensor& out) {
  const auto q = qweight.contiguous();
  const auto s = scales.contiguous();
  const auto z = zeros.contiguous();
  switch (s.scalar_type()) {
    case at::kHalf: return launch<__half>(q, s, z, w_bit, group_size, out);
    case at::kBFloat16: return launch<__nv_bfloat16>(q, s, z, w_bit, group_size, out);
    default: return launch<float>(q, s, z, w_bit, group_size, out);
  }
}

at::Tensor dequantize_cuda(const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t w_bit, int64_t group_size) {
  const int64_t K = infer_k("mpq::dequantize", qweight, w_bit);
  const auto shape =
      check_weight("mpq::dequantize", qweight, scales, zeros, w_bit, group_size, K);
  const c10::cuda::OptionalCUDAGuard guard(qweight.device());
  auto out = at::empty({shape.N, K}, scales.options());
  dequantize_into(qweight, scales, zeros, w_bit, shape.group_size, out);
  return out;
}

}  // namespace mpq::cuda
