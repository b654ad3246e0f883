"""Build entry for amgsn: compiles ``amgsn._C`` (C++ CPU kernels, plus CUDA kernels when enabled).

CUDA sources (``csrc/cuda/*.cu``) are compiled when ``FORCE_CUDA=1`` or when torch was built with
CUDA *and* nvcc is found.  ``CUDA_HOME`` defaults to ``/usr/local/cuda`` when that exists (torch's
own auto-detection may pick ``/usr/local`` and then the link fails), ``TORCH_CUDA_ARCH_LIST`` to
``9.0`` (H100/H200).  Install with ``pip install --no-build-isolation -e .``.
"""

from __future__ import annotations

import glob
import os
import shutil

if os.path.isdir("/usr/local/cuda") and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

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


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # No -std flag: torch picks the standard its headers need (C++20 for torch >= 2.14, C++17 before).
    cxx_flags = ["-O3", "-fopenmp"]
    define_macros: list = []
    if _want_cuda():
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
