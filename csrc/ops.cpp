// The schemas of hift._C and the Python module init. The only file that defines the library:
// kernels register their implementations (CPU, CUDA) next to their code with
// TORCH_LIBRARY_IMPL, so a build without CUDA simply lacks the CUDA kernel.
#include <Python.h>
#include <torch/library.h>

#include "adamw.h"
#include "swap.h"

extern "C" {
// `from hift import _C` loads this library, which registers torch.ops.hift.* and
// torch.classes.hift.*; the Python module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace hift {
namespace {

// Shapes never change and nothing is returned, so the fake (meta) kernel has nothing to do;
// it lets FakeTensor, torch.compile and opcheck trace through the op. (It does not check the
// arguments: sizes may be symbolic there.)
void fused_adamw_meta(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                      at::TensorList, at::ArrayRef<double>, const at::Tensor&, const at::Tensor&,
                      double, double, double, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, at::TensorList, at::TensorList, int64_t,
                      at::IntArrayRef) {}

}  // namespace

TORCH_LIBRARY(hift, m) {
  // masters: empty, float32 or int16 (bf16 remainders); moments float32, bfloat16 (rounded
  // stochastically from (seed, step, offsets[i] + element)) or int8/uint8 codes with their
  // blocks' fp32 scales, one tensor each per param (empty lists for the other formats; a
  // schema cannot default a tensor list) (python/hift/formats.py).
  m.def(
      "fused_adamw_(Tensor(a!)[] params, Tensor(b!)[] masters, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor[] grads, float[] weight_decays, Tensor lr, Tensor step, "
      "float beta1, float beta2, float eps, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor(e!)[] exp_avg_scales, Tensor(f!)[] exp_avg_sq_scales, int seed=0, int[] offsets=[]) "
      "-> ()");
  m.def("cpu_kernel_isa() -> str", &cpu_kernel_isa);  // no tensors: one kernel for every backend
  register_state_swapper(m);
}

TORCH_LIBRARY_IMPL(hift, Meta, m) { m.impl("fused_adamw_", &fused_adamw_meta); }

}  // namespace hift
