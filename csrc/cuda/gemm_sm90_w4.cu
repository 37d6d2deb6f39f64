// The wgmma kernels for 4-bit codes (gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace mpq::cuda {

MPQ_FUSED_WIDTH(gemm_sm90_w, 4);

}  // namespace mpq::cuda
