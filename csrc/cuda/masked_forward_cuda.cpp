// Torch-facing glue of the masked-forward CUDA kernels: checks (shared with the CPU path), allocation, launch.
#include "cuda/masked_forward_cuda.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cpu/masked_forward_cpu.h"
#include "cuda/masked_forward_kernels.cuh"

namespace onp_fast {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// x's dtype as the kernels' element-type code (bn_mask_prepare has limited it to float32, float16, bfloat16).
ElemType elem_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ElemType::kFloat32;
    case at::kHalf: return ElemType::kFloat16;
    default:
      TORCH_CHECK(t == at::kBFloat16, "bn_mask_relu: x must be float32, bfloat16 or float16");
      return ElemType::kBFloat16;
  }
}

// out: the physical output buffer (a.x itself in place), of x's dtype.
void run_bn_mask(const BnMaskArgs& a, at::Tensor& out, bool relu) {
  check_launch(launch_bn_mask_act(a.x.const_data_ptr(), out.mutable_data_ptr(), elem_type(a.x.scalar_type()),
                                  a.scale.const_data_ptr<float>(), a.shift.const_data_ptr<float>(),
                                  a.index.defined() ? a.index.const_data_ptr<int64_t>() : nullptr, a.K, a.Kx, a.B,
                                  a.C, a.Cout, a.S, a.channels_last, relu, at::cuda::getCurrentCUDAStream()),
               "bn_mask_relu");
}

}  // namespace

at::Tensor bn_mask_relu_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                             const std::optional<at::Tensor>& index, bool relu) {
  const c10::cuda::CUDAGuard guard(x.device());
  BnMaskArgs a = bn_mask_prepare(x, scale, shift, index, false);
  at::Tensor out = bn_mask_empty_out(a, x);
  at::Tensor phys = a.channels_last ? out.movedim(2, -1) : out;
  run_bn_mask(a, phys, relu);
  return out;
}

void bn_mask_relu_inplace_cuda(at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, bool relu) {
  const c10::cuda::CUDAGuard guard(x.device());
  BnMaskArgs a = bn_mask_prepare(x, scale, shift, std::nullopt, true);
  run_bn_mask(a, a.x, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reward_epilogue_cuda(const at::Tensor& logits,
                                                                                const at::Tensor& labels) {
  const c10::cuda::CUDAGuard guard(logits.device());
  reward_epilogue_check(logits, labels);
  const int64_t K = logits.size(0), B = logits.size(1), C = logits.size(2);
  at::Tensor lg = logits.to(at::kFloat).contiguous();
  at::Tensor lab = labels.contiguous();
  at::Tensor correct = at::zeros({K}, labels.options());
  at::Tensor ce = at::zeros({K}, logits.options().dtype(at::kDouble));
  at::Tensor counts = at::zeros({K, C}, labels.options());
  at::Tensor prob = at::zeros({K}, logits.options().dtype(at::kDouble));
  check_launch(launch_reward_epilogue(lg.const_data_ptr<float>(), lab.const_data_ptr<int64_t>(), K, B, C,
                                      correct.mutable_data_ptr<int64_t>(), ce.mutable_data_ptr<double>(),
                                      counts.mutable_data_ptr<int64_t>(), prob.mutable_data_ptr<double>(),
                                      at::cuda::getCurrentCUDAStream()),
               "reward_epilogue");
  return {correct, ce, counts, prob};
}

}  // namespace onp_fast
