// Fused multi-tensor AdamW on CUDA: one launch updates a whole group (up to kMaxTensors tensors
// per launch and per dtype combination; a group is rarely more than one launch).
//
// The tensor table travels as a __grid_constant__ kernel argument, so a launch needs no host
// allocation or copy and can be captured in a CUDA graph; lr, step, grad_scale and found_inf are
// read from device memory for the same reason. Blocks stride over 2048-element chunks of the
// concatenated group; each thread updates 8 consecutive elements, with 16-byte loads and stores
// when all of a tensor's roles are 16-byte aligned (a chunk start keeps that alignment) and a
// guarded scalar loop otherwise and at a tensor's tail. Templated on each role's type: param
// (weight) P, grad G, the master's format (none, fp32, or the int16 remainder of a bf16 param)
// and the exp_avg / exp_avg_sq types M, V (fp32, or bf16 rounded stochastically); every format
// is an instance of the one kernel, decoding to fp32 before adamw_math and encoding after it.
// int8 moments, whose codes depend on a whole block's values, have a block-at-a-time twin
// (fused_adamw_int8_kernel) around the same per-element math and codecs.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <type_traits>
#include <vector>

#include "adamw.h"
#include "adamw_dispatch.h"

namespace hift {
namespace {

constexpr int kThreads = 256;
// Elements per thread: one 16-byte load of a 2-byte role (bf16 weight, grad or moment, int16
// remainder), two of a 4-byte one; each role loads with its own width.
constexpr int kIlp = 8;
constexpr int64_t kChunk = kThreads * kIlp;
constexpr int kMaxTensors = 320;

struct TensorTable {
  void* param[kMaxTensors];
  void* master[kMaxTensors];      // fp32 master or int16 remainder; unused without a master
  void* exp_avg[kMaxTensors];     // fp32 or bf16
  void* exp_avg_sq[kMaxTensors];  // fp32 or bf16
  const void* grad[kMaxTensors];
  int64_t numel[kMaxTensors];
  double weight_decay[kMaxTensors];
  int64_t first_chunk[kMaxTensors + 1];  // prefix sum of chunks; first_chunk[count] = total
  uint32_t offset[kMaxTensors];  // first element in the group's numbering, mod 2^32 (rounding)
  bool aligned[kMaxTensors];
  float* exp_avg_scale[kMaxTensors];     // int8 moments: one scale per block (else unused)
  float* exp_avg_sq_scale[kMaxTensors];  // int8 moments: (lo, hi) per block
  int count;
};

struct Hyper {
  double beta1, beta2, eps;
  uint32_t seed;
};

// Kernel arguments may take 32764 bytes only from CUDA 12.1 on and on sm_70 and later (before: 4096
// bytes); the table is most of them (27216 bytes at kMaxTensors = 320: 85 per tensor). setup.py
// refuses older toolkits and archs in words; these catch a build that goes around it.
#if defined(CUDART_VERSION) && CUDART_VERSION < 12010
#error "hift's fused AdamW passes a 27 KB __grid_constant__ table: it needs CUDA 12.1 or later"
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#error "hift's fused AdamW needs sm_70 or later (__grid_constant__, large kernel arguments)"
#endif
static_assert(sizeof(TensorTable) + 4 * sizeof(void*) + sizeof(Hyper) <= 32764,
              "TensorTable is over the kernel argument limit: lower kMaxTensors");

// kIlp elements of one role as stored: 16-byte loads when the caller knows they are all there
// and aligned, else a guarded scalar loop (lanes past the tensor's end are zero).
template <typename T>
__device__ __forceinline__ void load_role(const T* p, T (&out)[kIlp], int n, bool vector) {
  constexpr int kPerLoad = 16 / sizeof(T);
  if (vector) {
#pragma unroll
    for (int j = 0; j < kIlp; j += kPerLoad) {
      alignas(16) T tmp[kPerLoad];
      *reinterpret_cast<uint4*>(tmp) = *reinterpret_cast<const uint4*>(p + j);
#pragma unroll
      for (int k = 0; k < kPerLoad; ++k) out[j + k] = tmp[k];
    }
  } else {
#pragma unroll
    for (int k = 0; k < kIlp; ++k) out[k] = k < n ? p[k] : T{};
  }
}

template <typename T>
__device__ __forceinline__ void store_role(T* p, const T (&in)[kIlp], int n, bool vector) {
  constexpr int kPerLoad = 16 / sizeof(T);
  if (vector) {
#pragma unroll
    for (int j = 0; j < kIlp; j += kPerLoad) {
      alignas(16) T tmp[kPerLoad];
#pragma unroll
      for (int k = 0; k < kPerLoad; ++k) tmp[k] = in[j + k];
      *reinterpret_cast<uint4*>(p + j) = *reinterpret_cast<const uint4*>(tmp);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      if (k < n) p[k] = in[k];
    }
  }
}

// The fp32 master of one element, from its param and its master storage.
template <MasterFormat kMaster, typename P, typename W>
__device__ __forceinline__ float decode_master(const P& param, const W& master) {
  if constexpr (kMaster == MasterFormat::kRemainder) {
    return bits_float(join_master_bits(param.x, master));
  } else {
    return master;
  }
}

template <MasterFormat kMaster, typename P, typename W>
__device__ __forceinline__ void encode_master(float value, P& param, W& master) {
  if constexpr (kMaster == MasterFormat::kRemainder) {
    const uint32_t u = float_bits(value);
    param = P(remainder_weight_bits(u), P::from_bits());
    master = remainder_bits(u);
  } else {
    master = value;
    if constexpr (kMaster == MasterFormat::kFp32) param = static_cast<P>(value);  // to nearest even
  }
}

// A moment as stored: fp32 as is, bf16 rounded stochastically.
template <typename T>
__device__ __forceinline__ T encode_moment(float value, uint32_t key, uint32_t index) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    return T(bf16_bits_stochastic(float_bits(value), key, index), T::from_bits());
  } else {
    return value;
  }
}

