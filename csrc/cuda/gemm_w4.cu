// The staged fused kernels for 4-bit codes (gemm.cuh).
#include "gemm.cuh"

namespace mpq::cuda {

MPQ_FUSED_WIDTH(gemm_w, 4);

}  // namespace mpq::cuda
