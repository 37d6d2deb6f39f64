// mpq::dequantize on CUDA: each thread writes U slots of 16 bytes of output,
// each with one vector store (memory-bound; arithmetic in float32).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../mpq.h"
#include "kernels.h"
#include "tile.cuh"

namespace mpq::cuda {

namespace {

// Outputs of T per slot: one 16-byte store.
template <typename T>
constexpr int kSlot = 16 / sizeof(T);

// The output [N, K] is cut into slots of S = 16 / sizeof(T) consecutive
// elements (8 for half and bfloat16, 4 for float; K is a multiple of 32, so a
// slot never crosses a row or a group); each thread writes whole slots, so a
// warp's store is one contiguous 512-byte run for every width and type.
// Writing 32 bytes per lane instead (a word's 16 outputs at w2, or 8 float
// outputs) ran at 73% of the copy speed against 91% at w4, and float output
// by slots of 8 took 1.8x as long as by slots of 4 (H200, 8192 x 28672).
// A slot's codes are S * W contiguous bits: 8 (w2 float) to 64 (w8 half).
// A block owns U * blockDim.x consecutive slots, thread t takes slots t,
// t + blockDim.x, ...; all U loads go out before the first use (one 4-byte
// load in flight per thread left w8, one byte read per two written, at 65% of
// the copy speed).
template <typename T, int W, int U, bool VEC8>
__global__ void __launch_bounds__(256)
    dequantize_cuda_kernel(const uint32_t* __restrict__ qweight, const T* __restrict__ scales,
                           const T* __restrict__ zeros, T* __restrict__ out, int total_slots,
                           int slots_per_row, int groups, tile::Groups rows,
                           tile::Groups gdiv) {
  constexpr int S = kSlot<T>;
  constexpr int BITS = S * W;            // 8 .. 64 bits of codes per slot
  constexpr int C = BITS == 64 ? 2 : 1;  // 32-bit code words per slot
  constexpr uint32_t kMask = (1u << W) - 1u;
  const int base = blockIdx.x * (U * blockDim.x) + threadIdx.x;
  uint32_t code[U][C];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int i = base + u * blockDim.x;
    const bool in = i < total_slots;
    if constexpr (BITS == 8) {
      code[u][0] = in ? __ldg(reinterpret_cast<const uint8_t*>(qweight) + i) : 0u;
    } else if constexpr (BITS == 16) {
      code[u][0] = in ? __ldg(reinterpret_cast<const uint16_t*>(qweight) + i) : 0u;
    } else if constexpr (BITS == 32) {
      code[u][0] = in ? __ldg(qweight + i) : 0u;
    } else if constexpr (VEC8) {  // 8-byte aligned codes
      const uint2 v = in ? __ldg(reinterpret_cast<const uint2*>(qweight) + i) : make_uint2(0u, 0u);
      code[u][0] = v.x;
      code[u][C - 1] = v.y;
    } else {
#pragma unroll
      for (int c = 0; c < C; ++c) code[u][c] = in ? __ldg(qweight + C * i + c) : 0u;
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int i = base + u * blockDim.x;
    if (i >= total_slots) break;
    const int n = rows.index(i);  // i / slots_per_row, by a multiply-high
    const int gi = n * groups + gdiv.index((i - n * slots_per_row) * S);
    const float s = float(scales[gi]), z = float(zeros[gi]);
    struct alignas(16) Chunk { T v[S]; } chunk;
#pragma unroll
    for (int j = 0; j < S; ++j) {
      const uint32_t q = (code[u][j * W / 32] >> (j * W % 32)) & kMask;
      chunk.v[j] = T((float(q) - z) * s);
    }
    *reinterpret_cast<Chunk*>(out + static_cast<int64_t>(i) * S) = chunk;
  }
}

template <typename T, int W>
void launch_width(const uint32_t* q, const T* s, const T* z, T* o, int64_t total_slots,
                  int slots_per_row, int groups, int group_size, cudaStream_t stream) {
  const int threads = 256;
  // Slots per thread: 16 bytes of codes in flight per thread for 64-bit slots
  // (w8 half), 4 slots otherwise (16 bytes in flight were slower at w2). On
  // the H200 at 8192 x 28672 to fp16, U = 2 / 4 / 8: w2 152 / 142 / 148 us,
  // w4 168 / 155 / 159, w8 177 / 183 / 189.
  constexpr bool kTwoWords = kSlot<T> * W == 64;  // a slot's codes span two words
  constexpr int U = kTwoWords ? 2 : 4;
  const int64_t blocks = (total_slots + U * threads - 1) / (U * threads);
  const auto rows = tile::Groups::of(slots_per_row);
  const auto gdiv = tile::Groups::of(group_size);
  if (kTwoWords && reinterpret_cast<uintptr_t>(q) % 8 != 0) {
    dequantize_cuda_kernel<T, W, U, false><<<blocks, threads, 0, stream>>>(
        q, s, z, o, (int)total_slots, slots_per_row, groups, rows, gdiv);
  } else {
    dequantize_cuda_kernel<T, W, U, true><<<blocks, threads, 0, stream>>>(
        q, s, z, o, (int)total_slots, slots_per_row, groups, rows, gdiv);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch(const at::Tensor& q, const at::Tensor& s, const at::Tensor& z, int64_t w_bit,
            int64_t group_size, at::Tensor& out) {
  const int64_t N = q.size(0);
  if (q.numel() == 0) return;
  const int words = q.size(1), K = words * (32 / w_bit);
  const int groups = K / group_size, slots_per_row = K / kSlot<T>;
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Slot indices are 32-bit (the row by tile::Groups' multiply-high, exact
  // below 2^31), so weights of 2^31 slots (2^34 half or 2^33 float outputs) or
  // more go by slices of whole rows.
  const int64_t rows = ((int64_t{1} << 31) - 1) / slots_per_row;
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t total_slots = std::min(rows, N - n0) * slots_per_row;
    const auto* qp = reinterpret_cast<const uint32_t*>(q.data_ptr()) + n0 * words;
    const auto* sp = reinterpret_cast<const T*>(s.data_ptr()) + n0 * groups;
    const auto* zp = reinterpret_cast<const T*>(z.data_ptr()) + n0 * groups;
    auto* op = reinterpret_cast<T*>(out.data_ptr()) + n0 * K;
    switch (w_bit) {
      case 2: launch_width<T, 2>(qp, sp, zp, op, total_slots, slots_per_row, groups, group_size,
                                 stream); break;
      case 4: launch_width<T, 4>(qp, sp, zp, op, total_slots, slots_per_row, groups, group_size,
                                 stream); break;
      default: launch_width<T, 8>(qp, sp, zp, op, total_slots, slots_per_row, groups, group_size,
                                  stream);
    }
  }
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
