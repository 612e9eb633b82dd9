// neuron_graphs on CUDA tensors (glue over csrc/cuda/neuron_graphs_kernels.cu). Built only with CUDA torch.
#pragma once

#include "cpu/neuron_graphs_cpu.h"

namespace onp_fast {

NeuronGraphsOut neuron_graphs_cuda(const std::vector<at::Tensor>& weights, double eps, double dormant_quantile,
                                   int64_t cross_layer_topk);

}  // namespace onp_fast
