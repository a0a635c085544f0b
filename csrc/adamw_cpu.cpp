// Fused AdamW on the CPU: one pass over grad, master, exp_avg, exp_avg_sq (and the low-precision
// weight), vectorized with at::vec and spread over threads with one at::parallel_for.
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
#include <vector>

#include "adamw.h"

namespace hift {

void check_fused_adamw_args(at::TensorList params, at::TensorList masters, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList grads,
                            at::ArrayRef<double> weight_decays, const at::Tensor& lr,
                            const at::Tensor& step, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf) {
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
  if (n == 0) return;
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
    TORCH_CHECK(w.scalar_type() == at::kFloat && exp_avgs[i].scalar_type() == at::kFloat &&
                    exp_avg_sqs[i].scalar_type() == at::kFloat,
                "fused_adamw_: masters, exp_avgs and exp_avg_sqs must be float32 (tensor ", i, ")");
    for (const at::Tensor* t : {&p, &w, &exp_avgs[i], &exp_avg_sqs[i], &grads[i]}) {
      TORCH_CHECK(t->device() == device, "fused_adamw_: every tensor must be on ", device,
                  "; tensor ", i, " has one on ", t->device());
      TORCH_CHECK(t->numel() == numel, "fused_adamw_: tensor ", i,
                  " has roles of different sizes (", numel, " vs ", t->numel(), ")");
      TORCH_CHECK(t->is_contiguous(), "fused_adamw_: tensor ", i,
                  " has a non-contiguous role; the fused update walks flat memory");
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
namespace avx2 {
AdamWRangeFn adamw_range_fn(c10::ScalarType, c10::ScalarType, bool);
}
namespace avx512 {
AdamWRangeFn adamw_range_fn(c10::ScalarType, c10::ScalarType, bool);
}
#endif

namespace {

// Elements per work item: big enough to amortize the dispatch, small enough to balance threads.
constexpr int64_t kChunk = 1 << 15;

AdamWRangeFn pick_range_fn(at::ScalarType param_type, at::ScalarType grad_type, bool has_master) {
  AdamWRangeFn fn = nullptr;
#if defined(__x86_64__) && defined(__GNUC__)
  // ATen's own choice for this machine (cpuinfo, capped by ATEN_CPU_CAPABILITY).
  static const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") {
    fn = avx512::adamw_range_fn(param_type, grad_type, has_master);
  } else if (capability == "AVX2") {
    fn = avx2::adamw_range_fn(param_type, grad_type, has_master);
  }
#endif
  if (fn == nullptr) fn = portable::adamw_range_fn(param_type, grad_type, has_master);
  TORCH_CHECK(fn != nullptr, "fused_adamw_: no CPU kernel for params of ", param_type,
              " and grads of ", grad_type);
  return fn;
}

float scalar_value(const at::Tensor& t) { return t.item<float>(); }

void fused_adamw_cpu(at::TensorList params, at::TensorList masters, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList grads,
                     at::ArrayRef<double> weight_decays, const at::Tensor& lr,
                     const at::Tensor& step, double beta1, double beta2, double eps,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  check_fused_adamw_args(params, masters, exp_avgs, exp_avg_sqs, grads, weight_decays, lr, step,
                         grad_scale, found_inf);
  if (params.empty()) return;
  if (found_inf.has_value() && scalar_value(*found_inf) != 0.0f) return;
  const AdamWScalars s = make_adamw_scalars(
      scalar_value(lr), scalar_value(step), beta1, beta2, eps,
      grad_scale.has_value() ? scalar_value(*grad_scale) : 1.0);
  const bool has_master = !masters.empty();

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
    float* master = (has_master ? masters[i] : params[i]).data_ptr<float>();
    roles.push_back({params[i].data_ptr(), master, exp_avgs[i].data_ptr<float>(),
                     exp_avg_sqs[i].data_ptr<float>(), grads[i].data_ptr(),
                     decay_factor(s.lr, weight_decays[i])});
    fns.push_back(pick_range_fn(params[i].scalar_type(), grads[i].scalar_type(), has_master));
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

TORCH_LIBRARY_IMPL(hift, CPU, m) { m.impl("fused_adamw_", &fused_adamw_cpu); }

}  // namespace hift
