"""``DebiasedCenterLoss`` (docs/method.md §3.6–3.7, §4.3): class-weighted center loss + Wen et al. update.

Thin module over :mod:`amgsn.ops.center_loss`: it owns the centers (a buffer, saved in the
``state_dict``) and the class weights, computed once from the training-set class counts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from amgsn.ops.center_loss import center_apply_, center_stats, center_update_, debiased_center_loss

__all__ = ["WEIGHTINGS", "DebiasedCenterLoss", "class_weights_from_counts"]

WEIGHTINGS = ("inverse", "effective", "none")


def class_weights_from_counts(
    counts: Sequence[float] | torch.Tensor, weighting: str = "inverse", beta: float = 0.9999
) -> torch.Tensor:
    """Per-class loss weights from training-set class counts -> (C,) float32.

    * ``"inverse"``: ``1 / n_j`` (inverse frequency);
    * ``"effective"``: ``(1 − β) / (1 − β^{n_j})`` (effective number of samples, Cui et al. 2019);
    * ``"none"``: 1.

    Normalised to mean 1 over the classes with ``n_j > 0``. Classes with ``n_j = 0`` get weight 0
    (their samples, should any appear, do not count) and a warning is issued.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not (math.isfinite(beta) and 0.0 <= beta < 1.0):
        raise ValueError(f"beta must lie in [0, 1), got {beta}")
    n = torch.as_tensor(counts, dtype=torch.float64).detach().cpu()
    if n.dim() != 1 or n.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(n.shape)}")
    if not bool(torch.isfinite(n).all()) or bool((n < 0).any()):
        raise ValueError(f"class_counts must be finite and >= 0, got {n.tolist()}")
    present = n > 0
    if not bool(present.any()):
        raise ValueError("class_counts has no class with a positive count")
    safe = torch.where(present, n, torch.ones_like(n))
    if weighting == "inverse":
        raw = 1.0 / safe
    elif weighting == "effective":
        # 1 − β^n as −expm1(n·log β): no cancellation for β close to 1 and small n.
        raw = (1.0 - beta) / -torch.expm1(safe * math.log(beta)) if beta > 0 else torch.ones_like(n)
    else:
        raw = torch.ones_like(n)
    raw = torch.where(present, raw, torch.zeros_like(raw))
    weights = raw / raw[present].mean()
    absent = (~present).nonzero().flatten().tolist()
    if absent:
        warnings.warn(
            f"classes {absent} have a training count of 0: their center-loss weight is 0",
            UserWarning,
            stacklevel=2,
        )
    return weights.float()


