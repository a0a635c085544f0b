"""setup.py refuses, in words that name the fix, a CUDA build the fused AdamW cannot run on: its
__grid_constant__ tensor table (27 KB) needs CUDA 12.1 and sm_70 or later."""
import os
import stat
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's functions, without building anything (setup() is not called)."""
    namespace = {"__name__": "setup_under_test", "__file__": str(ROOT / "setup.py")}
    with mock.patch("setuptools.setup"), mock.patch.dict(os.environ, {"HIFT_NO_EXTENSION": "1"}):
        exec(compile((ROOT / "setup.py").read_text(), "setup.py", "exec"), namespace)
    return namespace


def fake_cuda_home(tmp_path, release):
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    return str(tmp_path)


def test_cuda_before_12_1_is_refused_naming_the_fix(setup_py, tmp_path):
    with pytest.raises(SystemExit, match=r"nvcc 12\.0 .*CUDA 12\.1 or later.*CUDA_HOME"):
        setup_py["check_cuda_toolchain"](fake_cuda_home(tmp_path, "12.0"), "9.0", [])


@pytest.mark.parametrize("arch_list,visible", [("6.1;9.0", []), ("Pascal;Hopper", []), (None, [(6, 0)])])
def test_archs_below_sm70_are_refused_naming_the_fix(setup_py, tmp_path, arch_list, visible):
    with pytest.raises(SystemExit, match=r"sm_70 or later.*TORCH_CUDA_ARCH_LIST"):
        setup_py["check_cuda_toolchain"](fake_cuda_home(tmp_path, "13.0"), arch_list, visible)


def test_no_arch_to_compile_for_is_refused(setup_py, tmp_path):
    with pytest.raises(SystemExit, match="set TORCH_CUDA_ARCH_LIST"):
        setup_py["check_cuda_toolchain"](fake_cuda_home(tmp_path, "13.0"), None, [])


@pytest.mark.parametrize("arch_list,visible", [("9.0", []), ("8.0;9.0a+PTX", []), ("Hopper", []),
                                               (None, [(9, 0)]), ("native", [(8, 6)])])
def test_supported_toolchains_pass(setup_py, tmp_path, arch_list, visible):
    setup_py["check_cuda_toolchain"](fake_cuda_home(tmp_path, "12.1"), arch_list, visible)
