// CUDA glue of neuron_graphs: allocates with the caching allocator, runs the kernels of
// neuron_graphs_kernels.cu on the current stream, and the Gram matrices with at::mm (cuBLAS, double).
// Same stages as the CPU back end: q + stats, threshold, Gram, count, exclusive scan, emit.
#include "cuda/neuron_graphs_cuda.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/neuron_graphs_kernels.cuh"

namespace onp_fast {

NeuronGraphsOut neuron_graphs_cuda(const std::vector<at::Tensor>& weights, double eps, double dormant_quantile,
                                   int64_t cross_layer_topk) {
  const std::vector<NgLayer> layers = neuron_graphs_check_args(weights, eps, dormant_quantile, cross_layer_topk);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t L = layers.size();
  const int64_t N = layers.back().offset + layers.back().cout;
  const auto dev = weights[0].device();
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(dev);
  ng_cuda::Dtype dt = ng_cuda::Dtype::kFloat32;
  if (weights[0].scalar_type() == at::kHalf) dt = ng_cuda::Dtype::kFloat16;
  if (weights[0].scalar_type() == at::kBFloat16) dt = ng_cuda::Dtype::kBFloat16;

  at::Tensor l1 = at::empty({N}, f64);
  at::Tensor sorted = at::empty({N}, f64);
  at::Tensor norm = at::empty({N}, f64);
  at::Tensor thr = at::empty({static_cast<int64_t>(L)}, f64);
  at::Tensor active = at::empty({N}, f64.dtype(at::kByte));
  at::Tensor features = at::empty({N, ng::kNumFeatures}, f64.dtype(at::kFloat));
  at::Tensor counts = at::zeros({2 * N + 1}, f64.dtype(at::kLong));
  std::vector<at::Tensor> Q(L), G(L);
  for (size_t l = 0; l < L; ++l) {
    Q[l] = at::empty({layers[l].cout, layers[l].cin}, f64);
    ng_cuda::q_stats(weights[l].const_data_ptr(), dt, layers[l], Q[l].data_ptr<double>(), l1.data_ptr<double>(),
                     features.data_ptr<float>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!at::isfinite(l1).all().item<bool>()) {
    const at::Tensor host = l1.cpu();
    neuron_graphs_check_finite(host.const_data_ptr<double>(), layers);
  }
  for (size_t l = 0; l < L; ++l) {
    ng_cuda::threshold(l1.const_data_ptr<double>(), layers[l], dormant_quantile, sorted.data_ptr<double>(),
                       thr.data_ptr<double>() + l, stream);
    G[l] = at::mm(Q[l], Q[l].t());
    ng_cuda::activity(l1.const_data_ptr<double>(), G[l].const_data_ptr<double>(), layers[l],
                      thr.const_data_ptr<double>() + l, active.data_ptr<uint8_t>(), norm.data_ptr<double>(),
                      features.data_ptr<float>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (size_t l = 0; l < L; ++l) {
    ng_cuda::count(G[l].const_data_ptr<double>(), norm.const_data_ptr<double>(), active.const_data_ptr<uint8_t>(),
                   Q[l].const_data_ptr<double>(), layers[l], eps, ng_chains(layers, l, cross_layer_topk) ? cross_layer_topk : 0,
                   N, counts.data_ptr<int64_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor start = at::empty({2 * N + 1}, counts.options());
  const size_t temp_bytes = ng_cuda::scan_temp_bytes(2 * N + 1);
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes) + 1}, f64.dtype(at::kByte));
  ng_cuda::exclusive_scan(counts.const_data_ptr<int64_t>(), start.data_ptr<int64_t>(), 2 * N + 1, temp.data_ptr(),
                          temp_bytes, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t E = start[2 * N].item<int64_t>();

  at::Tensor edge_index = at::empty({2, E}, counts.options());
  at::Tensor edge_weight = at::empty({E}, features.options());
  int64_t* src = edge_index.data_ptr<int64_t>();
  for (size_t l = 0; l < L; ++l) {
    const bool chains = ng_chains(layers, l, cross_layer_topk);
    ng_cuda::emit(G[l].const_data_ptr<double>(), norm.const_data_ptr<double>(), active.const_data_ptr<uint8_t>(),
                  Q[l].const_data_ptr<double>(), layers[l], eps, chains ? cross_layer_topk : 0,
                  chains ? layers[l - 1].offset : 0, N, start.const_data_ptr<int64_t>(), src, src + E,
                  edge_weight.data_ptr<float>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto [node_layer, layer_offsets] = neuron_graphs_node_index(layers);
  return {edge_index, edge_weight, node_layer.to(dev), layer_offsets.to(dev), features};
}

}  // namespace onp_fast
