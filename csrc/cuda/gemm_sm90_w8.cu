// The wgmma kernels for 8-bit codes (gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace mpq::cuda {

MPQ_FUSED_WIDTH(gemm_sm90_w, 8);

}  // namespace mpq::cuda