class DebiasedCenterLoss(nn.Module):
    """Class-weighted center loss with centers updated by the Wen et al. rule (docs/method.md §3.6–3.7).

    ``forward(features (B, D), labels (B,))`` returns ``Σ_i w[y_i]·½‖f_i − c[y_i]‖² / Σ_i w[y_i]``;
    the centers get no gradient. Call ``update_centers(features, labels)`` once per step, after the
    optimiser step (updating between a forward and its backward raises autograd's in-place error,
    since the backward needs the centers of the forward):
    ``c_j ← c_j − α·Σ_{y_i = j}(c_j − f_i) / (1 + n_j)`` — a per-class mean step, so
    rare classes' centers move as fast as frequent ones'. Under ``torch.distributed`` (more than one
    rank) both are collectives that make K ranks × batch B behave as one process with the K·B
    batch: the forward normalises by the global ``Σ w`` (see :meth:`forward`), and the update
    all-reduces the per-class statistics first, so every rank keeps identical centers.

    Args:
        num_classes, feat_dim: C and D.
        class_counts: training-set count per class -> weights by ``weighting`` (see
            :func:`class_weights_from_counts`). Zero counts get weight 0 and a warning.
        class_weights: explicit (C,) weights (finite, >= 0) instead of counts.
        weighting: "inverse" | "effective" | "none"; beta: β of "effective".
        alpha: center step size α in [0, 1].
        check_finite: raise ValueError on non-finite features / centers. ``None`` (default):
            checked on the CPU; on CUDA not (no host sync) — a non-finite input makes the loss
            non-finite, which the training loops' NonFiniteGuard checks at the step's one sync.
            ``True`` forces the check on CUDA too (one host sync per call), ``False`` skips it.

    Centers start at 0 (identical on every rank without communication; the first update moves
    each seen class to ``α·n/(1+n)`` of its batch mean). Buffers: ``centers`` (C, D) float32,
    ``class_weights`` (C,) float32.
    """

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        class_counts: Sequence[float] | torch.Tensor | None = None,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        weighting: str = "inverse",
        beta: float = 0.9999,
        alpha: float = 0.5,
        *,
        check_finite: bool | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("feat_dim", feat_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if class_counts is not None and class_weights is not None:
            raise ValueError("give class_counts or class_weights, not both")
        if class_weights is not None:
            w = torch.as_tensor(class_weights, dtype=torch.float32).detach().clone().cpu()
            if w.shape != (num_classes,):
                raise ValueError(f"class_weights must have shape ({num_classes},), got {tuple(w.shape)}")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError(f"class_weights must be finite and >= 0, got {w.tolist()}")
        elif class_counts is not None:
            n = torch.as_tensor(class_counts)
            if n.shape != (num_classes,):
                raise ValueError(f"class_counts must have shape ({num_classes},), got {tuple(n.shape)}")
            w = class_weights_from_counts(n, weighting, beta)
        else:
            w = torch.ones(num_classes)
        self.num_classes, self.feat_dim = num_classes, feat_dim
        self.weighting, self.beta, self.alpha = weighting, beta, float(alpha)
        if check_finite is not None and not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool or None, got {type(check_finite).__name__}")
        self.check_finite = check_finite
        self.register_buffer("centers", torch.zeros(num_classes, feat_dim))
        self.register_buffer("class_weights", w)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """features (B, D) float, labels (B,) int64 in [0, C) -> 0-dim loss of ``features.dtype``.

        Under ``torch.distributed`` (world size K > 1) this is a collective: every rank must call it
        once per step. It returns the loss of the *global* batch, ``Σ_all w·½‖f − c‖² / Σ_all w``
        (the same value on every rank), with a gradient scaled for DistributedDataParallel: DDP
        *averages* the ranks' gradients, so rank r back-propagates
        ``K · Σ_{i ∈ r} w[y_i]·½‖f_i − c[y_i]‖² / Σ_all w`` and the average over ranks is exactly the
        gradient of the global loss — what one process with the whole batch computes. (With the
        local normaliser ``Σ_{i ∈ r} w`` instead, every rank's weighted mean would count equally
        whatever its share of ``Σ w``: the gradient would depend on how the batch was split.)
        Without DDP's averaging, divide the gradient by K yourself.
        """
        loss = debiased_center_loss(
            features, labels, self.centers, self.class_weights, check_finite=self.check_finite
        )
        world = _world_size()
        if world == 1:
            return loss
        # The op is rank-local; recover its numerator and normaliser (double: Σ w over a large
        # global batch) and sum both over ranks in one all-reduce. No gradient flows through them.
        acc = torch.float32 if loss.device.type == "mps" else torch.float64  # MPS has no float64
        w_local = self.class_weights[labels].to(acc).sum()
        sums = torch.stack([w_local, loss.detach().to(acc) * w_local])
        dist.all_reduce(sums)
        w_global, num_global = sums[0], sums[1]
        positive = w_global > 0
        safe = torch.where(positive, w_global, torch.ones_like(w_global))
        # A batch without any weighted sample has loss 0 and gradient 0 (as the op on one process).
        scale = torch.where(positive, world * w_local / safe, torch.zeros_like(safe))
        value = torch.where(positive, num_global / safe, torch.zeros_like(safe))
        scaled = loss * scale.to(loss.dtype)
        # Value of the global loss, gradient of ``scaled``.
        return scaled + (value.to(loss.dtype) - scaled.detach())

    @torch.no_grad()
    def update_centers(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Apply the Wen et al. step for this batch (after the optimiser step); all-reduced across
        ranks when ``torch.distributed`` is initialised with more than one process."""
        features = features.detach()
        if _world_size() > 1:
            stats = center_stats(features, labels, self.centers)
            dist.all_reduce(stats.delta_sums)
            dist.all_reduce(stats.counts)
            center_apply_(self.centers, stats.delta_sums, stats.counts, self.alpha)
        else:
            center_update_(features, labels, self.centers, self.alpha)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, weighting={self.weighting!r}, "
            f"alpha={self.alpha}"
        )


def _world_size() -> int:
    """The number of ranks of the default process group; 1 without torch.distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
