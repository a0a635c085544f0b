// Fused AdamW on the CPU: one pass over grad, master, exp_avg, exp_avg_sq (and the low-precision
// weight), in whichever state format each role is kept (formats.py: fp32 or remainder masters,
// fp32, stochastically rounded bf16 or blockwise int8 moments), vectorized with at::vec and spread over threads
// with one at::parallel_for.
//
// The work list is flattened over (tensor, chunk) so that a group of many small tensors keeps
// every thread busy, and a big tensor is split as finely as many small ones. The kernel itself
// (adamw_cpu_kernel.h) is compiled here for any CPU and in adamw_cpu_avx2/avx512.cpp for those
// instruction sets; the one to run is chosen like ATen's own kernels (ATEN_CPU_CAPABILITY).
#define CPU_CAPABILITY DEFAULT
#define HIFT_CPU_ISA portable
#include "adamw_cpu_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "adamw.h"

namespace hift {

void check_fused_adamw_args(at::TensorList params, at::TensorList masters, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList grads,
                            at::ArrayRef<double> weight_decays, const at::Tensor& lr,
                            const at::Tensor& step, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf, at::IntArrayRef offsets,
                            at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales) {
  const size_t n = params.size();
  TORCH_CHECK(exp_avgs.size() == n && exp_avg_sqs.size() == n && grads.size() == n &&
                  weight_decays.size() == n,
              "fused_adamw_: params, exp_avgs, exp_avg_sqs, grads and weight_decays must have "
              "the same length; got ", n, ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ",
              grads.size(), ", ", weight_decays.size());
  TORCH_CHECK(masters.empty() || masters.size() == n,
              "fused_adamw_: masters must be empty (fp32 params are their own masters) or one per "
              "param; got ", masters.size(), " for ", n, " params");
  TORCH_CHECK(lr.numel() == 1 && step.numel() == 1,
              "fused_adamw_: lr and step must be single-element tensors");
  TORCH_CHECK(!grad_scale.has_value() || grad_scale->numel() == 1,
              "fused_adamw_: grad_scale must be a single-element tensor");
  TORCH_CHECK(!found_inf.has_value() || found_inf->numel() == 1,
              "fused_adamw_: found_inf must be a single-element tensor");
  TORCH_CHECK(offsets.empty() || offsets.size() == n,
              "fused_adamw_: offsets must be empty or give one per tensor (where it starts in its "
              "group's element numbering); got ", offsets.size(), " offsets for ", n, " tensors");
  if (n == 0) return;
  // One format per role and call: every tensor of a role has the first one's dtype.
  auto check_one_dtype = [](at::TensorList role, const char* name, const char* formats) {
    for (size_t i = 0; i < role.size(); ++i) {
      TORCH_CHECK(role[i].scalar_type() == role[0].scalar_type(), "fused_adamw_: ", name,
                  " must all have one dtype (", formats, "; one format per call), but ", name,
                  "[0] is ", role[0].scalar_type(), " and ", name, "[", i, "] is ",
                  role[i].scalar_type());
    }
  };
  check_one_dtype(masters, "masters", "float32 masters or int16 remainders of bf16 params");
  check_one_dtype(exp_avgs, "exp_avgs", "float32, bfloat16 or int8");
  check_one_dtype(exp_avg_sqs, "exp_avg_sqs", "float32, bfloat16 or uint8");
  const bool remainders = !masters.empty() && masters[0].scalar_type() == at::kShort;
  TORCH_CHECK(masters.empty() || remainders || masters[0].scalar_type() == at::kFloat,
              "fused_adamw_: masters must be float32 (an fp32 master per param) or int16 (the "
              "remainder of a bf16 param's fp32 master); got ", masters[0].scalar_type());
  auto check_moment = [&](at::TensorList role, const char* name, at::ScalarType code) {
    const at::ScalarType type = role[0].scalar_type();
    TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == code, "fused_adamw_: ",
                name, " must be float32, bfloat16 or ", code, " (int8 moments); got ", type);
    TORCH_CHECK(type == at::kFloat || !offsets.empty(), "fused_adamw_: ", name, " are ", type,
                ", which are written with stochastic rounding drawn per group element, so "
                "offsets (where each tensor starts in its group) are required; none were given");
  };
  check_moment(exp_avgs, "exp_avgs", at::kChar);
  check_moment(exp_avg_sqs, "exp_avg_sqs", at::kByte);
  const bool int8 = exp_avgs[0].scalar_type() == at::kChar;
  TORCH_CHECK(int8 == (exp_avg_sqs[0].scalar_type() == at::kByte), "fused_adamw_: int8 moments "
              "come in pairs (int8 exp_avgs, uint8 exp_avg_sqs); got ", exp_avgs[0].scalar_type(),
              " and ", exp_avg_sqs[0].scalar_type());
  const size_t scale_count = int8 ? n : 0;
  TORCH_CHECK(exp_avg_scales.size() == scale_count && exp_avg_sq_scales.size() == scale_count,
              "fused_adamw_: int8 moments need one exp_avg_scales and one exp_avg_sq_scales "
              "tensor per param, other formats none; got ", exp_avg_scales.size(), " and ",
              exp_avg_sq_scales.size(), " for ", n, " params with ", exp_avgs[0].scalar_type(),
              " exp_avgs");
  const auto device = params[0].device();
  auto is_low_or_fp32 = [](at::ScalarType t) {
    return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
  };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& w = masters.empty() ? params[i] : masters[i];
    const int64_t numel = p.numel();
    TORCH_CHECK(is_low_or_fp32(p.scalar_type()),
                "fused_adamw_: params[", i, "] must be float32, bfloat16 or float16; got ",
                p.scalar_type());
    TORCH_CHECK(is_low_or_fp32(grads[i].scalar_type()),
                "fused_adamw_: grads[", i, "] must be float32, bfloat16 or float16; got ",
                grads[i].scalar_type());
    TORCH_CHECK(masters.size() == n || p.scalar_type() == at::kFloat,
                "fused_adamw_: params[", i, "] is ", p.scalar_type(),
                " and no fp32 master was given (masters may be empty only for fp32 params)");
    TORCH_CHECK(!remainders || p.scalar_type() == at::kBFloat16,
                "fused_adamw_: masters are int16 remainders, the low 16 bits of an fp32 master "
                "whose high 16 bits are a bfloat16 param, but params[", i, "] is ",
                p.scalar_type(), " (give it a float32 master)");
    for (const at::Tensor* t : {&p, &w, &exp_avgs[i], &exp_avg_sqs[i], &grads[i]}) {
      TORCH_CHECK(t->device() == device, "fused_adamw_: every tensor must be on ", device,
                  "; tensor ", i, " has one on ", t->device());
      TORCH_CHECK(t->numel() == numel, "fused_adamw_: tensor ", i,
                  " has roles of different sizes (", numel, " vs ", t->numel(), ")");
      TORCH_CHECK(t->is_contiguous(), "fused_adamw_: tensor ", i,
                  " has a non-contiguous role; the fused update walks flat memory");
    }
    if (int8) {
      const int64_t blocks = (numel + kInt8Block - 1) / kInt8Block;
      for (auto [scales, per_block, name] : {std::make_tuple(&exp_avg_scales[i], 1, "exp_avg_scales"),
                                             std::make_tuple(&exp_avg_sq_scales[i], 2, "exp_avg_sq_scales")}) {
        TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous() &&
                        scales->device() == device && scales->numel() == per_block * blocks,
                    "fused_adamw_: ", name, "[", i, "] must be a contiguous float32 tensor on ",
                    device, " of ", per_block * blocks, " elements (", per_block, " per block of ",
                    kInt8Block, "); got ", scales->scalar_type(), " of ", scales->numel(), " on ",
                    scales->device());
      }
    }
  }
}

