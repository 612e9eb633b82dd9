// CUDA kernels of neuron_graphs; see neuron_graphs_kernels.cuh. The math is csrc/common/neuron_graphs.h,
// shared with the CPU back end.
#include "cuda/neuron_graphs_kernels.cuh"

#include <cub/device/device_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace onp_fast {
namespace ng_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

__device__ __forceinline__ double to_double(float v) { return static_cast<double>(v); }
__device__ __forceinline__ double to_double(__half v) { return static_cast<double>(__half2float(v)); }
__device__ __forceinline__ double to_double(__nv_bfloat16 v) { return static_cast<double>(__bfloat162float(v)); }

int blocks_for(int64_t n, int threads) { return static_cast<int>((n + threads - 1) / threads); }

template <typename T>
__global__ void q_kernel(const T* __restrict__ w, ng::NgLayer L, double* __restrict__ q) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= L.cout * L.cin) return;
  const int64_t i = idx / L.cin, c = idx % L.cin;
  const T* wc = w + i * L.s0 + c * L.s1;
  double acc = 0.0;
  for (int64_t y = 0; y < L.kh; ++y)
    for (int64_t x = 0; x < L.kw; ++x) acc += fabs(to_double(wc[y * L.s2 + x * L.s3]));
  q[idx] = acc;
}

__global__ void stats_kernel(const double* __restrict__ q, ng::NgLayer L, double* __restrict__ l1,
                             float* __restrict__ feat) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= L.cout) return;
  const int64_t row = L.offset + i;
  ng::row_features(q + i * L.cin, L.cin, l1 + row, feat + row * ng::kNumFeatures);
}

// sorted[rank(i)] = l1[i], rank by (value, index): a permutation, so the result is the sorted array.
__global__ void rank_kernel(const double* __restrict__ l1, ng::NgLayer L, double* __restrict__ sorted) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= L.cout) return;
  const double* v = l1 + L.offset;
  const double vi = v[i];
  int64_t rank = 0;
  for (int64_t j = 0; j < L.cout; ++j) rank += (v[j] < vi || (v[j] == vi && j < i)) ? 1 : 0;
  sorted[L.offset + rank] = vi;
}

__global__ void quantile_kernel(const double* __restrict__ sorted, ng::NgLayer L, double quantile,
                                double* __restrict__ threshold) {
  int64_t lo, hi;
  double w;
  ng::quantile_position(quantile, L.cout, lo, hi, w);
  *threshold = ng::lerp(sorted[L.offset + lo], sorted[L.offset + hi], w);
}

__global__ void activity_kernel(const double* __restrict__ l1, const double* __restrict__ gram, ng::NgLayer L,
                                const double* __restrict__ threshold, uint8_t* __restrict__ active,
                                double* __restrict__ norm, float* __restrict__ feat) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= L.cout) return;
  const int64_t row = L.offset + i;
  const bool on = !ng::is_dormant(l1[row], *threshold);
  active[row] = on ? 1 : 0;
  feat[row * ng::kNumFeatures + 4] = on ? 1.0f : 0.0f;
  norm[row] = sqrt(gram[i * L.cout + i]);
}

__device__ __forceinline__ bool intra_edge(const double* gram, const double* norm, const uint8_t* active,
                                           const ng::NgLayer& L, int64_t i, int64_t j, double eps, double& cos) {
  if (j >= L.cout || j == i || !active[L.offset + j]) return false;
  const double dot = j >= i ? gram[i * L.cout + j] : gram[j * L.cout + i];  // upper triangle, as on the CPU
  cos = ng::cosine(dot, norm[L.offset + i], norm[L.offset + j]);
  return ng::is_edge(cos, eps);
}

// One warp per row.
__global__ void count_kernel(const double* __restrict__ gram, const double* __restrict__ norm,
                             const uint8_t* __restrict__ active, const double* __restrict__ q, ng::NgLayer L,
                             double eps, int64_t cross_topk, int64_t num_nodes, int64_t* __restrict__ counts) {
  const int64_t i = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= L.cout) return;  // whole warp exits together
  const int64_t row = L.offset + i;
  int64_t n = 0;
  if (active[row]) {
    for (int64_t base = 0; base < L.cout; base += kWarp) {
      double cos;
      const bool e = intra_edge(gram, norm, active, L, i, base + lane, eps, cos);
      n += __popc(__ballot_sync(0xffffffffu, e));
    }
  }
  if (lane == 0) {
    counts[row] = n;
    if (cross_topk > 0) counts[num_nodes + row] = ng::topk_count(q + i * L.cin, L.cin, cross_topk);
  }
}

