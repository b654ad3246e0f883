"""The CUDA masking kernels at odd sizes: N, d and D multiples of no block size, so every tile has a ragged edge.

``benchmarks/gpu_check.sh`` also runs this file under ``compute-sanitizer --tool memcheck`` with PyTorch's
caching allocator off (each tensor its own allocation): a load or store past a tensor's end — e.g. a bounds
term dropped from a masked load whose extra values the store mask then discards — is an error there even
when every output is right. On the CPU the same property is checked through the Triton interpreter
(``interpreter_memcheck`` in tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from test_triton_kernels import _CUDA_DTYPES, _cuda_case


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", _CUDA_DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 37, 24, 37), (2, 3, 101, 40, 517)])
def test_cuda_kernels_odd_sizes(seed, dtype, shape):
    ratio = torch.rand(shape[0], dtype=torch.float64)
    ratio[0] = 0.0  # one image keeps every patch: its last row is the tensor's last row
    _cuda_case(*shape, dtype, ratio, "relative", seed)
