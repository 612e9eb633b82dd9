// Launchers of the masked-forward CUDA kernels (raw pointers; see masked_forward_kernels.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace onp_fast {

cudaError_t launch_bn_mask_act(const float* x, float* out, const float* scale, const float* shift,
                               const int64_t* index, int64_t K, int64_t Kx, int64_t B, int64_t C, int64_t Cout,
                               int64_t S, bool channels_last, bool relu, cudaStream_t stream);
// counts must be zeroed by the caller.
cudaError_t launch_reward_epilogue(const float* logits, const int64_t* labels, int64_t K, int64_t B, int64_t C,
                                   int64_t* correct, double* ce_sum, int64_t* counts, double* prob_sum,
                                   cudaStream_t stream);

}  // namespace onp_fast