// This step's scalars, formed once per block of threads (the inputs live in device memory so a
// launch can be captured in a CUDA graph).
__device__ __forceinline__ AdamWScalars block_scalars(const float* lr, const float* step,
                                                      const float* grad_scale, const Hyper& hyper) {
  __shared__ AdamWScalars shared_scalars;
  if (threadIdx.x == 0) {
    shared_scalars = make_adamw_scalars(*lr, *step, hyper.beta1, hyper.beta2, hyper.eps,
                                        grad_scale != nullptr ? *grad_scale : 1.0f, hyper.seed);
  }
  __syncthreads();
  return shared_scalars;
}

// The one update, for every format: each thread decodes kIlp elements of every role to fp32,
// runs adamw_math and encodes them back.
template <typename P, typename G, MasterFormat kMaster, typename M, typename V>
__global__ void __launch_bounds__(kThreads)
    fused_adamw_kernel(const __grid_constant__ TensorTable table, const float* lr,
                       const float* step, const float* grad_scale, const float* found_inf,
                       Hyper hyper) {
  using W = master_t<kMaster>;
  // The param is read when it holds the master or its high half, and written when it is a copy.
  constexpr bool kReadsParam = kMaster == MasterFormat::kRemainder;
  constexpr bool kWritesParam = kMaster != MasterFormat::kNone;
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const AdamWScalars s = block_scalars(lr, step, grad_scale, hyper);

  const int64_t total = table.first_chunk[table.count];
  int t = 0;
  for (int64_t chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {
    while (table.first_chunk[t + 1] <= chunk) ++t;  // chunks only grow, so t only advances
    const int64_t numel = table.numel[t];
    const int64_t i0 = (chunk - table.first_chunk[t]) * kChunk + threadIdx.x * kIlp;
    if (i0 >= numel) continue;
    const int n = static_cast<int>(numel - i0 < kIlp ? numel - i0 : kIlp);
    const bool vector = table.aligned[t] && n == kIlp;
    const AdamWCoeffs<float> c(s, decay_factor(s.lr, table.weight_decay[t]));
    P* param = static_cast<P*>(table.param[t]) + i0;
    W* master = static_cast<W*>(kMaster == MasterFormat::kNone ? table.param[t] : table.master[t]) + i0;
    M* exp_avg = static_cast<M*>(table.exp_avg[t]) + i0;
    V* exp_avg_sq = static_cast<V*>(table.exp_avg_sq[t]) + i0;
    const G* grad = static_cast<const G*>(table.grad[t]) + i0;
    const uint32_t index = table.offset[t] + static_cast<uint32_t>(i0);  // mod 2^32

    P p[kIlp];
    W w[kIlp];
    M m[kIlp];
    V v[kIlp];
    G g[kIlp];
    if constexpr (kReadsParam) load_role(param, p, n, vector);
    load_role(master, w, n, vector);
    load_role(exp_avg, m, n, vector);
    load_role(exp_avg_sq, v, n, vector);
    load_role(grad, g, n, vector);
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      float master_k = decode_master<kMaster>(p[k], w[k]);
      float m_k = static_cast<float>(m[k]);  // bf16 -> fp32 is exact
      float v_k = static_cast<float>(v[k]);
      adamw_math(master_k, m_k, v_k, static_cast<float>(g[k]), c);
      encode_master<kMaster>(master_k, p[k], w[k]);
      m[k] = encode_moment<M>(m_k, s.exp_avg_key, index + k);
      v[k] = encode_moment<V>(v_k, s.exp_avg_sq_key, index + k);
    }
    if constexpr (kWritesParam) store_role(param, p, n, vector);
    store_role(master, w, n, vector);
    store_role(exp_avg, m, n, vector);
    store_role(exp_avg_sq, v, n, vector);
  }
}

