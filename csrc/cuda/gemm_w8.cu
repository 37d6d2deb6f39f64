// The staged fused kernels for 8-bit codes (gemm.cuh).
#include "gemm.cuh"

namespace mpq::cuda {

MPQ_FUSED_WIDTH(gemm_w, 8);

}  // namespace mpq::cuda
