// CUDA implementations of the masked-forward reward ops (same contracts as csrc/cpu/masked_forward_cpu.h).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace onp_fast {

at::Tensor bn_mask_relu_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                             const std::optional<at::Tensor>& index, bool relu);
void bn_mask_relu_inplace_cuda(at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, bool relu);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reward_epilogue_cuda(const at::Tensor& logits,
                                                                                const at::Tensor& labels);

}  // namespace onp_fast
