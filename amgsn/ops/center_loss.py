"""Debiased center loss (docs/method.md §3.6) and the Wen et al. center update (§3.7), over ``amgsn._C``.

The compiled operators (``csrc/center_loss.cpp``, ``csrc/cuda/center_loss.cu``) do the work in one
pass over the features; this module adds readable argument checks, fake-tensor shapes
(``register_fake``, for ``torch.compile``) and the gradient (``register_autograd``):

* ``torch.ops.amgsn.center_loss_forward`` -> (loss, inv_wsum, delta_sums, counts) with
  ``inv_wsum = 1 / Σ_i w[y_i]``; it reads the features once and writes nothing of their size.
  ``torch.ops.amgsn.center_loss_backward`` recomputes ``∂L/∂f_i = grad_out · inv_wsum · w[y_i]·
  (f_i − c[y_i])`` from the saved inputs in one pass (like torch's own losses). The centers are
  saved for backward, so updating them in place between forward and backward raises autograd's
  "modified by an inplace operation" error: update after the backward (docs/method.md §4.3 order).
* ``delta_sums[j] = Σ_{i: y_i = j} (f_i − c_j)`` and ``counts[j] = n_j`` are what the center update
  needs; they are additive over samples, which is what the distributed update all-reduces.

Value checks: labels outside [0, C) raise ValueError on CPU and trip a device-side assert on CUDA
(never an out-of-bounds access). Finiteness (``check_finite``): by default (``None``) checked on the
CPU, where it rides on the pass the kernel makes anyway, and not on CUDA, where raising would cost a
host sync per call. There a non-finite feature or center makes the loss itself non-finite (every
row's ``w·½‖f − c‖²`` is non-negative, so nothing cancels), and the training loops check the loss at
the step's one existing sync (``amgsn.engine.common.NonFiniteGuard``: skip the step, stop after
several in a row). ``check_finite=True`` on CUDA restores the immediate ValueError (one sync);
class weights are checked when ``DebiasedCenterLoss`` is built.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

import amgsn._ext  # noqa: F401  (loads amgsn._C: registers torch.ops.amgsn.center_*)
from amgsn.ops._checks import check_dim, check_same_device, check_tensor
from amgsn.ops._cuda_arch import ensure_kernel_image

__all__ = [
    "CenterStats",
    "debiased_center_loss",
    "debiased_center_loss_with_stats",
    "center_stats",
    "center_apply_",
    "center_update_",
]

CENTER_DTYPES = (torch.float32, torch.float64)


class CenterStats(NamedTuple):
    """Per-class statistics of a batch for the center update (docs/method.md §3.7).

    delta_sums: (C, D) float32 (float64 if features or centers are) — ``Σ_{i: y_i = j} (f_i − c_j)``.
    counts:     (C,) int64 — ``n_j``, the number of samples of class j.
    Both are sums over samples: all-reducing them across ranks gives the statistics of the global
    batch (the centers being identical on every rank).
    """

    delta_sums: torch.Tensor
    counts: torch.Tensor


def _compute_dtype(features_dtype: torch.dtype, centers_dtype: torch.dtype) -> torch.dtype:
    # Mirrors center_loss::compute_dtype in csrc/center_loss.h.
    return torch.float64 if torch.float64 in (features_dtype, centers_dtype) else torch.float32


# --------------------------------------------------------------------------------------------
# Checks (static: shapes, dtypes, devices — traceable by torch.compile)
# --------------------------------------------------------------------------------------------


def _check_points(features: object, labels: object, centers: object) -> None:
    check_tensor("features", features, ndim=2, floating=True)
    check_tensor("labels", labels, ndim=1, dtypes=(torch.int64,))
    check_tensor("centers", centers, ndim=2, dtypes=CENTER_DTYPES)
    check_dim("labels", labels, 0, features.shape[0], "the batch size of features")
    check_dim("centers", centers, 1, features.shape[1], "the feature width of features")
    if centers.shape[0] < 1:
        raise ValueError(f"centers must hold at least one class, got shape {tuple(centers.shape)}")
    check_same_device(features=features, labels=labels, centers=centers)
    if features.is_cuda:
        ensure_kernel_image(features.device)  # a GPU this build does not cover: say so, with the fix


def _check_class_weights(class_weights: object, centers: torch.Tensor) -> None:
    check_tensor("class_weights", class_weights, ndim=1, floating=True)
    check_dim("class_weights", class_weights, 0, centers.shape[0], "the number of classes C of centers")
    check_same_device(centers=centers, class_weights=class_weights)


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float, got {type(alpha).__name__}")
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return float(alpha)


def _no_grad_view(t: torch.Tensor) -> torch.Tensor:
    # Centers and class weights never receive a gradient (docs/method.md §3.6).
    return t.detach() if t.requires_grad else t


# --------------------------------------------------------------------------------------------
# Fake tensors (torch.compile) and autograd
# --------------------------------------------------------------------------------------------


@torch.library.register_fake("amgsn::center_loss_forward")
def _forward_fake(features, labels, centers, class_weights, with_stats, check_finite):
    B, D = features.shape
    rows = centers.shape[0] if with_stats else 0
    acc = _compute_dtype(features.dtype, centers.dtype)
    return (
        features.new_empty(()),
        features.new_empty((), dtype=acc),
        features.new_empty((rows, D), dtype=acc),
        features.new_empty((rows,), dtype=torch.int64),
    )


@torch.library.register_fake("amgsn::center_loss_backward")
def _backward_fake(grad_loss, features, labels, centers, class_weights, inv_wsum):
    return features.new_empty(features.shape)


@torch.library.register_fake("amgsn::center_stats")
def _stats_fake(features, labels, centers):
    C, D = centers.shape
    acc = _compute_dtype(features.dtype, centers.dtype)
    return features.new_empty((C, D), dtype=acc), features.new_empty((C,), dtype=torch.int64)


@torch.library.register_fake("amgsn::center_apply")
def _apply_fake(centers, delta_sums, counts, alpha):
    return None


@torch.library.register_fake("amgsn::center_update")
def _update_fake(features, labels, centers, alpha):
    return None


def _forward_setup_context(ctx, inputs, output):
    features, labels, centers, class_weights, _, _ = inputs
    _, inv_wsum, delta_sums, counts = output
    ctx.mark_non_differentiable(inv_wsum, delta_sums, counts)
    # The other outputs have no gradient: do not let autograd fill (C, D) zeros for them.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(features, labels, centers, class_weights, inv_wsum)


def _forward_backward(ctx, grad_loss, *_unused):
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    features, labels, centers, class_weights, inv_wsum = ctx.saved_tensors
    if not torch.is_grad_enabled():
        # The usual case: one compiled pass over the inputs.
        grad = torch.ops.amgsn.center_loss_backward(grad_loss, features, labels, centers, class_weights, inv_wsum)
    else:
        # create_graph=True: the same formula in differentiable torch ops (double backward).
        # In the compute dtype, like the op (float32 class weights must not round a float64 gradient).
        acc = inv_wsum.dtype
        rows = class_weights[labels].to(acc) * (grad_loss.to(acc) * inv_wsum)
        grad = (rows[:, None] * (features.to(acc) - centers[labels].to(acc))).to(features.dtype)
    return grad, None, None, None, None, None


torch.library.register_autograd(
    "amgsn::center_loss_forward", _forward_backward, setup_context=_forward_setup_context
)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def resolve_check_finite(check_finite: bool | None, device: torch.device) -> bool:
    """``check_finite=None`` -> checked on the CPU (no sync there), not on CUDA (see the module doc)."""
    if check_finite is None:
        return device.type == "cpu"
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool or None, got {type(check_finite).__name__}")
    return check_finite


def _forward(features, labels, centers, class_weights, with_stats: bool, check_finite: bool | None):
    _check_points(features, labels, centers)
    _check_class_weights(class_weights, centers)
    check = resolve_check_finite(check_finite, features.device)
    return torch.ops.amgsn.center_loss_forward(
        features, labels, _no_grad_view(centers), _no_grad_view(class_weights), with_stats, check
    )


def debiased_center_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    class_weights: torch.Tensor,
    *,
    check_finite: bool | None = None,
) -> torch.Tensor:
    """Class-weighted center loss ``Σ_i w[y_i]·½‖f_i − c[y_i]‖² / Σ_i w[y_i]`` (docs/method.md §3.6).

    Args:
        features: (B, D) float16 / bfloat16 / float32 / float64 (half types accumulate in float32).
        labels: (B,) int64 in [0, C).
        centers: (C, D) float32 or float64 — receives no gradient.
        class_weights: (C,) float, finite and >= 0 — receives no gradient.
        check_finite: raise ValueError on non-finite features / centers / weights. ``None``
            (default): on the CPU yes, on CUDA no — a non-finite input then gives a non-finite loss,
            which the training loop's NonFiniteGuard catches at its existing sync; ``True`` on
            CUDA costs one host sync per call.

    Returns:
        A 0-dim tensor of ``features.dtype``; 0 when no sample carries weight (then its gradient is
        0 too). ``∂L/∂f_i = w[y_i]·(f_i − c[y_i]) / Σ_j w[y_j]``.
    """
    return _forward(features, labels, centers, class_weights, False, check_finite)[0]


def debiased_center_loss_with_stats(
    features: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    class_weights: torch.Tensor,
    *,
    check_finite: bool | None = None,
) -> tuple[torch.Tensor, CenterStats]:
    """:func:`debiased_center_loss` plus the batch's :class:`CenterStats`, from the same pass.

    Feed the stats to :func:`center_apply_` after the optimiser step (all-reduce them first when
    training on several ranks) instead of reading the features again with :func:`center_update_`.
    """
    loss, _, delta_sums, counts = _forward(features, labels, centers, class_weights, True, check_finite)
    return loss, CenterStats(delta_sums, counts)


def center_stats(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor) -> CenterStats:
    """Per-class sums of ``f_i − c_j`` and counts of a batch: features (B, D), labels (B,),
    centers (C, D) -> :class:`CenterStats` ((C, D), (C,)). No gradient flows through them."""
    _check_points(features, labels, centers)
    delta_sums, counts = torch.ops.amgsn.center_stats(features.detach(), labels, _no_grad_view(centers))
    return CenterStats(delta_sums, counts)


def center_apply_(
    centers: torch.Tensor, delta_sums: torch.Tensor, counts: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """Move the centers in place from :class:`CenterStats`: ``c_j += α·delta_j / (1 + n_j)`` for
    every class with ``n_j > 0`` (docs/method.md §3.7). centers (C, D) float32/float64, delta_sums (C, D),
    counts (C,) int64 >= 0. Returns ``centers``."""
    check_tensor("centers", centers, ndim=2, dtypes=CENTER_DTYPES)
    check_tensor("delta_sums", delta_sums, ndim=2, floating=True)
    check_tensor("counts", counts, ndim=1, dtypes=(torch.int64,))
    if delta_sums.shape != centers.shape:
        raise ValueError(
            f"delta_sums must have the shape of centers {tuple(centers.shape)}, got {tuple(delta_sums.shape)}"
        )
    check_dim("counts", counts, 0, centers.shape[0], "the number of classes C of centers")
    check_same_device(centers=centers, delta_sums=delta_sums, counts=counts)
    alpha = _check_alpha(alpha)
    with torch.no_grad():  # centers may be a Parameter; the update is not part of any graph
        torch.ops.amgsn.center_apply(centers, delta_sums.detach(), counts, alpha)
    return centers


def center_update_(
    features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """Wen et al. center update, in place (docs/method.md §3.7):
    ``c_j ← c_j − α·Σ_{i: y_i = j}(c_j − f_i) / (1 + n_j)`` for each class present in the batch.

    features (B, D) any float dtype, labels (B,) int64 in [0, C), centers (C, D) float32/float64.
    One pass, no (C, D) temporary; deterministic. Returns ``centers``.
    """
    _check_points(features, labels, centers)
    alpha = _check_alpha(alpha)
    with torch.no_grad():
        torch.ops.amgsn.center_update(features.detach(), labels, centers, alpha)
    return centers
