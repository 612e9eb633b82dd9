// CUDA kernels of neuron_graphs (csrc/cuda/neuron_graphs_kernels.cu): raw pointers, sizes and a stream, no
// torch headers. One launch per layer and stage; the glue (neuron_graphs_cuda.cpp) owns memory and the Gram
// matrices. Global arrays are indexed by global node id (layer.offset + i); N = total neurons.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/neuron_graphs.h"

namespace onp_fast {
namespace ng_cuda {

enum class Dtype { kFloat32, kFloat16, kBFloat16 };

// q [cout, cin] (double) of one layer from its weight w (dtype dt, strides in `layer`), then per-row
// l1 [N] (double) and node_features columns 0-3 of feat [N, 5] (float).
void q_stats(const void* w, Dtype dt, const ng::NgLayer& layer, double* q, double* l1, float* feat,
             cudaStream_t stream);

// Dormant threshold of one layer: sorts its l1 into sorted [N] (by rank, deterministic) and writes the
// linear-interpolation quantile to *threshold (double, device).
void threshold(const double* l1, const ng::NgLayer& layer, double quantile, double* sorted, double* threshold,
               cudaStream_t stream);

// active [N] (uint8), feat column 4, norm [N] = sqrt(diag(gram)) for one layer; gram [cout, cout] double.
void activity(const double* l1, const double* gram, const ng::NgLayer& layer, const double* threshold,
              uint8_t* active, double* norm, float* feat, cudaStream_t stream);

// counts [2N + 1] (int64): counts[row] = intra-layer edges of row; counts[N + row] = cross-layer edges of
// row when `cross_topk` > 0 (the layer chains to the previous one). One warp per row.
void count(const double* gram, const double* norm, const uint8_t* active, const double* q, const ng::NgLayer& layer,
           double eps, int64_t cross_topk, int64_t num_nodes, int64_t* counts, cudaStream_t stream);

// Exclusive prefix sum out[i] = sum_{k < i} in[k] over n int64 (cub); temp_bytes from scan_temp_bytes(n).
size_t scan_temp_bytes(int64_t n);
void exclusive_scan(const int64_t* in, int64_t* out, int64_t n, void* temp, size_t temp_bytes, cudaStream_t stream);

// Writes the layer's edges at start[row] (intra) and start[N + row] (cross, to layer `prev_offset`):
// src/dst = edge_index rows, weight [E] float. One warp per row for intra, one thread per row for cross.
void emit(const double* gram, const double* norm, const uint8_t* active, const double* q, const ng::NgLayer& layer,
          double eps, int64_t cross_topk, int64_t prev_offset, int64_t num_nodes, const int64_t* start, int64_t* src,
          int64_t* dst, float* weight, cudaStream_t stream);

}  // namespace ng_cuda
}  // namespace onp_fast
