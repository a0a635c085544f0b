// AdamW with fp32 master weights: the per-element math, shared by the CPU and CUDA kernels, and
// the codecs of the compact state formats (python/hift/formats.py is their specification).
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
//
// Compact state is decoded to fp32 before this math and encoded after it; the math never sees
// the format. The codecs are integer functions of the fp32 bits, so kernels and the reference
// agree on them bit for bit wherever they agree on the fp32 value.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Always inlined on the host too: the per-ISA CPU units compile these under their own target
// pragma, and an out-of-line copy (one symbol for all units) could hand AVX-512 code to a CPU
// without it.
#if defined(__CUDACC__)
#define HIFT_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define HIFT_HOST_DEVICE inline __attribute__((always_inline))
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
  uint32_t exp_avg_key;         // stochastic rounding keys of bf16 moments (formats.rounding_key)
  uint32_t exp_avg_sq_key;
};

// ---------------------------------------------------------------- compact state (formats.py)

// Where the master of a param lives; one format per call.
enum class MasterFormat {
  kNone,       // the fp32 param is its own master
  kFp32,       // an fp32 master beside the param (copied out rounded to nearest even)
  kRemainder,  // bf16 param + int16 remainder: the low 16 bits of the fp32 master
};

HIFT_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

HIFT_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// formats.lowbias32 (Wellons): a 32-bit hash with strong avalanche; uint32 arithmetic wraps.
HIFT_HOST_DEVICE uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Stochastic rounding streams (formats.MOMENT_STREAMS).
constexpr uint32_t kExpAvgStream = 0;
constexpr uint32_t kExpAvgSqStream = 1;

// formats.rounding_key: one update's key for one moment, from the group's seed and the step.
HIFT_HOST_DEVICE uint32_t rounding_key(uint32_t seed, int64_t step, uint32_t stream) {
  return lowbias32(seed ^ lowbias32(static_cast<uint32_t>(2 * step + stream)));
}

// formats.to_bf16_stochastic for one element: the fp32 bits u plus 16 random bits below the cut,
// truncated; `index` is the element's number in its group (offset + position, mod 2^32).
HIFT_HOST_DEVICE uint16_t bf16_bits_stochastic(uint32_t u, uint32_t key, uint32_t index) {
  return static_cast<uint16_t>((u + (lowbias32(key ^ index) & 0xffffu)) >> 16);
}

// formats.join_master: the fp32 bits of a master from its bf16 weight's bits and its remainder.
HIFT_HOST_DEVICE uint32_t join_master_bits(uint16_t weight_bits, int16_t remainder) {
  return (static_cast<uint32_t>(weight_bits) << 16) +
         static_cast<uint32_t>(static_cast<int32_t>(remainder));
}

// formats.split_master: the weight is the master to nearest bf16, ties away from zero (adding
// half a bf16 step to the bits rounds the magnitude half up), not the round-to-even of the fp32
// master path: ties to even would give a tie that went down and one that went up the same
// remainder. The remainder, u - (weight << 16), is then in [-0x8000, 0x7fff].
HIFT_HOST_DEVICE uint16_t remainder_weight_bits(uint32_t master_bits) {
  return static_cast<uint16_t>((master_bits + 0x8000u) >> 16);
}

HIFT_HOST_DEVICE int16_t remainder_bits(uint32_t master_bits) {
  const uint32_t high = (master_bits + 0x8000u) >> 16;
  return static_cast<int16_t>(static_cast<uint16_t>(master_bits - (high << 16)));
}

// ------------------------------------------------------------------------- int8 moments
// formats.encode_exp_avg / encode_exp_avg_sq and their decoders, per element, given the block's
// scales. Blocks of kInt8Block elements of one tensor; the kernels gather a block's new fp32
// moments, reduce its scales, then encode. Only integer and single IEEE fp32 operations (no
// contraction: the build passes -ffp-contract=off / --fmad=false), so every device agrees with
// the reference bit for bit.
constexpr int64_t kInt8Block = 256;

// To nearest, ties to even, as torch.round, for |x| <= 2^22: adding and taking away 1.5 * 2^23
// leaves no bits below the units. Plain fp32 adds (no libm call), so the loops vectorize.
HIFT_HOST_DEVICE float int8_round_even(float x) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (x + kMagic) - kMagic;
}

// exp_avg: the block's scale is absmax / 127 (decode: q * scale); a code is m * (127 / absmax) to
// nearest even (a multiply, not a divide per element; 0 in an all-zero block).
HIFT_HOST_DEVICE float exp_avg_scale(float absmax) { return absmax / 127.0f; }

HIFT_HOST_DEVICE float exp_avg_inv_scale(float absmax) { return absmax > 0.0f ? 127.0f / absmax : 0.0f; }

HIFT_HOST_DEVICE int8_t encode_exp_avg(float m, float inv_scale) {
  float q = int8_round_even(m * inv_scale);  // |q| <= 127 up to a rounding
  q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
  return static_cast<int8_t>(q);
}

HIFT_HOST_DEVICE float decode_exp_avg(int8_t q, float scale) {
  return static_cast<float>(q) * scale;
}

// A uniform draw in [0, 1) from the top 24 of 32 hash bits (exact in fp32).
HIFT_HOST_DEVICE float uniform_24bits(uint32_t random) {
  return static_cast<float>(static_cast<int32_t>(random >> 8)) * 5.9604644775390625e-08f;  // 2^-24
}

// exp_avg_sq: codes 1..255 evenly spaced on the fp32 bits between the block's smallest positive
// value lo and its largest hi; code 0 is zero. int32 throughout (a positive float's bits are below
// 2^31) and branch-free, so the CPU loops vectorize.
struct LogBitsCode {
  int32_t lo;      // bits of lo
  int32_t span;    // bits of hi - bits of lo
  float step;      // bits per code, span / 254 in fp32
  float inv_step;  // 1 / step (0 when span is 0): only for the first guess of a code