MasterFormat master_format_of(at::TensorList masters) {
  if (masters.empty()) return MasterFormat::kNone;
  return masters[0].scalar_type() == at::kShort ? MasterFormat::kRemainder : MasterFormat::kFp32;
}

#if defined(__x86_64__) && defined(__GNUC__)
namespace avx2 {
AdamWRangeFn adamw_range_fn(c10::ScalarType, c10::ScalarType, MasterFormat, c10::ScalarType,
                            c10::ScalarType);
}
namespace avx512 {
AdamWRangeFn adamw_range_fn(c10::ScalarType, c10::ScalarType, MasterFormat, c10::ScalarType,
                            c10::ScalarType);
}
#endif

namespace {

// Elements per work item: big enough to amortize the dispatch, small enough to balance threads; a
// multiple of the int8 block, so that every item starts on a block.
constexpr int64_t kChunk = 1 << 15;
static_assert(kChunk % kInt8Block == 0, "work items must be whole int8 blocks");

enum class CpuIsa { kPortable, kAvx2, kAvx512 };

// ATen's own choice for this machine (cpuinfo, capped by ATEN_CPU_CAPABILITY), where this build
// has a kernel for it; every ISA's kernel covers the same dtypes, so the choice is per process.
CpuIsa chosen_isa() {
  static const CpuIsa isa = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return CpuIsa::kAvx512;
    if (capability == "AVX2") return CpuIsa::kAvx2;
#endif
    return CpuIsa::kPortable;
  }();
  return isa;
}

