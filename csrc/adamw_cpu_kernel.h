// The CPU AdamW kernel body, compiled once per instruction set: adamw_cpu.cpp (portable),
// adamw_cpu_avx2.cpp and adamw_cpu_avx512.cpp each choose the ISA, then include this header.
// at::vec keeps its Vectorized types in a namespace named after CPU_CAPABILITY, and everything
// here lives in hift::HIFT_CPU_ISA, so no symbol compiled for one ISA can stand in for another's
// at link time. The per-ISA units odr-use nothing else (no scalar c10 conversions: tails go
// through Vectorized::loadu(ptr, count)); adamw_cpu.cpp picks one at run time.
#pragma once

#if !defined(HIFT_CPU_ISA) || !defined(CPU_CAPABILITY)
#error "define HIFT_CPU_ISA and CPU_CAPABILITY before including adamw_cpu_kernel.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>

#include <type_traits>

#include "adamw.h"

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

template <typename param_t, typename grad_t, bool kHasMaster>
inline void adamw_step(param_t* param, float* master, float* m, float* v, const grad_t* grad,
                       int64_t count, const AdamWCoeffs<Vec>& c) {
  Vec w0, w1, m0, m1, v0, v1, g0, g1;
  load_pair(master, count, w0, w1);
  load_pair(m, count, m0, m1);
  load_pair(v, count, v0, v1);
  load_pair(grad, count, g0, g1);
  adamw_math(w0, m0, v0, g0, c);
  adamw_math(w1, m1, v1, g1, c);
  store_pair(master, count, w0, w1);
  store_pair(m, count, m0, m1);
  store_pair(v, count, v0, v1);
  if constexpr (kHasMaster) store_pair(param, count, w0, w1);
}

template <typename param_t, typename grad_t, bool kHasMaster>
void adamw_range(const AdamWTensorRoles& t, int64_t begin, int64_t end, const AdamWScalars& s) {
  auto* param = static_cast<param_t*>(t.param);
  auto* grad = static_cast<const grad_t*>(t.grad);
  const AdamWCoeffs<Vec> c(s, t.decay);
  int64_t i = begin;
  for (; i + kWidth <= end; i += kWidth) {
    adamw_step<param_t, grad_t, kHasMaster>(param + i, t.master + i, t.exp_avg + i,
                                            t.exp_avg_sq + i, grad + i, kWidth, c);
  }
  if (i < end) {
    adamw_step<param_t, grad_t, kHasMaster>(param + i, t.master + i, t.exp_avg + i,
                                            t.exp_avg_sq + i, grad + i, end - i, c);
  }
}

template <typename param_t, bool kHasMaster>
AdamWRangeFn pick_for_grad(c10::ScalarType grad_type) {
  switch (grad_type) {
    case c10::ScalarType::Float: return &adamw_range<param_t, float, kHasMaster>;
    case c10::ScalarType::BFloat16: return &adamw_range<param_t, c10::BFloat16, kHasMaster>;
    case c10::ScalarType::Half: return &adamw_range<param_t, c10::Half, kHasMaster>;
    default: return nullptr;
  }
}

}  // namespace

// The kernel for one (param dtype, grad dtype, master or not), or nullptr for other dtypes.
AdamWRangeFn adamw_range_fn(c10::ScalarType param_type, c10::ScalarType grad_type,
                            bool has_master) {
  if (!has_master) {
    return param_type == c10::ScalarType::Float ? pick_for_grad<float, false>(grad_type) : nullptr;
  }
  switch (param_type) {
    case c10::ScalarType::Float: return pick_for_grad<float, true>(grad_type);
    case c10::ScalarType::BFloat16: return pick_for_grad<c10::BFloat16, true>(grad_type);
    case c10::ScalarType::Half: return pick_for_grad<c10::Half, true>(grad_type);
    default: return nullptr;
  }
}

}  // namespace HIFT_CPU_ISA
}  // namespace hift
