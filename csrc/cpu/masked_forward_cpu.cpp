// CPU kernels of the masked-forward reward ops: fused eval-BN + mask + ReLU (gathering the surviving
// channels, channels-last aware, optionally in place) and the logits -> (correct, CE sum, counts,
// true-label probability sum) epilogue.
#include "cpu/masked_forward_cpu.h"

#include <ATen/Parallel.h>

#include <cstring>

#include "common/masked_forward.h"

namespace onp_fast {

BnMaskArgs bn_mask_prepare(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const std::optional<at::Tensor>& index, bool inplace) {
  TORCH_CHECK(x.dim() >= 3, "bn_mask_relu: x must be [Kx, B, C, *spatial], got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "bn_mask_relu: x must be float32, bfloat16 or float16");
  TORCH_CHECK(scale.dim() == 2 && shift.sizes() == scale.sizes(), "bn_mask_relu: scale/shift must be [K, C]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && shift.scalar_type() == at::kFloat,
              "bn_mask_relu: scale/shift must be float32");
  TORCH_CHECK(scale.device() == x.device() && shift.device() == x.device(), "bn_mask_relu: device mismatch");
  BnMaskArgs a;
  a.K = scale.size(0);
  a.Kx = x.size(0);
  a.B = x.size(1);
  a.C = x.size(2);
  TORCH_CHECK(scale.size(1) == a.C, "bn_mask_relu: scale has ", scale.size(1), " channels, x has ", a.C);
  TORCH_CHECK(a.Kx == a.K || (a.Kx == 1 && !inplace), "bn_mask_relu: x's first dim must be K or 1 (", a.K, "), got ", a.Kx);
  a.S = 1;
  for (int64_t d = 3; d < x.dim(); ++d) a.S *= x.size(d);
  // Channels-last per mask: the channel dim has stride 1 and the spatial dims are outer to it.
  a.channels_last = x.dim() >= 4 && a.C > 1 && x.stride(2) == 1 && a.S > 1;
  at::Tensor phys = a.channels_last ? x.movedim(2, -1) : x;
  if (inplace) {
    TORCH_CHECK(phys.is_contiguous(), "bn_mask_relu_: x must be dense per mask (contiguous or channels-last)");
    a.x = phys;
  } else {
    a.x = phys.contiguous();
  }
  a.scale = scale.contiguous();
  a.shift = shift.contiguous();
  a.Cout = a.C;
  if (index.has_value() && index->defined()) {
    TORCH_CHECK(!inplace, "bn_mask_relu_: no index in place");
    TORCH_CHECK(index->dim() == 2 && index->size(0) == a.K, "bn_mask_relu: index must be [K, C']");
    TORCH_CHECK(index->scalar_type() == at::kLong, "bn_mask_relu: index must be int64");
    TORCH_CHECK(index->device() == x.device(), "bn_mask_relu: index device mismatch");
    a.index = index->contiguous();
    a.Cout = index->size(1);
    TORCH_CHECK(a.index.numel() == 0 || (a.index.max().item<int64_t>() < a.C && a.index.min().item<int64_t>() >= -1),
                "bn_mask_relu: index out of range [-1, ", a.C, ")");
  }
  return a;
}

at::Tensor bn_mask_empty_out(const BnMaskArgs& a, const at::Tensor& x) {
  std::vector<int64_t> shape = {a.K, a.B};
  std::vector<int64_t> spatial(x.sizes().begin() + 3, x.sizes().end());
  if (a.channels_last) {
    shape.insert(shape.end(), spatial.begin(), spatial.end());
    shape.push_back(a.Cout);
    return at::empty(shape, x.options()).movedim(-1, 2);
  }
  shape.push_back(a.Cout);
  shape.insert(shape.end(), spatial.begin(), spatial.end());
  return at::empty(shape, x.options());
}

void reward_epilogue_check(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 3, "reward_epilogue: logits must be [K, B, C]");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "reward_epilogue: logits must be floating point");
  TORCH_CHECK(logits.size(2) > 0, "reward_epilogue: logits need at least one class");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(1), "reward_epilogue: labels must be [B]");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "reward_epilogue: labels must be int64");
  TORCH_CHECK(labels.device() == logits.device(), "reward_epilogue: device mismatch");
  TORCH_CHECK(labels.numel() == 0 || (labels.min().item<int64_t>() >= 0 && labels.max().item<int64_t>() < logits.size(2)),
              "reward_epilogue: a label is out of range [0, ", logits.size(2), ")");
}

namespace {

// Element access of the CPU loops: E::U is the type the loops read and write, E::load / E::store convert it
// to and from float. bfloat16 goes through its raw bits (c10's round-to-nearest-even, NaN to 0x7FC0),
// branch-free on uint16_t so the compiler vectorises the loops (on c10::BFloat16 it does not: 3x slower).
template <typename T>
struct Elem {
  using U = T;
  static float load(U v) { return static_cast<float>(v); }
  static U store(float f) { return static_cast<U>(f); }
};
template <>
struct Elem<c10::BFloat16> {
  using U = uint16_t;
  static float load(U v) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static U store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<U>(f != f ? 0x7FC0u : rounded);
  }
};