  HIFT_HOST_DEVICE LogBitsCode(float lo_value, float hi_value)
      : lo(static_cast<int32_t>(float_bits(lo_value))),
        span(static_cast<int32_t>(float_bits(hi_value)) - static_cast<int32_t>(float_bits(lo_value))),
        step(static_cast<float>(span) / 254.0f),
        inv_step(span > 0 ? 1.0f / (static_cast<float>(span) / 254.0f) : 0.0f) {}

  // The bits of code j + 1, j in 0..254 (formats._code_bits).
  HIFT_HOST_DEVICE int32_t bits_of(int32_t j) const {
    const int32_t offset = static_cast<int32_t>(static_cast<float>(j) * step);  // truncates
    return lo + (offset < span ? offset : span);
  }

  HIFT_HOST_DEVICE float decode(uint8_t code) const {
    const int32_t bits = bits_of(static_cast<int32_t>(code) - 1);
    return bits_float(static_cast<uint32_t>(code == 0 ? 0 : bits));  // bits 0: +0.0f
  }

  // Encoding v >= 0 in two steps, each a simple loop that vectorizes: guess() is within a code of
  // j, the last code at or below v; settle() makes it exact (one look each way: the codes' bits
  // are monotone in j), then goes up one code with probability (v - below) / (above - below), as
  // r * (above - below) < v - below for r uniform in [0, 1) (uniform_24bits). Code 0 is v = 0.
  HIFT_HOST_DEVICE int32_t guess(float v) const {
    float t = static_cast<float>(static_cast<int32_t>(float_bits(v)) - lo) * inv_step;
    t = t < 0.0f ? 0.0f : (t > 254.0f ? 254.0f : t);
    return static_cast<int32_t>(t);
  }

  HIFT_HOST_DEVICE int32_t settle(float v, int32_t j, float r) const {
    const int32_t u = static_cast<int32_t>(float_bits(v));
    // (bitwise & rather than &&, no branches; bits_of(255) is in range)
    j += static_cast<int32_t>(j < 254) & static_cast<int32_t>(bits_of(j + 1) <= u);
    j -= static_cast<int32_t>(j > 0) & static_cast<int32_t>(bits_of(j) > u);
    const float below = bits_float(static_cast<uint32_t>(bits_of(j)));
    const float above = bits_float(static_cast<uint32_t>(bits_of(j < 254 ? j + 1 : 254)));
    const int32_t up = static_cast<int32_t>(j < 254) & static_cast<int32_t>(r * (above - below) < v - below);
    return (j + 1 + up) & -static_cast<int32_t>(v > 0.0f);
  }

  HIFT_HOST_DEVICE uint8_t encode(float v, uint32_t random) const {
    return static_cast<uint8_t>(settle(v, guess(v), uniform_24bits(random)));
  }
};

// ------------------------------------------------------------------------------- the update

// `step` is this update's 1-based count (bias correction and rounding keys), `seed` the group's
// stochastic rounding seed (formats.group_seed).
HIFT_HOST_DEVICE AdamWScalars make_adamw_scalars(double lr, double step, double beta1, double beta2,
                                                 double eps, double grad_scale, uint32_t seed) {
  AdamWScalars s;
  s.lr = static_cast<float>(lr);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.neg_step_size = static_cast<float>(-(lr / (1.0 - pow(beta1, step))));
  s.bias_correction2_sqrt = static_cast<float>(sqrt(1.0 - pow(beta2, step)));
  s.eps = static_cast<float>(eps);
  s.grad_scale = static_cast<float>(grad_scale);
  // the key's step is the integer count, as Python's int(step)
  s.exp_avg_key = rounding_key(seed, static_cast<int64_t>(step), kExpAvgStream);
  s.exp_avg_sq_key = rounding_key(seed, static_cast<int64_t>(step), kExpAvgSqStream);
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

// One tensor of a CPU update: raw pointers, its decay factor 1 - lr*wd, and where it starts in
// its group's element numbering (stochastic rounding draws per group element, so the bits do
// not depend on how a group is cut into tensors or chunks).
struct AdamWTensorRoles {
  void* param;
  void* master;      // fp32 master or int16 remainder; == param when the fp32 param is its own
  void* exp_avg;     // fp32, bf16 or int8 codes
  void* exp_avg_sq;  // fp32, bf16 or uint8 codes
  float* exp_avg_scale;     // int8 moments: one fp32 scale per block (else null)
  float* exp_avg_sq_scale;  // int8 moments: (lo, hi) per block (else null)
  const void* grad;
  float decay;
  uint32_t offset;   // mod 2^32, as the hash takes it
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
#include <string>

namespace hift {

// The instruction set of the CPU kernel fused_adamw_ runs in this process: "avx512", "avx2" or
// "portable" (torch.ops.hift.cpu_kernel_isa; ATEN_CPU_CAPABILITY caps it as it caps ATen's).
std::string cpu_kernel_isa();

// Checks lengths, dtypes, formats, devices, contiguity and sizes of one fused_adamw_ call; throws
// in words.
void check_fused_adamw_args(at::TensorList params, at::TensorList masters, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList grads,
                            at::ArrayRef<double> weight_decays, const at::Tensor& lr,
                            const at::Tensor& step, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf, at::IntArrayRef offsets,
                            at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales);

// The master format of a checked call: none (no masters), fp32 (float32) or remainder (int16).
MasterFormat master_format_of(at::TensorList masters);

}  // namespace hift
#endif
