// Fused multi-tensor AdamW on CUDA: one launch updates a whole group (up to kMaxTensors tensors
// per launch and per dtype combination; a group is rarely more than one launch).
//
// The tensor table travels as a __grid_constant__ kernel argument, so a launch needs no host
// allocation or copy and can be captured in a CUDA graph; lr, step, grad_scale and found_inf are
// read from device memory for the same reason. Blocks stride over 2048-element chunks of the
// concatenated group; each thread updates 8 consecutive elements, with 16-byte loads and stores
// when all of a tensor's roles are 16-byte aligned (a chunk start keeps that alignment) and a
// guarded scalar loop otherwise and at a tensor's tail. Templated on each role's dtype:
// param (weight) P, grad G; master, exp_avg and exp_avg_sq are fp32.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <type_traits>
#include <vector>

#include "adamw.h"

namespace hift {
namespace {

constexpr int kThreads = 256;
constexpr int kIlp = 8;
constexpr int64_t kChunk = kThreads * kIlp;
constexpr int kMaxTensors = 320;  // keeps the table (about 21 KB) under the 32 KB argument limit

struct TensorTable {
  void* param[kMaxTensors];
  float* master[kMaxTensors];
  float* exp_avg[kMaxTensors];
  float* exp_avg_sq[kMaxTensors];
  const void* grad[kMaxTensors];
  int64_t numel[kMaxTensors];
  double weight_decay[kMaxTensors];
  int64_t first_chunk[kMaxTensors + 1];  // prefix sum of chunks; first_chunk[count] = total
  bool aligned[kMaxTensors];
  int count;
};

struct Hyper {
  double beta1, beta2, eps;
};

template <typename T>
__device__ __forceinline__ void load_ilp(const T* p, float (&out)[kIlp]) {
  constexpr int kPerLoad = 16 / sizeof(T);
#pragma unroll
  for (int j = 0; j < kIlp; j += kPerLoad) {
    alignas(16) T tmp[kPerLoad];
    *reinterpret_cast<uint4*>(tmp) = *reinterpret_cast<const uint4*>(p + j);
#pragma unroll
    for (int k = 0; k < kPerLoad; ++k) out[j + k] = static_cast<float>(tmp[k]);
  }
}

template <typename T>
__device__ __forceinline__ void store_ilp(T* p, const float (&in)[kIlp]) {
  constexpr int kPerLoad = 16 / sizeof(T);
#pragma unroll
  for (int j = 0; j < kIlp; j += kPerLoad) {
    alignas(16) T tmp[kPerLoad];
#pragma unroll
    for (int k = 0; k < kPerLoad; ++k) tmp[k] = static_cast<T>(in[j + k]);
    *reinterpret_cast<uint4*>(p + j) = *reinterpret_cast<const uint4*>(tmp);
  }
}

template <typename P, typename G, bool kHasMaster>
__global__ void __launch_bounds__(kThreads)
    fused_adamw_kernel(const __grid_constant__ TensorTable table, const float* lr,
                       const float* step, const float* grad_scale, const float* found_inf,
                       Hyper hyper) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  __shared__ AdamWScalars shared_scalars;
  if (threadIdx.x == 0) {
    shared_scalars = make_adamw_scalars(*lr, *step, hyper.beta1, hyper.beta2, hyper.eps,
                                        grad_scale != nullptr ? *grad_scale : 1.0f);
  }
  __syncthreads();
  const AdamWScalars s = shared_scalars;