// int8 moments (formats.encode_exp_avg, encode_exp_avg_sq): a block of threads takes one moment
// block of kInt8Block elements at a time, a thread per element. Each thread decodes its moments
// with the block's old scales and runs the one update; the block's new scales are reduced over
// its threads (max and min are exact in any order, so they equal the CPU's); then every thread
// encodes its element. The table's first_chunk counts moment blocks here.
static_assert(kThreads == kInt8Block, "one thread per element of an int8 block");

struct BlockScales {
  float absmax, lo, hi;  // |exp_avg| max; smallest positive and largest exp_avg_sq (lo inf: none)
};

__device__ __forceinline__ BlockScales reduce_block_scales(BlockScales x, BlockScales (&warps)[kThreads / 32]) {
#pragma unroll
  for (int width = 16; width > 0; width /= 2) {
    x.absmax = fmaxf(x.absmax, __shfl_xor_sync(0xffffffffu, x.absmax, width));
    x.lo = fminf(x.lo, __shfl_xor_sync(0xffffffffu, x.lo, width));
    x.hi = fmaxf(x.hi, __shfl_xor_sync(0xffffffffu, x.hi, width));
  }
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = x;
  __syncthreads();
  BlockScales all = warps[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) {
    all.absmax = fmaxf(all.absmax, warps[w].absmax);
    all.lo = fminf(all.lo, warps[w].lo);
    all.hi = fmaxf(all.hi, warps[w].hi);
  }
  return all;
}

