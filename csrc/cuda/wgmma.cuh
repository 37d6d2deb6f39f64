// Hopper warpgroup MMA (wgmma, sm_90a) for the large-M fused kernel
// (gemm_sm90_kernel.cuh): A, the dequantized weights, from registers; B, the rows of
// x, from shared memory in the 128-byte swizzled K-major layout; float32
// accumulators. Everything here compiles only in the sm_90a pass
// (__CUDA_ARCH_FEAT_SM90_ALL); the host uses it only where setup.py built
// that pass (MPQ_SM90A) and the device is compute capability 9.0.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace mpq::cuda::sm90 {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Shared-memory matrix descriptor of a K-major tile whose rows are 128 bytes
// (64 halves of k), 128-byte swizzle: 8-row groups 1024 bytes apart (stride
// byte offset), leading byte offset unused with this swizzle (1 by convention).
// Its low word: the address field and the leading byte offset. For addresses
// under 256 KB (all of shared memory) the low word of addr + 16 n is this + n.
__device__ __forceinline__ uint32_t desc_lo_k_major_sw128(uint32_t smem_addr) {
  return ((smem_addr & 0x3FFFF) >> 4) | (1u << 16);
}
// The descriptor from its low word: the high word (stride byte offset, swizzle
// mode) is the same for every tile.
__device__ __forceinline__ uint64_t desc_k_major_sw128_of(uint32_t lo) {
  return static_cast<uint64_t>(lo) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}
__device__ __forceinline__ uint64_t desc_k_major_sw128(uint32_t smem_addr) {
  return desc_k_major_sw128_of(desc_lo_k_major_sw128(smem_addr));
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// m64nNk16, D += A * B: d holds N/2 floats per thread, a the 4 registers of
// A (the m16n8k16 A fragment of this warp's 16 rows), desc B's descriptor.
// Inline asm numbers its operands in its text, so each shape has a macro of
// its own (argument: the element type, "f16" or "bf16") that spells out those
// numbers; the operands themselves are built from the two macros below: eight
// accumulators from d[I] on, and the inputs (A's registers, B's descriptor,
// scale-d = 1).
#define MPQ_WGMMA_D8(I)                                                                      \
  "+f"(d[I]), "+f"(d[I + 1]), "+f"(d[I + 2]), "+f"(d[I + 3]), "+f"(d[I + 4]), "+f"(d[I + 5]), \
      "+f"(d[I + 6]), "+f"(d[I + 7])
#define MPQ_WGMMA_IN "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1)

#define MPQ_WGMMA_M64N16(TYPE) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n16k16.f32." TYPE "." TYPE " {" \
      "%0, %1, %2, %3, %4, %5, %6, %7" \
      "}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n" \
      : MPQ_WGMMA_D8(0) \
      : MPQ_WGMMA_IN)

#define MPQ_WGMMA_M64N32(TYPE) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " {" \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15" \
      "}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n" \
      : MPQ_WGMMA_D8(0), MPQ_WGMMA_D8(8) \
      : MPQ_WGMMA_IN)

#define MPQ_WGMMA_M64N48(TYPE) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %29, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n48k16.f32." TYPE "." TYPE " {" \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23" \
      "}, {%24, %25, %26, %27}, %28, p, 1, 1, 0;\n}\n" \
      : MPQ_WGMMA_D8(0), MPQ_WGMMA_D8(8), MPQ_WGMMA_D8(16) \
      : MPQ_WGMMA_IN)

#define MPQ_WGMMA_M64N64(TYPE) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {" \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" \
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n" \
      : MPQ_WGMMA_D8(0), MPQ_WGMMA_D8(8), MPQ_WGMMA_D8(16), MPQ_WGMMA_D8(24) \
      : MPQ_WGMMA_IN)

#define MPQ_WGMMA_M64N128(TYPE) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {" \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n" \
      : MPQ_WGMMA_D8(0), MPQ_WGMMA_D8(8), MPQ_WGMMA_D8(16), MPQ_WGMMA_D8(24), \
        MPQ_WGMMA_D8(32), MPQ_WGMMA_D8(40), MPQ_WGMMA_D8(48), MPQ_WGMMA_D8(56) \
      : MPQ_WGMMA_IN)

#define MPQ_WGMMA_M64N256(TYPE) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " {" \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127" \
      "}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n" \
      : MPQ_WGMMA_D8(0), MPQ_WGMMA_D8(8), MPQ_WGMMA_D8(16), MPQ_WGMMA_D8(24), \
        MPQ_WGMMA_D8(32), MPQ_WGMMA_D8(40), MPQ_WGMMA_D8(48), MPQ_WGMMA_D8(56), \
        MPQ_WGMMA_D8(64), MPQ_WGMMA_D8(72), MPQ_WGMMA_D8(80), MPQ_WGMMA_D8(88), \
        MPQ_WGMMA_D8(96), MPQ_WGMMA_D8(104), MPQ_WGMMA_D8(112), MPQ_WGMMA_D8(120) \
      : MPQ_WGMMA_IN)

// D += A * B for m64nNk16, N = 16, 32, 48, 64, 128 or 256 (the rows of x of a tile).
template <typename T, int N>
__device__ __forceinline__ void wgmma_m64(float* d, const uint32_t* a, uint64_t desc) {
  static_assert(N == 16 || N == 32 || N == 48 || N == 64 || N == 128 || N == 256,
                "a tile width with a wgmma shape here");
#define MPQ_WGMMA_BY_TYPE(M)                  \
  if constexpr (std::is_same_v<T, __half>) { \
    M("f16");                                 \
  } else {                                    \
    M("bf16");                                \
  }
  if constexpr (N == 16) {
    MPQ_WGMMA_BY_TYPE(MPQ_WGMMA_M64N16)
  } else if constexpr (N == 32) {
    MPQ_WGMMA_BY_TYPE(MPQ_WGMMA_M64N32)
  } else if constexpr (N == 48) {
    MPQ_WGMMA_BY_TYPE(MPQ_WGMMA_M64N48)
  } else if constexpr (N == 64) {
    MPQ_WGMMA_BY_TYPE(MPQ_WGMMA_M64N64)
  } else if constexpr (N == 128) {
    MPQ_WGMMA_BY_TYPE(MPQ_WGMMA_M64N128)
  } else {
    MPQ_WGMMA_BY_TYPE(MPQ_WGMMA_M64N256)
  }
#undef MPQ_WGMMA_BY_TYPE
}

#undef MPQ_WGMMA_M64N16
#undef MPQ_WGMMA_M64N32
#undef MPQ_WGMMA_M64N48
#undef MPQ_WGMMA_M64N64
#undef MPQ_WGMMA_M64N128
#undef MPQ_WGMMA_M64N256
#undef MPQ_WGMMA_D8
#undef MPQ_WGMMA_IN

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace mpq::cuda::sm90
