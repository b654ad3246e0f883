"""Helpers shared by the masking-op tests (test_masking_ops.py, test_masking_triton_route.py,
test_triton_kernels.py): independent expectations that do not reuse the ops' own formulas."""

from __future__ import annotations

import torch

# Per-image mask ratio -> kept patches, worked out by hand: (1 - r) * N in float64, floored after
# adding 1e-4 (which rescues products like 0.19999999999999996 * 10 from falling to the integer below),
# clamped to [1, N]. Fractional parts >= 0.5 are floored, not rounded. One batch per N.
HAND_KEEP_TABLE: list[tuple[int, list[float], list[int]]] = [
    # (1-r)*N:      1.9999999999999996, 8.5, 4.5, 10, 0 -> clamp, 0.9999999999999998
    (10, [0.8, 0.15, 0.55, 0.0, 1.0, 0.9], [2, 8, 4, 10, 1, 1]),
    # 1.9999999999999996, 6.000000000000001, 19.0
    (20, [0.9, 0.7, 0.05], [2, 6, 19]),
    # 25.5, 35.699999999999996, 15.300000000000002
    (51, [0.5, 0.3, 0.7], [25, 35, 15]),
    # 4.8999999999999995, 0 -> clamp, 7, 4.55
    (7, [0.3, 1.0, 0.0, 0.35], [4, 1, 7, 4]),
]


def boundary_gap(values: torch.Tensor, num_keep: torch.Tensor) -> torch.Tensor:
    """Per image, the gap between the last masked and the first kept value in selection order (inf
    when nothing or everything is masked): only where it is tiny may rounding swap the two."""
    B, N = values.shape
    ordered = values.double().sort(dim=1, descending=True).values.cpu()
    masked = (N - num_keep).cpu()
    last = (masked - 1).clamp(0, N - 1)  # last masked position in order
    first = masked.clamp(0, N - 1)  # first kept position in order
    rows = torch.arange(B)
    gap = ordered[rows, last] - ordered[rows, first]
    gap[(masked == 0) | (masked == N)] = float("inf")
    return gap
