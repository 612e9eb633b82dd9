// Op registration for onp_fast: schemas (TORCH_LIBRARY), CPU and CUDA implementations
// (TORCH_LIBRARY_IMPL), and the pybind11 module that makes `import onp_fast._C` load them.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/masked_forward_cpu.h"
#include "cpu/neuron_graphs_cpu.h"
#ifdef WITH_CUDA
#include "cuda/masked_forward_cuda.h"
#include "cuda/neuron_graphs_cuda.h"
#endif

TORCH_LIBRARY(onp_fast, m) {
  m.def("neuron_graphs(Tensor[] weights, float eps, float dormant_quantile, int cross_layer_topk) -> "
        "(Tensor edge_index, Tensor edge_weight, Tensor node_layer, Tensor layer_offsets, Tensor node_features)");
  m.def("bn_mask_relu(Tensor x, Tensor scale, Tensor shift, Tensor? index, bool relu) -> Tensor");
  m.def("bn_mask_relu_(Tensor(a!) x, Tensor scale, Tensor shift, bool relu) -> ()");
  m.def("reward_epilogue(Tensor logits, Tensor labels) -> (Tensor correct, Tensor ce_sum, Tensor counts, "
        "Tensor prob_sum)");
}

TORCH_LIBRARY_IMPL(onp_fast, CPU, m) {
  m.impl("neuron_graphs", &onp_fast::neuron_graphs_cpu);
  m.impl("bn_mask_relu", &onp_fast::bn_mask_relu_cpu);
  m.impl("bn_mask_relu_", &onp_fast::bn_mask_relu_inplace_cpu);
  m.impl("reward_epilogue", &onp_fast::reward_epilogue_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(onp_fast, CUDA, m) {
  m.impl("neuron_graphs", &onp_fast::neuron_graphs_cuda);
  m.impl("bn_mask_relu", &onp_fast::bn_mask_relu_cuda);
  m.impl("bn_mask_relu_", &onp_fast::bn_mask_relu_inplace_cuda);
  m.impl("reward_epilogue", &onp_fast::reward_epilogue_cuda);
}
#endif

// Catch-all for calls with no tensors to dispatch on (an empty weight list) or an unsupported device:
// runs the argument checks so the caller gets a ValueError naming the problem.
TORCH_LIBRARY_IMPL(onp_fast, CompositeExplicitAutograd, m) {
  m.impl("neuron_graphs", [](const std::vector<at::Tensor>& weights, double eps, double dormant_quantile,
                             int64_t cross_layer_topk) -> onp_fast::NeuronGraphsOut {
    onp_fast::neuron_graphs_check_args(weights, eps, dormant_quantile, cross_layer_topk);
    TORCH_CHECK_VALUE(false, "neuron_graphs: no implementation for device ", weights[0].device());
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "onp_fast C++/CUDA ops (registered under torch.ops.onp_fast)";
#ifdef WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
