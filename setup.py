"""Build hift._C from csrc/: the CPU sources always, the CUDA sources where a CUDA build of
torch and nvcc are both present (a CPU-only torch cannot link CUDA code).

Set HIFT_NO_EXTENSION=1 to install the pure-Python package (every op then runs on its torch
reference), and HIFT_FORCE_CUDA=1 to compile the CUDA sources on a machine without a GPU
(CI does, for sm_90, so CUDA code that does not compile cannot land).
"""
import glob
import os
import re
import subprocess

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


# csrc/adamw_cuda.cu passes its 27 KB tensor table as a __grid_constant__ kernel argument: more
# than 4 KB of arguments needs CUDA 12.1 and sm_70 or later.
MIN_CUDA = (12, 1)
MIN_ARCH = (7, 0)
_OLD_ARCH_NAMES = ("Kepler", "Maxwell", "Pascal")  # torch's names for archs below sm_70


def nvcc_version(cuda_home):
    """(major, minor) of the nvcc under cuda_home, or None where it cannot be run."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def target_archs(arch_list, visible_capabilities):
    """The archs a build compiles for, as (major, minor) or torch's names: TORCH_CUDA_ARCH_LIST,
    or (unset or "native") the visible GPUs', as torch's BuildExtension picks them."""
    if arch_list and arch_list != "native":
        archs = []
        for token in re.split(r"[;\s]+", arch_list.strip()):
            found = re.fullmatch(r"(\d+)\.(\d+)a?(\+PTX)?", token)
            archs.append((int(found.group(1)), int(found.group(2))) if found else token)
        return archs
    return sorted(set(visible_capabilities))


def check_cuda_toolchain(cuda_home, arch_list, visible_capabilities):
    """Refuse, in words that name the fix, a CUDA build the fused AdamW cannot run on (nvcc would
    fail later with a message about argument sizes, or the launch at run time)."""
    version = nvcc_version(cuda_home) if cuda_home else None
    if version is not None and version < MIN_CUDA:
        raise SystemExit(
            f"hift: nvcc {version[0]}.{version[1]} under {cuda_home} is too old: the fused AdamW needs "
            f"CUDA {MIN_CUDA[0]}.{MIN_CUDA[1]} or later (its 27 KB __grid_constant__ tensor table). Point "
            "CUDA_HOME at a newer toolkit, or build without the extension: HIFT_NO_EXTENSION=1.")
    archs = target_archs(arch_list, visible_capabilities)
    if not archs:
        raise SystemExit(
            "hift: no GPU is visible and TORCH_CUDA_ARCH_LIST is unset, so there is no arch to compile "
            "the CUDA kernels for: set TORCH_CUDA_ARCH_LIST (e.g. 9.0 for H100/H200, 8.0 for A100).")
    too_old = [a for a in archs if (a < MIN_ARCH if isinstance(a, tuple) else a.startswith(_OLD_ARCH_NAMES))]
    if too_old:
        shown = ", ".join(f"{a[0]}.{a[1]}" if isinstance(a, tuple) else a for a in too_old)
        raise SystemExit(
            f"hift: the fused AdamW needs sm_70 or later; this build targets {shown}. Set "
            "TORCH_CUDA_ARCH_LIST to archs 7.0 or newer only (e.g. 9.0), or build without the "
            "extension: HIFT_NO_EXTENSION=1.")


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
        from torch.utils.cpp_extension import CUDA_HOME

        visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        check_cuda_toolchain(CUDA_HOME, os.environ.get("TORCH_CUDA_ARCH_LIST"), visible)
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--fmad=false", "-DHIFT_WITH_CUDA"]
        # pip's CUDA wheels keep the toolkit headers under site-packages/nvidia/cu*/include.
        kwargs["include_dirs"] = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include")))
        ext = CUDAExtension(**kwargs)
    else:
        ext = CppExtension(**kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
