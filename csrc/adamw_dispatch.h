// The one dispatch from a call's dtypes to the AdamW kernel's role types, shared by the CPU and
// CUDA launchers (as TransformerEngine's fused Adam: one functor per combination of role types).
// Each launcher hands it a generic lambda and gets called back with an AdamWTypes<...> tag, from
// which it instantiates its own kernel; a combination no state format has calls nothing.
// Host code only; it odr-uses nothing of c10 (ScalarType is compared, the c10 types only name
// template arguments), so the per-ISA CPU units may include it.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "adamw.h"

namespace hift {

// The storage of a master: fp32 (its own, or the fp32 param itself) or an int16 remainder.
template <MasterFormat kMaster>
using master_t = std::conditional_t<kMaster == MasterFormat::kRemainder, int16_t, float>;

// One combination of role types: param P and grad G (float, c10::BFloat16 or c10::Half), the
// master's format, and the moments M, V (float or c10::BFloat16 each; int8_t and uint8_t codes
// for int8 moments, which always come together).
template <typename P, typename G, MasterFormat kMaster, typename M, typename V>
struct AdamWTypes {
  using param_t = P;
  using grad_t = G;
  using exp_avg_t = M;
  using exp_avg_sq_t = V;
  static constexpr MasterFormat master = kMaster;
  static constexpr bool int8_moments = std::is_same_v<M, int8_t>;
};

namespace dispatch_detail {

template <typename T>
struct Type {
  using type = T;
};

// fn(Type<T>{}) for the C++ type of `type`: fp32, bf16, and fp16 where kHalf; false otherwise.
template <bool kHalf, typename Fn>
bool float_type(c10::ScalarType type, Fn&& fn) {
  switch (type) {
    case c10::ScalarType::Float: fn(Type<float>{}); return true;
    case c10::ScalarType::BFloat16: fn(Type<c10::BFloat16>{}); return true;
    case c10::ScalarType::Half:
      if constexpr (kHalf) {
        fn(Type<c10::Half>{});
        return true;
      }
      return false;
    default: return false;
  }
}

// fn(Type<M>{}, Type<V>{}) for the moments' storage types.
template <typename Fn>
bool moment_types(c10::ScalarType exp_avg, c10::ScalarType exp_avg_sq, Fn&& fn) {
  if (exp_avg == c10::ScalarType::Char || exp_avg_sq == c10::ScalarType::Byte) {
    if (exp_avg != c10::ScalarType::Char || exp_avg_sq != c10::ScalarType::Byte) return false;
    fn(Type<int8_t>{}, Type<uint8_t>{});
    return true;
  }
  bool known = false;
  float_type<false>(exp_avg, [&](auto m) {
    known = float_type<false>(exp_avg_sq, [&](auto v) { fn(m, v); });
  });
  return known;
}

template <MasterFormat kMaster, typename P, typename Fn>
bool with_param(c10::ScalarType grad, c10::ScalarType exp_avg, c10::ScalarType exp_avg_sq, Fn&& fn) {
  bool known = false;
  float_type<true>(grad, [&](auto g) {
    known = moment_types(exp_avg, exp_avg_sq, [&](auto m, auto v) {
      fn(AdamWTypes<P, typename decltype(g)::type, kMaster, typename decltype(m)::type,
                    typename decltype(v)::type>{});
    });
  });
  return known;
}

}  // namespace dispatch_detail

// Calls fn(AdamWTypes<...>{}) once for the role types of (param, grad, master, exp_avg,
// exp_avg_sq) where a state format has them, and returns true; returns false, calling nothing,
// for any other combination. The formats: no master with fp32 params, an int16 remainder with
// bf16 params, an fp32 master with fp32, bf16 or fp16 params; grads fp32, bf16 or fp16.
template <typename Fn>
bool dispatch_adamw_types(c10::ScalarType param, c10::ScalarType grad, MasterFormat master,
                          c10::ScalarType exp_avg, c10::ScalarType exp_avg_sq, Fn&& fn) {
  using dispatch_detail::with_param;
  switch (master) {
    case MasterFormat::kNone:
      return param == c10::ScalarType::Float &&
             with_param<MasterFormat::kNone, float>(grad, exp_avg, exp_avg_sq, fn);
    case MasterFormat::kRemainder:
      return param == c10::ScalarType::BFloat16 &&
             with_param<MasterFormat::kRemainder, c10::BFloat16>(grad, exp_avg, exp_avg_sq, fn);
    case MasterFormat::kFp32: {
      bool known = false;
      dispatch_detail::float_type<true>(param, [&](auto p) {
        known = with_param<MasterFormat::kFp32, typename decltype(p)::type>(grad, exp_avg,
                                                                           exp_avg_sq, fn);
      });
      return known;
    }
  }
  return false;
}

}  // namespace hift
