// The CPU AdamW kernel body, compiled once per instruction set: adamw_cpu.cpp (portable),
// adamw_cpu_avx2.cpp and adamw_cpu_avx512.cpp each choose the ISA, then include this header.
// One update, adamw_step, templated on each role's type (param P, grad G, master format, moments
// M and V); every state format of hift.formats is an instance of it.
// at::vec keeps its Vectorized types in a namespace named after CPU_CAPABILITY, and everything
// here lives in hift::HIFT_CPU_ISA, so no symbol compiled for one ISA can stand in for another's
// at link time. The per-ISA units odr-use nothing else (no scalar c10 conversions: tails go
// through Vectorized::loadu(ptr, count); adamw.h's scalar codecs are always inlined);
// adamw_cpu.cpp picks one at run time.
#pragma once

#if !defined(HIFT_CPU_ISA) || !defined(CPU_CAPABILITY)
#error "define HIFT_CPU_ISA and CPU_CAPABILITY before including adamw_cpu_kernel.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "adamw.h"
#include "adamw_dispatch.h"

namespace hift {
namespace HIFT_CPU_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
// One step covers two float vectors: the width of one bf16/fp16 vector, so each role loads and
// stores whole vectors.
constexpr int64_t kWidth = 2 * Vec::size();

template <typename T>
inline void load_pair(const T* p, int64_t count, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    if (count == kWidth) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + Vec::size());
    } else {
      a = Vec::loadu(p, count < Vec::size() ? count : Vec::size());
      b = count > Vec::size() ? Vec::loadu(p + Vec::size(), count - Vec::size()) : Vec(0.0f);
    }
  } else {
    const auto raw = count == kWidth ? at::vec::Vectorized<T>::loadu(p)
                                     : at::vec::Vectorized<T>::loadu(p, count);
    std::tie(a, b) = at::vec::convert_to_float<T>(raw);
  }
}

template <typename T>
inline void store_pair(T* p, int64_t count, const Vec& a, const Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    if (count == kWidth) {
      a.store(p);
      b.store(p + Vec::size());
    } else {
      a.store(p, count < Vec::size() ? count : Vec::size());
      if (count > Vec::size()) b.store(p + Vec::size(), count - Vec::size());
    }
  } else {
    const auto packed = at::vec::convert_from_float<T>(a, b);
    if (count == kWidth) {
      packed.store(p);
    } else {
      packed.store(p, count);
    }
  }
}

// The compact formats' codecs (adamw.h) are integer functions of the fp32 bits; they run lane by
// lane over a stack array of one step's bits, because at::vec has no unsigned 32-bit vector (its
// int32 right shift is arithmetic) and these constant-trip loops are vectorized by the compiler
// for the unit's ISA anyway. Memory is still read and written once, a whole step at a time.
using Bits = uint32_t[kWidth];
using Halves = uint16_t[kWidth];

// Inlined into adamw_step, so that a whole step's copies have a constant size (vector moves, not
// calls to memcpy).
#if defined(__GNUC__)
#define HIFT_CODEC_INLINE inline __attribute__((always_inline))
#else
#define HIFT_CODEC_INLINE inline
#endif

// count 16-bit lanes between memory and a step's stack array.
template <typename T>
HIFT_CODEC_INLINE void copy_lanes(void* dst, const void* src, int64_t count) {
  static_assert(sizeof(T) == 2);
  if (count == kWidth) {
    std::memcpy(dst, src, kWidth * sizeof(T));
  } else {
    std::memcpy(dst, src, count * sizeof(T));
  }
}

HIFT_CODEC_INLINE void store_bits(const Vec& a, const Vec& b, Bits& bits) {
  a.store(bits);
  b.store(bits + Vec::size());
}

// A bf16 moment, rounded stochastically (formats.to_bf16_stochastic); `index` is the first
// element's number in its group.
HIFT_CODEC_INLINE void store_stochastic(c10::BFloat16* p, int64_t count, const Vec& a, const Vec& b,
                             uint32_t key, uint32_t index) {
  alignas(64) Bits bits;
  alignas(64) Halves out;
  store_bits(a, b, bits);
  for (int64_t k = 0; k < kWidth; ++k) {
    out[k] = bf16_bits_stochastic(bits[k], key, index + static_cast<uint32_t>(k));
  }
  copy_lanes<uint16_t>(p, out, count);
}

template <typename T>
HIFT_CODEC_INLINE void store_moment(T* p, int64_t count, const Vec& a, const Vec& b, uint32_t key,
                         uint32_t index) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    store_stochastic(p, count, a, b, key, index);
  } else {
    store_pair(p, count, a, b);
  }
}

