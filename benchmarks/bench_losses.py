"""Debiased center loss: forward + backward + center update, ours vs the reference (docs/method.md §9).

Ours = ``DebiasedCenterLoss`` (compiled op: one pass forward, one-multiply backward, one-pass
in-place update); "fused stats" = the forward also returns the per-class statistics and the update
is applied from them. Reference = the common distance-matrix loss + autograd + a separate
index_add update (amgsn/ops/reference.py). Same inputs, same process, median of each.

CPU:  .venv/bin/pytest benchmarks/bench_losses.py --benchmark-enable -q
CUDA: benchmarks/gpu_check.sh (the ``cuda`` cases)
"""

from __future__ import annotations

import pytest
import torch
from _ratio import compare

from amgsn.benchmarking import center_loss_step

B, D = 256, 768


CASES = [
    # (id, device, C, dtype, fused_stats, check_finite, target); check_finite None = the default
    # (checked on the CPU, off on CUDA: no host sync)
    ("cpu-C7-f32", "cpu", 7, torch.float32, False, None, 3.0),
    ("cpu-C1000-f32", "cpu", 1000, torch.float32, False, None, 3.0),
    ("cpu-C7-f32-fused-stats", "cpu", 7, torch.float32, True, None, None),
    ("cpu-C1000-f32-fused-stats", "cpu", 1000, torch.float32, True, None, None),
    ("cuda-C7-bf16", "cuda", 7, torch.bfloat16, False, None, 10.0),
    ("cuda-C7-bf16-finite-check", "cuda", 7, torch.bfloat16, False, True, None),
    ("cuda-C7-bf16-fused-stats", "cuda", 7, torch.bfloat16, True, None, None),
    ("cuda-C1000-bf16", "cuda", 1000, torch.bfloat16, False, None, 10.0),
    ("cuda-C1000-bf16-fused-stats", "cuda", 1000, torch.bfloat16, True, None, None),
]


@pytest.mark.parametrize(
    "device,C,dtype,fused,check_finite,target",
    [pytest.param(*c[1:], id=c[0], marks=[pytest.mark.cuda] if c[1] == "cuda" else []) for c in CASES],
)
def test_center_loss_step(benchmark, device, C, dtype, fused, check_finite, target):
    ours, reference, _ = center_loss_step(device, C, dtype, B=B, D=D, fused_stats=fused, check_finite=check_finite)
    benchmark.group = f"center_loss B={B} D={D} C={C}"
    what = "fused stats" if fused else "module"
    if check_finite is not None:
        what += f", check_finite={check_finite}"
    label = f"center loss fwd+bwd+update [{device}] B={B} D={D} C={C} {str(dtype).split('.')[-1]} ({what})"
    compare(benchmark, ours, reference, device=device, rounds=50, label=label, target=target)
