// The staged fused kernels for 8-bit codes (gemm.cuh).
#include "gemm.cuh"

namespace mpq::cuda {

MPQ_GEMM_WIDTH(8);

}  // namespace mpq::cuda
