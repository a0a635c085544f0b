"""Build hift._C from csrc/: the CPU sources always, the CUDA sources where a CUDA build of
torch and nvcc are both present (a CPU-only torch cannot link CUDA code).

Set HIFT_NO_EXTENSION=1 to install the pure-Python package (every op then runs on its torch
reference), and HIFT_FORCE_CUDA=1 to compile the CUDA sources on a machine without a GPU
(CI does, for sm_90, so CUDA code that does not compile cannot land).
"""
import glob
import os

from setuptools import find_packages, setup

# every subpackage (hift.demo, hift.plan, hift.train, ...): a plain, non-editable install
# must carry them all
PACKAGES = ["hift", *(f"hift.{p}" for p in find_packages("python/hift")), "hift_kernels"]
PACKAGE_DIR = {"hift": "python/hift", "hift_kernels": "hift_kernels"}


def cuda_wanted(torch_cuda_version):
    if os.environ.get("HIFT_FORCE_CUDA") == "1":
        return True
    if torch_cuda_version is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def extensions():
    if os.environ.get("HIFT_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    if not cpp_sources:
        return [], {}
    use_cuda = cuda_wanted(torch.version.cuda) and bool(cuda_sources)
    # No -std: torch's BuildExtension adds the standard its headers need (torch 2.14's need C++20).
    # No contraction: the fused AdamW rounds op by op as torch.optim.AdamW does, with explicit
    # fused multiply-adds exactly where torch's kernels have them (csrc/adamw.h). No trapping
    # math: lets the int8 codec's branch-free loops vectorize (no result changes; hift never
    # reads the floating-point exception flags).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    kwargs = dict(
        name="hift._C",
        sources=cpp_sources + (cuda_sources if use_cuda else []),
        extra_compile_args={"cxx": cxx_flags + (["-DHIFT_WITH_CUDA"] if use_cuda else [])},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if use_cuda:
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--fmad=false", "-DHIFT_WITH_CUDA"]
        # pip's CUDA wheels keep the toolkit headers under site-packages/nvidia/cu*/include.
        kwargs["include_dirs"] = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include")))
        ext = CUDAExtension(**kwargs)
    else:
        ext = CppExtension(**kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
