"""Does this build of ``amgsn._C`` have CUDA kernels for the GPU at hand? (issue 16)

``amgsn._C`` is compiled for a list of GPU architectures (setup.py). On a GPU outside that list,
CUDA itself only says "no kernel image is available for execution on the device" — at some later
synchronisation, far from the cause. :func:`ensure_kernel_image` asks once per device (the probe in
``csrc/cuda/arch_probe.cu`` launches nothing) and raises an error that names the GPU, its compute
capability, what the build covers and the command that fixes it. The Triton kernels need no such
check: Triton compiles them for the device it runs on.
"""

from __future__ import annotations

import torch

import amgsn._ext  # noqa: F401  (loads amgsn._C)

_READY: set[int] = set()  # device indices already known to have a kernel image


def _probe(index: int) -> str:
    """"" when the build has a kernel image for CUDA device ``index``, else the reason."""
    if not hasattr(torch.ops.amgsn, "cuda_arch_probe"):
        return "amgsn._C was built without CUDA kernels"
    return torch.ops.amgsn.cuda_arch_probe(index)


def built_arch_list() -> list[str]:
    """The architectures this build was compiled for, as compute capabilities ("8.0", ...);
    empty for a build without CUDA."""
    if not hasattr(torch.ops.amgsn, "cuda_arch_list"):
        return []
    codes = [c for c in torch.ops.amgsn.cuda_arch_list().split(",") if c.strip()]
    return [f"{int(c) // 100}.{int(c) % 100 // 10}" for c in codes]


def arch_error_message(name: str, capability: tuple[int, int], built: list[str], reason: str) -> str:
    cc = f"{capability[0]}.{capability[1]}"
    covers = ", ".join(built) if built else "no GPU architecture"
    return (f"amgsn's compiled CUDA kernels cannot run on {name} (compute capability {cc}): this build of "
            f"amgsn._C covers {covers} ({reason}). Rebuild it for this GPU in the source tree: "
            f"FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=\"{cc}\" pip install --no-build-isolation --no-deps -e . "
            "(or leave TORCH_CUDA_ARCH_LIST unset and build on this machine: the visible GPU is detected)")


def ensure_kernel_image(device: torch.device) -> None:
    """Raise RuntimeError with a fix if ``amgsn._C`` has no kernels for CUDA ``device``.

    Checked once per device and process; later calls cost a set lookup. Skipped while
    torch.compile traces (the eager call before or the kernel launch itself still fails loudly).
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _READY or torch.compiler.is_compiling():
        return
    reason = _probe(index)
    if reason:
        raise RuntimeError(arch_error_message(torch.cuda.get_device_name(index),
                                              torch.cuda.get_device_capability(index), built_arch_list(), reason))
    _READY.add(index)