  const int64_t total = table.first_chunk[table.count];
  int t = 0;
  for (int64_t chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {
    while (table.first_chunk[t + 1] <= chunk) ++t;  // chunks only grow, so t only advances
    const int64_t numel = table.numel[t];
    const int64_t i0 = (chunk - table.first_chunk[t]) * kChunk + threadIdx.x * kIlp;
    if (i0 >= numel) continue;
    const AdamWCoeffs<float> c(s, decay_factor(s.lr, table.weight_decay[t]));
    P* param = static_cast<P*>(table.param[t]) + i0;
    float* master = (kHasMaster ? table.master[t] : reinterpret_cast<float*>(table.param[t])) + i0;
    float* m = table.exp_avg[t] + i0;
    float* v = table.exp_avg_sq[t] + i0;
    const G* grad = static_cast<const G*>(table.grad[t]) + i0;
    if (table.aligned[t] && i0 + kIlp <= numel) {
      float w[kIlp], mm[kIlp], vv[kIlp], g[kIlp];
      load_ilp(master, w);
      load_ilp(m, mm);
      load_ilp(v, vv);
      load_ilp(grad, g);
#pragma unroll
      for (int k = 0; k < kIlp; ++k) adamw_math(w[k], mm[k], vv[k], g[k], c);
      store_ilp(master, w);
      store_ilp(m, mm);
      store_ilp(v, vv);
      if constexpr (kHasMaster) store_ilp(param, w);
    } else {
      const int n = static_cast<int>(numel - i0 < kIlp ? numel - i0 : kIlp);
      for (int k = 0; k < n; ++k) {
        float w = master[k], mk = m[k], vk = v[k];
        adamw_math(w, mk, vk, static_cast<float>(grad[k]), c);
        master[k] = w;
        m[k] = mk;
        v[k] = vk;
        if constexpr (kHasMaster) param[k] = static_cast<P>(w);
      }
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename P, typename G, bool kHasMaster>
void launch(const std::vector<int64_t>& tensors, at::TensorList params, at::TensorList masters,
            at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList grads,
            at::ArrayRef<double> weight_decays, const float* lr, const float* step,
            const float* grad_scale, const float* found_inf, Hyper hyper) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int max_blocks =
      at::cuda::getCurrentDeviceProperties()->multiProcessorCount * (2048 / kThreads);
  for (size_t first = 0; first < tensors.size(); first += kMaxTensors) {
    TensorTable table;
    table.count = 0;
    table.first_chunk[0] = 0;
    for (size_t k = first; k < tensors.size() && table.count < kMaxTensors; ++k) {
      const int64_t i = tensors[k];
      const int j = table.count++;
      table.param[j] = params[i].data_ptr();
      table.master[j] = kHasMaster ? masters[i].data_ptr<float>() : nullptr;
      table.exp_avg[j] = exp_avgs[i].data_ptr<float>();
      table.exp_avg_sq[j] = exp_avg_sqs[i].data_ptr<float>();
      table.grad[j] = grads[i].data_ptr();
      table.numel[j] = params[i].numel();
      table.weight_decay[j] = weight_decays[i];
      table.first_chunk[j + 1] = table.first_chunk[j] + (table.numel[j] + kChunk - 1) / kChunk;
      table.aligned[j] = aligned16(table.param[j]) && aligned16(table.exp_avg[j]) &&
                         aligned16(table.exp_avg_sq[j]) && aligned16(table.grad[j]) &&
                         (!kHasMaster || aligned16(table.master[j]));
    }
    const int64_t chunks = table.first_chunk[table.count];
    if (chunks == 0) continue;
    const int blocks = static_cast<int>(std::min<int64_t>(chunks, max_blocks));
    fused_adamw_kernel<P, G, kHasMaster>
        <<<blocks, kThreads, 0, stream>>>(table, lr, step, grad_scale, found_inf, hyper);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// A 0-d fp32 tensor on `device` (a no-op, hence capturable, when it already is one).
at::Tensor device_scalar(const at::Tensor& t, const at::Device& device) {
  return t.to(device, at::kFloat).reshape({});
}

void fused_adamw_cuda(at::TensorList params, at::TensorList masters, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList grads,
                      at::ArrayRef<double> weight_decays, const at::Tensor& lr,
                      const at::Tensor& step, double beta1, double beta2, double eps,
                      const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  check_fused_adamw_args(params, masters, exp_avgs, exp_avg_sqs, grads, weight_decays, lr, step,
                         grad_scale, found_inf);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "fused_adamw_: the CUDA kernel got tensors on ", device);
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor lr_d = device_scalar(lr, device);
  const at::Tensor step_d = device_scalar(step, device);
  std::optional<at::Tensor> scale_d, inf_d;
  if (grad_scale.has_value()) scale_d = device_scalar(*grad_scale, device);
  if (found_inf.has_value()) inf_d = device_scalar(*found_inf, device);
  const float* scale_ptr = scale_d ? scale_d->data_ptr<float>() : nullptr;
  const float* inf_ptr = inf_d ? inf_d->data_ptr<float>() : nullptr;
  const Hyper hyper{beta1, beta2, eps};
  const bool has_master = !masters.empty();

  // One launch per (param dtype, grad dtype) present in the group: usually exactly one.
  std::map<std::pair<at::ScalarType, at::ScalarType>, std::vector<int64_t>> buckets;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;
    buckets[{params[i].scalar_type(), grads[i].scalar_type()}].push_back(static_cast<int64_t>(i));
  }
  for (const auto& bucket : buckets) {
    const at::ScalarType param_type = bucket.first.first;
    const at::ScalarType grad_type = bucket.first.second;
    const std::vector<int64_t>& tensors = bucket.second;
    auto run = [&](auto param_tag, auto has_master_tag) {
      using P = decltype(param_tag);
      constexpr bool kHasMaster = decltype(has_master_tag)::value;
      auto go = [&](auto grad_tag) {
        launch<P, decltype(grad_tag), kHasMaster>(
            tensors, params, masters, exp_avgs, exp_avg_sqs, grads, weight_decays,
            lr_d.data_ptr<float>(), step_d.data_ptr<float>(), scale_ptr, inf_ptr, hyper);
      };
      switch (grad_type) {
        case at::kFloat: return go(float{});
        case at::kBFloat16: return go(at::BFloat16{});
        case at::kHalf: return go(at::Half{});
        default: TORCH_CHECK(false, "fused_adamw_: unsupported grad dtype ", grad_type);
      }
    };
    if (!has_master || param_type == at::kFloat) {
      has_master ? run(float{}, std::true_type{}) : run(float{}, std::false_type{});
    } else if (param_type == at::kBFloat16) {
      run(at::BFloat16{}, std::true_type{});
    } else {
      run(at::Half{}, std::true_type{});
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(hift, CUDA, m) { m.impl("fused_adamw_", &fused_adamw_cuda); }

}  // namespace hift