__global__ void emit_kernel(const double* __restrict__ gram, const double* __restrict__ norm,
                            const uint8_t* __restrict__ active, ng::NgLayer L, double eps,
                            const int64_t* __restrict__ start, int64_t* __restrict__ src, int64_t* __restrict__ dst,
                            float* __restrict__ weight) {
  const int64_t i = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= L.cout) return;
  const int64_t row = L.offset + i;
  if (!active[row]) return;
  int64_t e = start[row];
  const unsigned below = (1u << lane) - 1u;
  for (int64_t base = 0; base < L.cout; base += kWarp) {
    double cos = 0.0;
    const bool on = intra_edge(gram, norm, active, L, i, base + lane, eps, cos);
    const unsigned ballot = __ballot_sync(0xffffffffu, on);
    if (on) {
      const int64_t at = e + __popc(ballot & below);
      src[at] = row;
      dst[at] = L.offset + base + lane;
      weight[at] = static_cast<float>(cos);
    }
    e += __popc(ballot);
  }
}

// One thread per row j: its top-k inputs by selection (same order as csrc/common topk_next on the CPU).
__global__ void cross_emit_kernel(const double* __restrict__ q, ng::NgLayer L, int64_t prev_offset,
                                  int64_t num_nodes, const int64_t* __restrict__ start, int64_t* __restrict__ src,
                                  int64_t* __restrict__ dst, float* __restrict__ weight) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= L.cout) return;
  const int64_t row = L.offset + j;
  const int64_t first = start[num_nodes + row], count = start[num_nodes + row + 1] - first;
  const double* qj = q + j * L.cin;
  int64_t pick = -1;
  double pick_w = 0.0;
  for (int64_t r = 0; r < count; ++r) {
    pick = ng::topk_next(qj, L.cin, pick_w, pick);
    pick_w = qj[pick];
    src[first + r] = row;
    dst[first + r] = prev_offset + pick;
    weight[first + r] = static_cast<float>(pick_w);
  }
}

}  // namespace

void q_stats(const void* w, Dtype dt, const ng::NgLayer& layer, double* q, double* l1, float* feat,
             cudaStream_t stream) {
  const int64_t n = layer.cout * layer.cin;
  switch (dt) {
    case Dtype::kFloat32:
      q_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(static_cast<const float*>(w), layer, q);
      break;
    case Dtype::kFloat16:
      q_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(static_cast<const __half*>(w), layer, q);
      break;
    case Dtype::kBFloat16:
      q_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(w), layer, q);
      break;
  }
  stats_kernel<<<blocks_for(layer.cout, kThreads), kThreads, 0, stream>>>(q, layer, l1, feat);
}

void threshold(const double* l1, const ng::NgLayer& layer, double quantile, double* sorted, double* thr,
               cudaStream_t stream) {
  rank_kernel<<<blocks_for(layer.cout, kThreads), kThreads, 0, stream>>>(l1, layer, sorted);
  quantile_kernel<<<1, 1, 0, stream>>>(sorted, layer, quantile, thr);
}

void activity(const double* l1, const double* gram, const ng::NgLayer& layer, const double* thr, uint8_t* active,
              double* norm, float* feat, cudaStream_t stream) {
  activity_kernel<<<blocks_for(layer.cout, kThreads), kThreads, 0, stream>>>(l1, gram, layer, thr, active, norm,
                                                                              feat);
}

void count(const double* gram, const double* norm, const uint8_t* active, const double* q, const ng::NgLayer& layer,
           double eps, int64_t cross_topk, int64_t num_nodes, int64_t* counts, cudaStream_t stream) {
  count_kernel<<<blocks_for(layer.cout * kWarp, kThreads), kThreads, 0, stream>>>(gram, norm, active, q, layer, eps,
                                                                                  cross_topk, num_nodes, counts);
}

size_t scan_temp_bytes(int64_t n) {
  size_t bytes = 0;
  cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
                                n);
  return bytes;
}

void exclusive_scan(const int64_t* in, int64_t* out, int64_t n, void* temp, size_t temp_bytes, cudaStream_t stream) {
  cub::DeviceScan::ExclusiveSum(temp, temp_bytes, in, out, n, stream);
}

void emit(const double* gram, const double* norm, const uint8_t* active, const double* q, const ng::NgLayer& layer,
          double eps, int64_t cross_topk, int64_t prev_offset, int64_t num_nodes, const int64_t* start, int64_t* src,
          int64_t* dst, float* weight, cudaStream_t stream) {
  emit_kernel<<<blocks_for(layer.cout * kWarp, kThreads), kThreads, 0, stream>>>(gram, norm, active, layer, eps,
                                                                                 start, src, dst, weight);
  if (cross_topk > 0)
    cross_emit_kernel<<<blocks_for(layer.cout, kThreads), kThreads, 0, stream>>>(q, layer, prev_offset, num_nodes,
                                                                                 start, src, dst, weight);
}

}  // namespace ng_cuda
}  // namespace onp_fast
