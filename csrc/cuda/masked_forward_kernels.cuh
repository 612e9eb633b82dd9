// Launchers of the masked-forward CUDA kernels (raw pointers; see masked_forward_kernels.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace onp_fast {

// Element type of bn_mask_relu's x and output (scale/shift are always float32).
enum class ElemType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// x and out point to elements of type `elem` (float, __half or __nv_bfloat16); math in float, one rounding to
// `elem` on store. cudaErrorInvalidValue for an unknown `elem`.
cudaError_t launch_bn_mask_act(const void* x, void* out, ElemType elem, const float* scale, const float* shift,
                               const int64_t* index, int64_t K, int64_t Kx, int64_t B, int64_t C, int64_t Cout,
                               int64_t S, bool channels_last, bool relu, cudaStream_t stream);
// counts must be zeroed by the caller.
cudaError_t launch_reward_epilogue(const float* logits, const int64_t* labels, int64_t K, int64_t B, int64_t C,
                                   int64_t* correct, double* ce_sum, int64_t* counts, double* prob_sum,
                                   cudaStream_t stream);

}  // namespace onp_fast
