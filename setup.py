"""Build entry for amgsn: compiles ``amgsn._C`` (C++ CPU kernels, plus CUDA kernels when enabled).

CUDA sources (``csrc/cuda/*.cu``) are compiled when ``FORCE_CUDA=1`` or when torch was built with
CUDA *and* nvcc is found.  ``CUDA_HOME`` defaults to ``/usr/local/cuda`` when that exists (torch's
own auto-detection may pick ``/usr/local`` and then the link fails).  GPU architectures: the
``TORCH_CUDA_ARCH_LIST`` you set; unset, the GPUs visible at build time (torch's own detection),
and with none visible (CI, a build host) :data:`PORTABLE_ARCH_LIST` — A100, A10/RTX 30xx, L4/L40S/
RTX 40xx, H100/H200, plus PTX of the newest so that later GPUs JIT.  Install with
``pip install --no-build-isolation -e .``.
"""

from __future__ import annotations

import glob
import os
import shutil

if os.path.isdir("/usr/local/cuda") and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

PORTABLE_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"

from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    if os.environ.get("FORCE_CUDA", "") == "0" and "FORCE_CUDA" in os.environ:
        return False
    import torch

    cuda_home = os.environ.get("CUDA_HOME", "")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    return torch.version.cuda is not None and bool(nvcc) and os.path.exists(nvcc)


def _default_arch_list() -> None:
    """Leave a user's TORCH_CUDA_ARCH_LIST alone; without one and without a visible GPU, build the
    portable list (torch would otherwise guess from its own build, or fail)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    import torch

    if torch.cuda.is_available():
        return  # torch's detection: the visible GPUs' architectures, PTX of the newest
    os.environ["TORCH_CUDA_ARCH_LIST"] = PORTABLE_ARCH_LIST


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # No -std flag: torch picks the standard its headers need (C++20 for torch >= 2.14, C++17 before).
    cxx_flags = ["-O3", "-fopenmp"]
    define_macros: list = []
    if _want_cuda():
        _default_arch_list()
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        return CUDAExtension(
            name="amgsn._C",
            sources=cpp_sources + cuda_sources,
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=define_macros + [("AMGSN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        name="amgsn._C",
        sources=cpp_sources,
        include_dirs=[os.path.join(here, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    package_dir={"amgsn": "amgsn", "amgsn.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
