// AdamW with fp32 master weights: the per-element math, shared by the CPU and CUDA kernels.
//
// The order of operations is torch.optim.AdamW's (single-tensor path) and ops.reference_adamw_'s,
// with fused multiply-adds where torch's kernels have them, so the fused kernels agree with both
// to the last bit or within a few fp32 roundings:
//   master *= 1 - lr*wd
//   m       = fma(1-beta1, g - m, m)                 (lerp_ with a weight < 0.5)
//   v       = fma((1-beta2) * g, g, v*beta2)         (mul_ then addcmul_)
//   denom   = sqrt(v) / sqrt(1-beta2^step) + eps
//   master  = master + (-(lr / (1-beta1^step)) * m) / denom    (addcdiv_)
// sqrt and / are IEEE (correctly rounded); torch's CPU sqrt goes through MKL VML, which is not
// always, so against torch on a CPU about one element in a thousand differs by an ulp per step.
// The per-step scalars are formed in double and rounded to float once, as torch does when a
// Python float meets an fp32 tensor. `V` is float (scalar code, CUDA) or at::vec::Vectorized<float>.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define HIFT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HIFT_HOST_DEVICE inline
#endif

namespace hift {

// Scalars fixed for one call (one step of one group), before broadcasting to V.
struct AdamWScalars {
  float lr;                     // for the per-tensor decay factor 1 - lr*wd (formed in double)
  float one_minus_beta1;        // lerp weight
  float beta2;
  float one_minus_beta2;
  float neg_step_size;          // -lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  float eps;
  float grad_scale;             // 1 when there is none (multiplying by 1 is exact)
};

HIFT_HOST_DEVICE AdamWScalars make_adamw_scalars(double lr, double step, double beta1, double beta2,
                                                 double eps, double grad_scale) {
  AdamWScalars s;
  s.lr = static_cast<float>(lr);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.neg_step_size = static_cast<float>(-(lr / (1.0 - pow(beta1, step))));
  s.bias_correction2_sqrt = static_cast<float>(sqrt(1.0 - pow(beta2, step)));
  s.eps = static_cast<float>(eps);
  s.grad_scale = static_cast<float>(grad_scale);
  return s;
}

// 1 - lr*wd as torch forms it: lr is the fp32 value widened to double, the product in double.
HIFT_HOST_DEVICE float decay_factor(float lr, double weight_decay) {
  return static_cast<float>(1.0 - static_cast<double>(lr) * weight_decay);
}

HIFT_HOST_DEVICE float hift_sqrt(float x) { return sqrtf(x); }

template <typename V>
HIFT_HOST_DEVICE V hift_sqrt(const V& x) { return x.sqrt(); }

// The same scalars as V (a broadcast for vectors; a copy for float).
template <typename V>
struct AdamWCoeffs {
  V decay, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
      grad_scale;
  HIFT_HOST_DEVICE AdamWCoeffs(const AdamWScalars& s, float decay_)
      : decay(decay_), one_minus_beta1(s.one_minus_beta1), beta2(s.beta2),
        one_minus_beta2(s.one_minus_beta2), neg_step_size(s.neg_step_size),
        bias_correction2_sqrt(s.bias_correction2_sqrt), eps(s.eps), grad_scale(s.grad_scale) {}
};

// A fused multiply-add where torch's own kernels have one (its lerp calls fmadd; its addcmul is
// contracted by the compiler), so the fused update rounds as torch.optim.AdamW does.
// On vectors it is at::vec::fmadd (found by ADL): fused where the ISA has FMA, as in ATen.
HIFT_HOST_DEVICE float hift_fmadd(float a, float b, float c) { return fmaf(a, b, c); }

template <typename V>
HIFT_HOST_DEVICE V hift_fmadd(const V& a, const V& b, const V& c) { return fmadd(a, b, c); }

// One element (or one vector of elements): g is the raw gradient widened to fp32.
template <typename V>
HIFT_HOST_DEVICE void adamw_math(V& master, V& m, V& v, V g, const AdamWCoeffs<V>& c) {
  g = g * c.grad_scale;
  master = master * c.decay;                                  // mul_
  m = hift_fmadd(c.one_minus_beta1, g - m, m);                // lerp_
  v = hift_fmadd(c.one_minus_beta2 * g, g, v * c.beta2);      // mul_, addcmul_
  const V denom = hift_sqrt(v) / c.bias_correction2_sqrt + c.eps;
  master = master + c.neg_step_size * m / denom;              // addcdiv_
}

// One tensor of a CPU update: raw pointers and its decay factor 1 - lr*wd.
struct AdamWTensorRoles {
  void* param;
  float* master;  // == param when the param is fp32 and its own master
  float* exp_avg;
  float* exp_avg_sq;
  const void* grad;
  float decay;
};

// Updates elements [begin, end) of one tensor (a CPU kernel specialised for its dtypes).
using AdamWRangeFn = void (*)(const AdamWTensorRoles&, int64_t, int64_t, const AdamWScalars&);

}  // namespace hift

// ---------------------------------------------------------------------------------------------
// Host side: argument checks shared by the CPU and CUDA launchers (defined in adamw_cpu.cpp).
// Left out of the per-ISA CPU translation units, which must odr-use nothing but the vector code.
#if !defined(HIFT_ADAMW_MATH_ONLY)
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <optional>

namespace hift {

// Checks lengths, dtypes, devices, contiguity and sizes of one fused_adamw_ call; throws in words.
void check_fused_adamw_args(at::TensorList params, at::TensorList masters, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList grads,
                            at::ArrayRef<double> weight_decays, const at::Tensor& lr,
                            const at::Tensor& step, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf);

}  // namespace hift
#endif
