// The wgmma kernels for 2-bit codes (gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace mpq::cuda {

MPQ_FUSED_WIDTH(gemm_sm90_w, 2);

}  // namespace mpq::cuda
