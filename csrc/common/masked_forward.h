// Per-element math of the masked-forward reward ops, shared by the CPU loops and the CUDA kernels.
// No torch headers: plain floats, doubles and int64_t, so nvcc compiles it without ATen.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define ONP_MF_HD __host__ __device__ __forceinline__
#else
#define ONP_MF_HD inline
#endif

namespace onp_fast {
namespace mf {

// Eval-mode BN folded with the mask: y = x * scale + shift (scale = m*gamma'/sqrt(var+eps),
// shift = m*(beta' - mean*gamma'/sqrt(var+eps))), then ReLU when `relu`. NaN stays NaN, like torch.relu.
ONP_MF_HD float bn_mask_act(float x, float scale, float shift, bool relu) {
  const float y = x * scale + shift;
  return (relu && y < 0.f) ? 0.f : y;
}

// One logits row [C] against its label: writes the first argmax (torch.argmax's tie rule), the
// cross-entropy logsumexp(row) - row[label] and the softmax probability of the label, in double.
template <typename T>
ONP_MF_HD void row_reward(const T* row, int64_t C, int64_t label, int64_t* argmax, double* ce, double* prob) {
  int64_t best = 0;
  double mx = static_cast<double>(row[0]);
  for (int64_t c = 1; c < C; ++c) {
    const double v = static_cast<double>(row[c]);
    if (v > mx) { mx = v; best = c; }
  }
  double sum = 0.0;
  for (int64_t c = 0; c < C; ++c) sum += exp(static_cast<double>(row[c]) - mx);
  *argmax = best;
  *ce = mx + log(sum) - static_cast<double>(row[label]);
  *prob = exp(static_cast<double>(row[label]) - mx) / sum;
}

}  // namespace mf
}  // namespace onp_fast
