// The staged fused kernels for 2-bit codes (gemm.cuh).
#include "gemm.cuh"

namespace mpq::cuda {

MPQ_FUSED_WIDTH(gemm_w, 2);

}  // namespace mpq::cuda
