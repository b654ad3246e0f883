"""The CUDA build covers the GPUs users have, and a GPU it does not cover gets a clear error with the
fix instead of CUDA's "no kernel image is available" (issue 16). No GPU is needed: the missing-arch
path is simulated by answering the probe as CUDA would."""

from __future__ import annotations

import os

import pytest
import torch

from amgsn.ops import _cuda_arch

NO_IMAGE = "no kernel image is available for execution on the device"


def _expected_build() -> list[str] | None:
    """What setup.py builds in this environment: the user's list, else the portable one (no GPU
    visible here), or None for a build without CUDA kernels."""
    if not hasattr(torch.ops.amgsn, "cuda_arch_list"):
        return None
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;8.6;8.9;9.0+PTX"
    return [a.replace("+PTX", "").strip() for a in requested.replace(" ", ";").split(";") if a.strip()]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU visible the build targets that GPU")
def test_build_covers_the_portable_arch_list():
    expected = _expected_build()
    if expected is None:
        # A CPU-only build (FORCE_CUDA=0): CI and `make test` build CUDA, so this must not happen there.
        assert os.environ.get("FORCE_CUDA") != "1", "FORCE_CUDA=1 but amgsn._C has no CUDA kernels"
        assert _cuda_arch.built_arch_list() == []
        assert "without CUDA" in _cuda_arch._probe(0)
        return
    assert _cuda_arch.built_arch_list() == expected


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA device 0 is an RTX 5090 (compute capability 12.0); the probe's answer is settable."""
    answers: list[str] = []
    calls: list[int] = []

    def probe(index: int) -> str:
        calls.append(index)
        return answers[-1]

    monkeypatch.setattr(_cuda_arch, "_probe", probe)
    monkeypatch.setattr(_cuda_arch, "_READY", set())
    monkeypatch.setattr(_cuda_arch, "built_arch_list", lambda: ["8.0", "8.6", "8.9", "9.0"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA GeForce RTX 5090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (12, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return answers, calls


def test_missing_arch_is_a_clear_error_with_the_fix(fake_gpu):
    answers, calls = fake_gpu
    answers.append(NO_IMAGE)
    with pytest.raises(RuntimeError) as err:
        _cuda_arch.ensure_kernel_image(torch.device("cuda"))
    msg = str(err.value)
    assert "RTX 5090" in msg and "compute capability 12.0" in msg
    assert "8.0, 8.6, 8.9, 9.0" in msg and NO_IMAGE in msg
    assert 'TORCH_CUDA_ARCH_LIST="12.0"' in msg and "pip install --no-build-isolation" in msg
    # Not cached as ready: the next call asks (and fails) again.
    with pytest.raises(RuntimeError):
        _cuda_arch.ensure_kernel_image(torch.device("cuda", 0))
    assert calls == [0, 0]


def test_a_covered_gpu_is_probed_once_per_device(fake_gpu):
    answers, calls = fake_gpu
    answers.append("")
    for _ in range(3):
        _cuda_arch.ensure_kernel_image(torch.device("cuda", 0))
    _cuda_arch.ensure_kernel_image(torch.device("cuda", 1))
    assert calls == [0, 1]


@pytest.mark.cuda
def test_the_real_gpu_is_covered_and_the_center_loss_runs():
    from amgsn.ops import debiased_center_loss

    _cuda_arch.ensure_kernel_image(torch.device("cuda"))  # raises if the build lacks this GPU
    feats = torch.randn(8, 16, device="cuda")
    loss = debiased_center_loss(feats, torch.randint(0, 3, (8,), device="cuda"), torch.zeros(3, 16, device="cuda"),
                                torch.ones(3, device="cuda"))
    assert torch.isfinite(loss)