AdamWRangeFn pick_range_fn(at::ScalarType param_type, at::ScalarType grad_type,
                           MasterFormat master, at::ScalarType exp_avg_type,
                           at::ScalarType exp_avg_sq_type) {
  AdamWRangeFn fn = nullptr;
  const auto args = std::make_tuple(param_type, grad_type, master, exp_avg_type, exp_avg_sq_type);
  switch (chosen_isa()) {
#if defined(__x86_64__) && defined(__GNUC__)
    case CpuIsa::kAvx512: fn = std::apply(avx512::adamw_range_fn, args); break;
    case CpuIsa::kAvx2: fn = std::apply(avx2::adamw_range_fn, args); break;
#endif
    default: fn = std::apply(portable::adamw_range_fn, args); break;
  }
  TORCH_CHECK(fn != nullptr, "fused_adamw_: no CPU kernel for params of ", param_type,
              ", grads of ", grad_type, " and moments of ", exp_avg_type, " / ", exp_avg_sq_type);
  return fn;
}

float scalar_value(const at::Tensor& t) { return t.item<float>(); }

void fused_adamw_cpu(at::TensorList params, at::TensorList masters, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList grads,
                     at::ArrayRef<double> weight_decays, const at::Tensor& lr,
                     const at::Tensor& step, double beta1, double beta2, double eps,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, at::TensorList exp_avg_scales,
                     at::TensorList exp_avg_sq_scales, int64_t seed, at::IntArrayRef offsets) {
  check_fused_adamw_args(params, masters, exp_avgs, exp_avg_sqs, grads, weight_decays, lr, step,
                         grad_scale, found_inf, offsets, exp_avg_scales, exp_avg_sq_scales);
  if (params.empty()) return;
  if (found_inf.has_value() && scalar_value(*found_inf) != 0.0f) return;
  const AdamWScalars s = make_adamw_scalars(
      scalar_value(lr), scalar_value(step), beta1, beta2, eps,
      grad_scale.has_value() ? scalar_value(*grad_scale) : 1.0, static_cast<uint32_t>(seed));
  const MasterFormat master_format = master_format_of(masters);
  const at::ScalarType exp_avg_type = exp_avgs[0].scalar_type();
  const at::ScalarType exp_avg_sq_type = exp_avg_sqs[0].scalar_type();

  std::vector<AdamWTensorRoles> roles;
  std::vector<AdamWRangeFn> fns;
  struct Work {
    int32_t tensor;
    int64_t begin, end;
  };
  std::vector<Work> work;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    const int32_t index = static_cast<int32_t>(roles.size());
    void* master = (master_format == MasterFormat::kNone ? params[i] : masters[i]).data_ptr();
    const uint32_t offset = offsets.empty() ? 0u : static_cast<uint32_t>(offsets[i]);
    const bool int8 = !exp_avg_scales.empty();
    roles.push_back({params[i].data_ptr(), master, exp_avgs[i].data_ptr(),
                     exp_avg_sqs[i].data_ptr(),
                     int8 ? exp_avg_scales[i].data_ptr<float>() : nullptr,
                     int8 ? exp_avg_sq_scales[i].data_ptr<float>() : nullptr, grads[i].data_ptr(),
                     decay_factor(s.lr, weight_decays[i]), offset});
    fns.push_back(pick_range_fn(params[i].scalar_type(), grads[i].scalar_type(), master_format,
                                exp_avg_type, exp_avg_sq_type));
    for (int64_t b = 0; b < numel; b += kChunk) work.push_back({index, b, std::min(numel, b + kChunk)});
  }
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w) {
      const Work& item = work[w];
      fns[item.tensor](roles[item.tensor], item.begin, item.end, s);
    }
  });
}

}  // namespace

std::string cpu_kernel_isa() {
  switch (chosen_isa()) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "portable";
  }
}

TORCH_LIBRARY_IMPL(hift, CPU, m) { m.impl("fused_adamw_", &fused_adamw_cpu); }

}  // namespace hift
