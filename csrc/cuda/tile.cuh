// Pieces shared by the fused kernels (gemv.cuh, gemm.cuh): streaming loads,
// the m16n8k16 tensor-core MMA, and split-K over a float32 workspace.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "decode.cuh"

namespace mpq::cuda::tile {

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  // Weights are read once: keep them out of L1, which serves x.
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

template <typename T>
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack_pair(T lo, T hi) {
  typename Pair<T>::type v;
  v.x = lo;
  v.y = hi;
  return as_bits(v);
}

// y = T(sum of the splits' partial products + bias): the end of a split-K product.
template <typename T>
__global__ void finish_split_kernel(const float* __restrict__ ws, const T* __restrict__ bias,
                                    T* __restrict__ y, int64_t total, int N, int splits) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    float v = 0.f;
    for (int sp = 0; sp < splits; ++sp) v += ws[sp * total + i];
    if (bias != nullptr) v += float(bias[i % N]);
    y[i] = T(v);
  }
}

template <typename T>
void finish_split(const at::Tensor& ws, const T* bias, at::Tensor& y, int splits,
                  cudaStream_t stream) {
  const int64_t total = y.numel();
  const int blocks = (int)std::min<int64_t>((total + 255) / 256, 4096);
  finish_split_kernel<T><<<blocks, 256, 0, stream>>>(ws.data_ptr<float>(), bias,
                                                      reinterpret_cast<T*>(y.data_ptr()), total,
                                                      (int)y.size(1), splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline int sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Number of K splits (at most max_splits) for a grid of `blocks` blocks, each
// walking `steps` steps, on `slots` resident-block slots: the one whose waves
// are busiest, as a second wave that is mostly empty costs as much as a full
// one, and a grid that leaves SMs idle gets no credit.
inline int wave_filling_splits(long blocks, int steps, int slots, int max_splits) {
  int splits = 1;
  double best = -1.0;
  for (int sp = 1; sp <= max_splits; ++sp) {
    const int per = (steps + sp - 1) / sp;
    const int real = (steps + per - 1) / per;
    const long total = blocks * real;
    const long waves = (total + slots - 1) / slots;
    const double score = (double)total / (waves * slots) - (total < slots ? 1.0 : 0.0);
    if (score > best + 1e-9) {
      best = score;
      splits = real;
    }
  }
  return splits;
}

}  // namespace mpq::cuda::tile
