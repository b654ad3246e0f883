"""Debiased center loss: forward + backward + center update, ours vs the reference (DESIGN §9).

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

from amgsn.losses import DebiasedCenterLoss
from amgsn.ops import reference as ref
from amgsn.ops.center_loss import center_apply_, debiased_center_loss_with_stats

B, D = 256, 768


def _case(device: str, C: int, dtype: torch.dtype, *, fused_stats: bool = False, check_finite: bool = True):
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 500, (C,), generator=gen)
    feats = torch.randn(B, D, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, C, (B,), generator=gen).to(device)
    m = DebiasedCenterLoss(C, D, class_counts=counts, alpha=0.5, check_finite=check_finite).to(device)
    m.centers.copy_(torch.randn(C, D, generator=gen))
    ref_centers = m.centers.clone()
    weights = m.class_weights

    def ours() -> None:
        feats.grad = None
        m(feats, labels).backward()
        m.update_centers(feats, labels)

    def ours_fused() -> None:
        feats.grad = None
        loss, stats = debiased_center_loss_with_stats(feats, labels, m.centers, weights, check_finite=check_finite)
        loss.backward()
        center_apply_(m.centers, stats.delta_sums, stats.counts, 0.5)

    def reference() -> None:
        feats.grad = None
        ref.debiased_center_loss(feats, labels, ref_centers, weights).backward()
        ref.center_update_(feats, labels, ref_centers, 0.5)

    return (ours_fused if fused_stats else ours), reference


CASES = [
    # (id, device, C, dtype, fused_stats, check_finite, target)
    ("cpu-C7-f32", "cpu", 7, torch.float32, False, True, 3.0),
    ("cpu-C1000-f32", "cpu", 1000, torch.float32, False, True, 3.0),
    ("cpu-C7-f32-fused-stats", "cpu", 7, torch.float32, True, True, None),
    ("cpu-C1000-f32-fused-stats", "cpu", 1000, torch.float32, True, True, None),
    ("cuda-C7-bf16", "cuda", 7, torch.bfloat16, False, True, 5.0),
    ("cuda-C7-bf16-no-finite-check", "cuda", 7, torch.bfloat16, False, False, None),
    ("cuda-C7-bf16-fused-stats", "cuda", 7, torch.bfloat16, True, True, None),
    ("cuda-C1000-bf16", "cuda", 1000, torch.bfloat16, False, True, None),
]


@pytest.mark.parametrize(
    "device,C,dtype,fused,check_finite,target",
    [pytest.param(*c[1:], id=c[0], marks=[pytest.mark.cuda] if c[1] == "cuda" else []) for c in CASES],
)
def test_center_loss_step(benchmark, device, C, dtype, fused, check_finite, target):
    ours, reference = _case(device, C, dtype, fused_stats=fused, check_finite=check_finite)
    benchmark.group = f"center_loss B={B} D={D} C={C}"
    what = "fused stats" if fused else "module"
    if not check_finite:
        what += ", check_finite=False"
    label = f"center loss fwd+bwd+update [{device}] B={B} D={D} C={C} {str(dtype).split('.')[-1]} ({what})"
    compare(benchmark, ours, reference, device=device, rounds=50, label=label, target=target)