// The fp32 master of a bf16 weight and its int16 remainder (formats.join_master).
HIFT_CODEC_INLINE void load_remainder_master(const c10::BFloat16* weight, const int16_t* remainder,
                                  int64_t count, Vec& a, Vec& b) {
  alignas(64) Halves high;
  alignas(64) int16_t low[kWidth];
  if (count < kWidth) {  // the lanes past a tail are zero, as Vec::loadu(ptr, count) leaves them
    std::memset(high, 0, sizeof(high));
    std::memset(low, 0, sizeof(low));
  }
  copy_lanes<uint16_t>(high, weight, count);
  copy_lanes<int16_t>(low, remainder, count);
  alignas(64) Bits bits;
  for (int64_t k = 0; k < kWidth; ++k) bits[k] = join_master_bits(high[k], low[k]);
  a = Vec::loadu(bits);
  b = Vec::loadu(bits + Vec::size());
}

// An fp32 master as its bf16 weight (ties away from zero) and int16 remainder (split_master).
HIFT_CODEC_INLINE void store_remainder_master(c10::BFloat16* weight, int16_t* remainder, int64_t count,
                                   const Vec& a, const Vec& b) {
  alignas(64) Bits bits;
  alignas(64) Halves high;
  alignas(64) int16_t low[kWidth];
  store_bits(a, b, bits);
  for (int64_t k = 0; k < kWidth; ++k) {
    high[k] = remainder_weight_bits(bits[k]);
    low[k] = remainder_bits(bits[k]);
  }
  copy_lanes<uint16_t>(weight, high, count);
  copy_lanes<int16_t>(remainder, low, count);
}

// The one update, for every format: decode each role to fp32, adamw_math, encode each role.
template <typename P, typename G, MasterFormat kMaster, typename M, typename V>
HIFT_CODEC_INLINE void adamw_step(P* param, master_t<kMaster>* master, M* m, V* v, const G* grad,
                       int64_t count, uint32_t index, const AdamWCoeffs<Vec>& c,
                       const AdamWScalars& s) {
  Vec w0, w1, m0, m1, v0, v1, g0, g1;
  if constexpr (kMaster == MasterFormat::kRemainder) {
    load_remainder_master(param, master, count, w0, w1);
  } else {
    load_pair(master, count, w0, w1);
  }
  load_pair(m, count, m0, m1);
  load_pair(v, count, v0, v1);
  load_pair(grad, count, g0, g1);
  adamw_math(w0, m0, v0, g0, c);
  adamw_math(w1, m1, v1, g1, c);
  if constexpr (kMaster == MasterFormat::kRemainder) {
    store_remainder_master(param, master, count, w0, w1);
  } else {
    store_pair(master, count, w0, w1);
    if constexpr (kMaster == MasterFormat::kFp32) store_pair(param, count, w0, w1);
  }
  store_moment(m, count, m0, m1, s.exp_avg_key, index);
  store_moment(v, count, v0, v1, s.exp_avg_sq_key, index);
}

template <typename P, typename G, MasterFormat kMaster, typename M, typename V>
void adamw_range(const AdamWTensorRoles& t, int64_t begin, int64_t end, const AdamWScalars& s) {
  auto* param = static_cast<P*>(t.param);
  auto* master = static_cast<master_t<kMaster>*>(t.master);
  auto* m = static_cast<M*>(t.exp_avg);
  auto* v = static_cast<V*>(t.exp_avg_sq);
  auto* grad = static_cast<const G*>(t.grad);
  const AdamWCoeffs<Vec> c(s, t.decay);
  auto index = [&](int64_t i) { return t.offset + static_cast<uint32_t>(i); };  // mod 2^32
  int64_t i = begin;
  for (; i + kWidth <= end; i += kWidth) {
    adamw_step<P, G, kMaster>(param + i, master + i, m + i, v + i, grad + i, kWidth, index(i), c, s);
  }
  if (i < end) {
    adamw_step<P, G, kMaster>(param + i, master + i, m + i, v + i, grad + i, end - i, index(i), c, s);
  }
}

