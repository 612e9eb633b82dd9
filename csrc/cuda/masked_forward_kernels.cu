// CUDA kernels of the masked-forward reward ops. Raw pointers, sizes and streams only (no torch headers);
// the torch-facing glue is csrc/cuda/masked_forward_cuda.cpp. Layouts as in csrc/cpu/masked_forward_cpu.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/masked_forward.h"
#include "cuda/masked_forward_kernels.cuh"

namespace onp_fast {
namespace {

// Element <-> float conversions of bn_mask_act_kernel (stores round to nearest even).
__device__ __forceinline__ float load_elem(const float* p) { return *p; }
__device__ __forceinline__ float load_elem(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_elem(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_elem(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_elem(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_elem(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// One thread per output element; x and out of element type T. channels_last: out [K, B, S, Cout],
// x [Kx, B, S, C]; else out [K, B, Cout, S], x [Kx, B, C, S]. index [K, Cout] (-1 = zero) or null;
// out may alias x.
template <typename T>
__global__ void bn_mask_act_kernel(const T* x, T* out, const float* scale, const float* shift,
                                   const int64_t* index, int64_t K, int64_t Kx, int64_t B, int64_t C,
                                   int64_t Cout, int64_t S, bool channels_last, bool relu) {
  const int64_t total = K * B * Cout * S;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    int64_t j, s, kb;
    if (channels_last) {
      j = e % Cout;
      s = (e / Cout) % S;
      kb = e / (Cout * S);
    } else {
      s = e % S;
      j = (e / S) % Cout;
      kb = e / (Cout * S);
    }
    const int64_t k = kb / B, b = kb % B;
    const int64_t c = index ? index[k * Cout + j] : j;
    if (c < 0) {
      store_elem(out + e, 0.f);
      continue;
    }
    const int64_t kx = Kx == 1 ? 0 : k;
    const int64_t xi = channels_last ? ((kx * B + b) * S + s) * C + c : ((kx * B + b) * C + c) * S + s;
    store_elem(out + e, mf::bn_mask_act(load_elem(x + xi), scale[k * C + c], shift[k * C + c], relu));
  }
}

// Launches bn_mask_act_kernel<T> over total = K * B * Cout * S > 0 output elements.
template <typename T>
cudaError_t launch_bn_mask_act_typed(const void* x, void* out, const float* scale, const float* shift,
                                     const int64_t* index, int64_t K, int64_t Kx, int64_t B, int64_t C, int64_t Cout,
                                     int64_t S, bool channels_last, bool relu, cudaStream_t stream) {
  const int64_t total = K * B * Cout * S;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  const int grid = (int)(blocks < 65535 * 8 ? blocks : 65535 * 8);
  bn_mask_act_kernel<T><<<grid, threads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(out), scale, shift,
                                                      index, K, Kx, B, C, Cout, S, channels_last, relu);
  return cudaGetLastError();
}

constexpr int kEpilogueThreads = 256;

// One block per mask k; fixed-order tree reduction so CE sums are deterministic.
__global__ void reward_epilogue_kernel(const float* logits, const int64_t* labels, int64_t B, int64_t C,
                                       int64_t* correct, double* ce_sum, unsigned long long* counts,
                                       double* prob_sum) {
  __shared__ double s_ce[kEpilogueThreads];
  __shared__ double s_prob[kEpilogueThreads];
  __shared__ long long s_hit[kEpilogueThreads];
  const int64_t k = blockIdx.x;
  double ce = 0.0, prob = 0.0;
  long long hits = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    int64_t arg;
    double l, p;
    mf::row_reward(logits + (k * B + b) * C, C, labels[b], &arg, &l, &p);
    ce += l;
    prob += p;
    hits += arg == labels[b];
    atomicAdd(counts + k * C + arg, 1ull);
  }
  s_ce[threadIdx.x] = ce;
  s_prob[threadIdx.x] = prob;
  s_hit[threadIdx.x] = hits;
  __syncthreads();
  for (int step = blockDim.x / 2; step > 0; step >>= 1) {
    if (threadIdx.x < step) {
      s_ce[threadIdx.x] += s_ce[threadIdx.x + step];
      s_prob[threadIdx.x] += s_prob[threadIdx.x + step];
      s_hit[threadIdx.x] += s_hit[threadIdx.x + step];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    ce_sum[k] = s_ce[0];
    prob_sum[k] = s_prob[0];
    correct[k] = s_hit[0];
  }
}

}  // namespace

cudaError_t launch_bn_mask_act(const void* x, void* out, ElemType elem, const float* scale, const float* shift,
                               const int64_t* index, int64_t K, int64_t Kx, int64_t B, int64_t C, int64_t Cout,
                               int64_t S, bool channels_last, bool relu, cudaStream_t stream) {
  if (K * B * Cout * S == 0) return cudaSuccess;
  switch (elem) {
    case ElemType::kFloat32:
      return launch_bn_mask_act_typed<float>(x, out, scale, shift, index, K, Kx, B, C, Cout, S, channels_last, relu,
                                             stream);
    case ElemType::kFloat16:
      return launch_bn_mask_act_typed<__half>(x, out, scale, shift, index, K, Kx, B, C, Cout, S, channels_last,
                                              relu, stream);
    case ElemType::kBFloat16:
      return launch_bn_mask_act_typed<__nv_bfloat16>(x, out, scale, shift, index, K, Kx, B, C, Cout, S,
                                                     channels_last, relu, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_reward_epilogue(const float* logits, const int64_t* labels, int64_t K, int64_t B, int64_t C,
                                   int64_t* correct, double* ce_sum, int64_t* counts, double* prob_sum,
                                   cudaStream_t stream) {
  if (K == 0) return cudaSuccess;
  reward_epilogue_kernel<<<(unsigned)K, kEpilogueThreads, 0, stream>>>(
      logits, labels, B, C, correct, ce_sum, reinterpret_cast<unsigned long long*>(counts), prob_sum);
  return cudaGetLastError();
}

}  // namespace onp_fast
