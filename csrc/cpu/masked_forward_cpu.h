// Masked-forward reward ops: argument checks shared by the CPU and CUDA paths, and the CPU kernels
// (schemas in csrc/ops.cpp, CUDA kernels in csrc/cuda/masked_forward_*).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace onp_fast {

// bn_mask_relu's operands, checked and made dense. Physical layout of `x` and of the output:
// channels_last ? [Kx, B, S, C] : [Kx, B, C, S] (S = product of the spatial sizes, 1 for [Kx, B, C]).
struct BnMaskArgs {
  at::Tensor x, scale, shift, index;  // index [K, Cout] int64 contiguous, or undefined (identity)
  int64_t K, Kx, B, C, Cout, S;
  bool channels_last;
};
BnMaskArgs bn_mask_prepare(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const std::optional<at::Tensor>& index, bool inplace);
// Output [K, B, Cout, *S] in the layout of `a` (a view of a dense physical buffer).
at::Tensor bn_mask_empty_out(const BnMaskArgs& a, const at::Tensor& x);
void reward_epilogue_check(const at::Tensor& logits, const at::Tensor& labels);

// x [Kx, B, C, *S] float32, bfloat16 or float16 (each x[k] contiguous or channels-last), scale/shift [K, C]
// float32, index [K, C'] int64 (-1 = zero channel) or none -> [K, B, C', *S] of x's dtype in x's per-mask
// layout. Math in float (mf::bn_mask_act), rounded once to x's dtype.
at::Tensor bn_mask_relu_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                            const std::optional<at::Tensor>& index, bool relu);
// In place on x [K, B, C, *S] (float32, bfloat16 or float16; dense per mask, either layout).
void bn_mask_relu_inplace_cpu(at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, bool relu);
// logits [K, B, C] float, labels [B] int64 -> (correct [K] int64, ce_sum [K] float64, counts [K, C] int64,
// prob_sum [K] float64: the summed softmax probability of the label).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reward_epilogue_cpu(const at::Tensor& logits,
                                                                               const at::Tensor& labels);

}  // namespace onp_fast
