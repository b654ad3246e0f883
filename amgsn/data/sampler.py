"""Class-balanced sampling for imbalanced FER sets (AffectNet, RAF-DB's fear / disgust)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import WeightedRandomSampler


def inverse_frequency_weights(targets: Sequence[int] | torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Per-sample weights ``1 / count[label]`` (float64, shape ``(N,)``): every class then has the
    same total weight, whatever its size."""
    t = torch.as_tensor(targets)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"targets must be a non-empty 1-D sequence of labels, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"targets must hold integer labels, got dtype {t.dtype}")
    t = t.long()
    if int(t.min()) < 0:
        raise ValueError(f"targets must be >= 0, got {int(t.min())}")
    if num_classes is not None and int(t.max()) >= num_classes:
        raise ValueError(f"targets has label {int(t.max())} >= num_classes={num_classes}")
    counts = torch.bincount(t, minlength=num_classes or 0).double()
    return 1.0 / counts[t]


def build_balanced_sampler(
    targets: Sequence[int] | torch.Tensor,
    num_samples: int | None = None,
    *,
    replacement: bool = True,
    generator: torch.Generator | None = None,
    num_classes: int | None = None,
) -> WeightedRandomSampler:
    """A ``WeightedRandomSampler`` drawing each class equally often on average.

    Args:
        targets: the data set's labels (``dataset.targets``), shape ``(N,)``.
        num_samples: draws per epoch (default ``N``).
        replacement: sample with replacement (needed to over-sample rare classes).
        generator: torch generator for reproducible draws.
    """
    weights = inverse_frequency_weights(targets, num_classes)
    n = len(weights) if num_samples is None else num_samples
    if n <= 0:
        raise ValueError(f"num_samples must be > 0, got {n}")
    return WeightedRandomSampler(weights, n, replacement=replacement, generator=generator)