// int8 moments (formats.encode_exp_avg, encode_exp_avg_sq), one block: its codes are decoded into
// fp32 arrays on the stack, the one update runs over them as fp32 moments, and the new values are
// encoded with the block's new scales. The codec loops are branch-free int32/fp32 code the
// compiler vectorizes for the unit's ISA. `kFull` blocks have kInt8Block elements, a constant trip
// count for every loop (no masked tails); only a tensor's last block can be shorter.
template <typename P, typename G, MasterFormat kMaster, bool kFull>
HIFT_CODEC_INLINE void adamw_block_int8(const AdamWTensorRoles& t, int64_t b0, int64_t short_n,
                                        const AdamWCoeffs<Vec>& c, const AdamWScalars& s) {
  const int64_t n = kFull ? kInt8Block : short_n;
  auto* param = static_cast<P*>(t.param) + b0;
  auto* master = static_cast<master_t<kMaster>*>(t.master) + b0;
  auto* m_codes = static_cast<int8_t*>(t.exp_avg) + b0;
  auto* v_codes = static_cast<uint8_t*>(t.exp_avg_sq) + b0;
  auto* grad = static_cast<const G*>(t.grad) + b0;
  const int64_t block = b0 / kInt8Block;
  const uint32_t index = t.offset + static_cast<uint32_t>(b0);  // mod 2^32
  alignas(64) float m[kInt8Block];
  alignas(64) float v[kInt8Block];
  const float old_m_scale = t.exp_avg_scale[block];
  const LogBitsCode old_code(t.exp_avg_sq_scale[2 * block], t.exp_avg_sq_scale[2 * block + 1]);
  for (int64_t k = 0; k < n; ++k) m[k] = decode_exp_avg(m_codes[k], old_m_scale);
  for (int64_t k = 0; k < n; ++k) v[k] = old_code.decode(v_codes[k]);
  for (int64_t i = 0; i < n; i += kWidth) {
    const int64_t count = kFull ? kWidth : (n - i < kWidth ? n - i : kWidth);
    adamw_step<P, G, kMaster, float, float>(param + i, master + i, m + i, v + i, grad + i, count,
                                            index + static_cast<uint32_t>(i), c, s);
  }
  // the block's new scales (padding past a short block's end is 0: no |m|, no positive v)
  if constexpr (!kFull) {
    for (int64_t k = n; k < kInt8Block; ++k) m[k] = v[k] = 0.0f;
  }
  Vec absmax_v(0.0f), lo_v(INFINITY), hi_v(0.0f);
  for (int64_t k = 0; k < kInt8Block; k += Vec::size()) {
    const Vec mk = Vec::loadu(m + k), vk = Vec::loadu(v + k);
    absmax_v = at::vec::maximum(absmax_v, mk.abs());
    lo_v = at::vec::minimum(lo_v, Vec::blendv(Vec(INFINITY), vk, vk > Vec(0.0f)));
    hi_v = at::vec::maximum(hi_v, vk);
  }
  alignas(64) float lanes[3][Vec::size()];
  absmax_v.store(lanes[0]);
  lo_v.store(lanes[1]);
  hi_v.store(lanes[2]);
  float absmax = 0.0f, lo = INFINITY, hi = 0.0f;
  for (int64_t l = 0; l < Vec::size(); ++l) {
    absmax = lanes[0][l] > absmax ? lanes[0][l] : absmax;
    lo = lanes[1][l] < lo ? lanes[1][l] : lo;
    hi = lanes[2][l] > hi ? lanes[2][l] : hi;
  }
  lo = lo == INFINITY ? 0.0f : lo;
  const LogBitsCode code(lo, hi);
  const float m_inv_scale = exp_avg_inv_scale(absmax);
  for (int64_t k = 0; k < n; ++k) m_codes[k] = encode_exp_avg(m[k], m_inv_scale);
  // exp_avg_sq in simple loops the compiler vectorizes: draws, first guesses, codes, bytes
  alignas(64) float r[kInt8Block];
  alignas(64) int32_t j[kInt8Block];
  for (int64_t k = 0; k < n; ++k) {
    r[k] = uniform_24bits(lowbias32(s.exp_avg_sq_key ^ (index + static_cast<uint32_t>(k))));
  }
  for (int64_t k = 0; k < n; ++k) j[k] = code.guess(v[k]);
  for (int64_t k = 0; k < n; ++k) j[k] = code.settle(v[k], j[k], r[k]);
  for (int64_t k = 0; k < n; ++k) v_codes[k] = static_cast<uint8_t>(j[k]);
  t.exp_avg_scale[block] = exp_avg_scale(absmax);
  t.exp_avg_sq_scale[2 * block] = lo;
  t.exp_avg_sq_scale[2 * block + 1] = hi;
}

// Elements [begin, end) of one tensor with int8 moments; `begin` is a block boundary (work items
// are block multiples).
template <typename P, typename G, MasterFormat kMaster>
void adamw_range_int8(const AdamWTensorRoles& t, int64_t begin, int64_t end, const AdamWScalars& s) {
  const AdamWCoeffs<Vec> c(s, t.decay);
  int64_t b0 = begin;
  for (; b0 + kInt8Block <= end; b0 += kInt8Block) {
    adamw_block_int8<P, G, kMaster, true>(t, b0, kInt8Block, c, s);
  }
  if (b0 < end) adamw_block_int8<P, G, kMaster, false>(t, b0, end - b0, c, s);
}

}  // namespace

// The kernel for one combination of role types, or nullptr for one no format has.
AdamWRangeFn adamw_range_fn(c10::ScalarType param_type, c10::ScalarType grad_type,
                            MasterFormat master, c10::ScalarType exp_avg_type,
                            c10::ScalarType exp_avg_sq_type) {
  AdamWRangeFn fn = nullptr;
  dispatch_adamw_types(param_type, grad_type, master, exp_avg_type, exp_avg_sq_type, [&](auto types) {
    using T = decltype(types);
    using P = typename T::param_t;
    using G = typename T::grad_t;
    if constexpr (T::int8_moments) {
      fn = &adamw_range_int8<P, G, T::master>;
    } else {
      fn = &adamw_range<P, G, T::master, typename T::exp_avg_t, typename T::exp_avg_sq_t>;
    }
  });
  return fn;
}

}  // namespace HIFT_CPU_ISA
}  // namespace hift