template <typename P, typename G, MasterFormat kMaster>
__global__ void __launch_bounds__(kThreads)
    fused_adamw_int8_kernel(const __grid_constant__ TensorTable table, const float* lr,
                            const float* step, const float* grad_scale, const float* found_inf,
                            Hyper hyper) {
  using W = master_t<kMaster>;
  constexpr bool kReadsParam = kMaster == MasterFormat::kRemainder;
  constexpr bool kWritesParam = kMaster != MasterFormat::kNone;
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  __shared__ BlockScales warps[kThreads / 32];
  const AdamWScalars s = block_scalars(lr, step, grad_scale, hyper);

  const int64_t total = table.first_chunk[table.count];
  int t = 0;
  for (int64_t b = blockIdx.x; b < total; b += gridDim.x) {
    while (table.first_chunk[t + 1] <= b) ++t;  // blocks only grow, so t only advances
    const int64_t block = b - table.first_chunk[t];
    const int64_t i = block * kInt8Block + threadIdx.x;
    const bool live = i < table.numel[t];
    float* m_scale = table.exp_avg_scale[t] + block;
    float* v_scale = table.exp_avg_sq_scale[t] + 2 * block;
    auto* m_codes = static_cast<int8_t*>(table.exp_avg[t]);
    auto* v_codes = static_cast<uint8_t*>(table.exp_avg_sq[t]);
    float m = 0.0f, v = 0.0f;
    if (live) {
      const LogBitsCode old_code(v_scale[0], v_scale[1]);
      m = decode_exp_avg(m_codes[i], *m_scale);
      v = old_code.decode(v_codes[i]);
      const AdamWCoeffs<float> c(s, decay_factor(s.lr, table.weight_decay[t]));
      P* param = static_cast<P*>(table.param[t]) + i;
      W* master = static_cast<W*>(kMaster == MasterFormat::kNone ? table.param[t] : table.master[t]) + i;
      P p{};
      if constexpr (kReadsParam) p = *param;
      W w = *master;
      float value = decode_master<kMaster>(p, w);
      adamw_math(value, m, v, static_cast<float>(static_cast<const G*>(table.grad[t])[i]), c);
      encode_master<kMaster>(value, p, w);
      if constexpr (kWritesParam) *param = p;
      *master = w;
    }
    // every thread has read the old scales before the reduction's barrier; thread 0 writes after it
    const BlockScales scales = reduce_block_scales(
        {fabsf(m), v > 0.0f ? v : INFINITY, v}, warps);
    const float lo = isinf(scales.lo) ? 0.0f : scales.lo;
    const float new_m_scale = exp_avg_scale(scales.absmax);
    if (live) {
      const LogBitsCode code(lo, scales.hi);
      const uint32_t index = table.offset[t] + static_cast<uint32_t>(i);  // mod 2^32
      m_codes[i] = encode_exp_avg(m, exp_avg_inv_scale(scales.absmax));
      v_codes[i] = code.encode(v, lowbias32(s.exp_avg_sq_key ^ index));
    }
    if (threadIdx.x == 0) {
      *m_scale = new_m_scale;
      v_scale[0] = lo;
      v_scale[1] = scales.hi;
    }
    __syncthreads();  // warps[] is reused by the next block
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Appends tensor i's roles as the table's next row, its work counted in units of `unit`
// elements (a block of threads' chunk, or an int8 block). Returns the row.
int add_row(TensorTable& table, int64_t i, bool has_master, int64_t unit, at::TensorList params,
            at::TensorList masters, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
            at::TensorList grads, at::ArrayRef<double> weight_decays, at::IntArrayRef offsets) {
  const int j = table.count++;
  table.param[j] = params[i].data_ptr();
  table.master[j] = has_master ? masters[i].data_ptr() : nullptr;
  table.exp_avg[j] = exp_avgs[i].data_ptr();
  table.exp_avg_sq[j] = exp_avg_sqs[i].data_ptr();
  table.grad[j] = grads[i].data_ptr();
  table.numel[j] = params[i].numel();
  table.weight_decay[j] = weight_decays[i];
  table.offset[j] = offsets.empty() ? 0u : static_cast<uint32_t>(offsets[i]);
  table.first_chunk[j + 1] = table.first_chunk[j] + (table.numel[j] + unit - 1) / unit;
  table.aligned[j] = aligned16(table.param[j]) && aligned16(table.exp_avg[j]) &&
                     aligned16(table.exp_avg_sq[j]) && aligned16(table.grad[j]) &&
                     (!has_master || aligned16(table.master[j]));
  return j;
}

template <typename P, typename G, MasterFormat kMaster>
void launch_int8(const std::vector<int64_t>& tensors, at::TensorList params, at::TensorList masters,
                 at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList grads,
                 at::ArrayRef<double> weight_decays, at::IntArrayRef offsets,
                 at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales, const float* lr,
                 const float* step, const float* grad_scale, const float* found_inf, Hyper hyper) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int max_blocks =
      at::cuda::getCurrentDeviceProperties()->multiProcessorCount * (2048 / kThreads);
  for (size_t first = 0; first < tensors.size(); first += kMaxTensors) {
    TensorTable table;
    table.count = 0;
    table.first_chunk[0] = 0;
    for (size_t k = first; k < tensors.size() && table.count < kMaxTensors; ++k) {
      const int64_t i = tensors[k];
      const int j = add_row(table, i, kMaster != MasterFormat::kNone, kInt8Block, params, masters,
                            exp_avgs, exp_avg_sqs, grads, weight_decays, offsets);
      table.exp_avg_scale[j] = exp_avg_scales[i].data_ptr<float>();
      table.exp_avg_sq_scale[j] = exp_avg_sq_scales[i].data_ptr<float>();
    }
    const int64_t blocks = table.first_chunk[table.count];
    if (blocks == 0) continue;
    fused_adamw_int8_kernel<P, G, kMaster>
        <<<static_cast<int>(std::min<int64_t>(blocks, max_blocks)), kThreads, 0, stream>>>(
            table, lr, step, grad_scale, found_inf, hyper);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename P, typename G, MasterFormat kMaster, typename M, typename V>
void launch(const std::vector<int64_t>& tensors, at::TensorList params, at::TensorList masters,
            at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList grads,
            at::ArrayRef<double> weight_decays, at::IntArrayRef offsets, const float* lr,
            const float* step, const float* grad_scale, const float* found_inf, Hyper hyper) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int max_blocks =
      at::cuda::getCurrentDeviceProperties()->multiProcessorCount * (2048 / kThreads);
  constexpr bool kHasMaster = kMaster != MasterFormat::kNone;
  for (size_t first = 0; first < tensors.size(); first += kMaxTensors) {
    TensorTable table;
    table.count = 0;
    table.first_chunk[0] = 0;
    for (size_t k = first; k < tensors.size() && table.count < kMaxTensors; ++k) {
      add_row(table, tensors[k], kHasMaster, kChunk, params, masters, exp_avgs, exp_avg_sqs, grads,
              weight_decays, offsets);
    }
    const int64_t chunks = table.first_chunk[table.count];
    if (chunks == 0) continue;
    const int blocks = static_cast<int>(std::min<int64_t>(chunks, max_blocks));
    fused_adamw_kernel<P, G, kMaster, M, V>
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
                      const std::optional<at::Tensor>& found_inf, at::TensorList exp_avg_scales,
                      at::TensorList exp_avg_sq_scales, int64_t seed, at::IntArrayRef offsets) {
  check_fused_adamw_args(params, masters, exp_avgs, exp_avg_sqs, grads, weight_decays, lr, step,
                         grad_scale, found_inf, offsets, exp_avg_scales, exp_avg_sq_scales);
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
  const Hyper hyper{beta1, beta2, eps, static_cast<uint32_t>(seed)};
  const MasterFormat master_format = master_format_of(masters);
  const at::ScalarType exp_avg_type = exp_avgs[0].scalar_type();
  const at::ScalarType exp_avg_sq_type = exp_avg_sqs[0].scalar_type();

  // One launch per (param dtype, grad dtype) present in the group: usually exactly one. The
  // master format and the moment dtypes are one per call.
  std::map<std::pair<at::ScalarType, at::ScalarType>, std::vector<int64_t>> buckets;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;
    buckets[{params[i].scalar_type(), grads[i].scalar_type()}].push_back(static_cast<int64_t>(i));
  }
  for (const auto& bucket : buckets) {
    const at::ScalarType param_type = bucket.first.first;
    const at::ScalarType grad_type = bucket.first.second;
    const std::vector<int64_t>& tensors = bucket.second;
    const bool known = dispatch_adamw_types(
        param_type, grad_type, master_format, exp_avg_type, exp_avg_sq_type, [&](auto types) {
          using T = decltype(types);
          using P = typename T::param_t;
          using G = typename T::grad_t;
          if constexpr (T::int8_moments) {
            launch_int8<P, G, T::master>(tensors, params, masters, exp_avgs, exp_avg_sqs, grads,
                                         weight_decays, offsets, exp_avg_scales, exp_avg_sq_scales,
                                         lr_d.data_ptr<float>(), step_d.data_ptr<float>(),
                                         scale_ptr, inf_ptr, hyper);
          } else {
            launch<P, G, T::master, typename T::exp_avg_t, typename T::exp_avg_sq_t>(
                tensors, params, masters, exp_avgs, exp_avg_sqs, grads, weight_decays, offsets,
                lr_d.data_ptr<float>(), step_d.data_ptr<float>(), scale_ptr, inf_ptr, hyper);
          }
        });
    TORCH_CHECK(known, "fused_adamw_: no CUDA kernel for params of ", param_type, ", grads of ",
                grad_type, " and moments of ", exp_avg_type, " / ", exp_avg_sq_type);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(hift, CUDA, m) { m.impl("fused_adamw_", &fused_adamw_cuda); }

}  // namespace hift