// out/x physical layouts as in BnMaskArgs, both of element type T (x's dtype); out may alias x (in place,
// no index). Each element: load as float, mf::bn_mask_act in float, round once to T on store.
template <typename T>
void bn_mask_relu_kernel(const BnMaskArgs& a, T* out_t, bool relu) {
  using E = Elem<T>;
  using U = typename E::U;
  const U* x = reinterpret_cast<const U*>(a.x.const_data_ptr<T>());
  U* out = reinterpret_cast<U*>(out_t);
  const float* scale = a.scale.const_data_ptr<float>();
  const float* shift = a.shift.const_data_ptr<float>();
  const int64_t* index = a.index.defined() ? a.index.const_data_ptr<int64_t>() : nullptr;
  const int64_t K = a.K, Kx = a.Kx, B = a.B, C = a.C, Cout = a.Cout, S = a.S;
  const U zero = E::store(0.f);
  if (a.channels_last) {
    // rows (k, b, s): C contiguous in, Cout contiguous out.
    const int64_t rows = K * B * S;
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(Cout, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t k = r / (B * S);
        const int64_t bs = r - k * B * S;
        const U* xr = x + ((Kx == 1 ? 0 : k) * B * S + bs) * C;
        U* orow = out + r * Cout;
        const float* sc = scale + k * C;
        const float* sh = shift + k * C;
        if (index) {
          const int64_t* ix = index + k * Cout;
          for (int64_t j = 0; j < Cout; ++j) {
            const int64_t c = ix[j];
            orow[j] = c < 0 ? zero : E::store(mf::bn_mask_act(E::load(xr[c]), sc[c], sh[c], relu));
          }
        } else {
          for (int64_t c = 0; c < C; ++c)
            orow[c] = E::store(mf::bn_mask_act(E::load(xr[c]), sc[c], sh[c], relu));
        }
      }
    });
  } else {
    // planes (k, b, j): S contiguous.
    const int64_t planes = K * B * Cout;
    at::parallel_for(0, planes, std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1)), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t k = p / (B * Cout);
        const int64_t b = (p / Cout) % B;
        const int64_t j = p % Cout;
        const int64_t c = index ? index[k * Cout + j] : j;
        U* op = out + p * S;
        if (c < 0) {
          for (int64_t s = 0; s < S; ++s) op[s] = zero;
          continue;
        }
        const U* xp = x + (((Kx == 1 ? 0 : k) * B + b) * C + c) * S;
        const float sc = scale[k * C + c], sh = shift[k * C + c];
        for (int64_t s = 0; s < S; ++s) op[s] = E::store(mf::bn_mask_act(E::load(xp[s]), sc, sh, relu));
      }
    });
  }
}

// Runs bn_mask_relu_kernel for x's dtype: float32, bfloat16 or float16 (bn_mask_prepare rejects the rest).
// out: the physical output buffer (a.x itself in place), of x's dtype.
void bn_mask_relu_dispatch(const BnMaskArgs& a, at::Tensor& out, bool relu) {
  AT_DISPATCH_SWITCH(a.x.scalar_type(), "bn_mask_relu_cpu",
                     AT_DISPATCH_CASE(at::kFloat, [&] {
                       bn_mask_relu_kernel<scalar_t>(a, out.mutable_data_ptr<scalar_t>(), relu);
                     }) AT_DISPATCH_CASE(at::kHalf, [&] {
                       bn_mask_relu_kernel<scalar_t>(a, out.mutable_data_ptr<scalar_t>(), relu);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       bn_mask_relu_kernel<scalar_t>(a, out.mutable_data_ptr<scalar_t>(), relu);
                     }));
}

}  // namespace

at::Tensor bn_mask_relu_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                            const std::optional<at::Tensor>& index, bool relu) {
  BnMaskArgs a = bn_mask_prepare(x, scale, shift, index, false);
  at::Tensor out = bn_mask_empty_out(a, x);
  at::Tensor phys = a.channels_last ? out.movedim(2, -1) : out;
  bn_mask_relu_dispatch(a, phys, relu);
  return out;
}

void bn_mask_relu_inplace_cpu(at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, bool relu) {
  BnMaskArgs a = bn_mask_prepare(x, scale, shift, std::nullopt, true);
  bn_mask_relu_dispatch(a, a.x, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reward_epilogue_cpu(const at::Tensor& logits,
                                                                               const at::Tensor& labels) {
  reward_epilogue_check(logits, labels);
  const int64_t K = logits.size(0), B = logits.size(1), C = logits.size(2);
  at::Tensor lab = labels.contiguous();
  const int64_t* y = lab.const_data_ptr<int64_t>();
  at::Tensor correct = at::zeros({K}, labels.options());
  at::Tensor ce = at::zeros({K}, logits.options().dtype(at::kDouble));
  at::Tensor counts = at::zeros({K, C}, labels.options());
  at::Tensor prob = at::zeros({K}, logits.options().dtype(at::kDouble));
  at::Tensor lg = logits.contiguous();
  int64_t* pc = correct.mutable_data_ptr<int64_t>();
  double* pe = ce.mutable_data_ptr<double>();
  int64_t* pn = counts.mutable_data_ptr<int64_t>();
  double* pp = prob.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lg.scalar_type(), "reward_epilogue_cpu", [&] {
    const scalar_t* L = lg.const_data_ptr<scalar_t>();
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        int64_t hits = 0;
        double sum = 0.0, psum = 0.0;
        for (int64_t b = 0; b < B; ++b) {
          int64_t arg;
          double l, p;
          mf::row_reward(L + (k * B + b) * C, C, y[b], &arg, &l, &p);
          hits += arg == y[b];
          sum += l;
          psum += p;
          pn[k * C + arg] += 1;
        }
        pc[k] = hits;
        pe[k] = sum;
        pp[k] = psum;
      }
    });
  });
  return {correct, ce, counts, prob};
}

}  // namespace onp_fast
