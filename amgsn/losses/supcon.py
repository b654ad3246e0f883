"""``SupConLoss`` (docs/method.md §3.8): module form of :func:`amgsn.ops.supcon.supcon_loss`, over the
global batch when training on several ranks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from amgsn.ops._checks import check_dim, check_tensor
from amgsn.ops.supcon import supcon_loss

__all__ = ["SupConLoss"]


class SupConLoss(nn.Module):
    """Supervised contrastive loss over V views (Khosla et al. 2020).

    ``forward(features (B, V, D) L2-normalised, labels (B,))`` -> 0-dim loss. Positives: same label,
    other views and other samples; self-pairs excluded; anchors without a positive excluded.
    Optional ``class_weights`` (C,) weight each anchor by its class (kept as a buffer).

    Under ``torch.distributed`` (world size K > 1) ``forward`` is a collective (every rank calls it
    once per step, with the same B): the features and labels of all ranks are gathered, so each
    anchor contrasts against the K·B·V − 1 others of the global batch, not only its own rank's.
    Every rank then computes the loss of *all* global anchors — the same value on every rank, the
    value one process with the whole batch computes. Why all anchors and not only the rank's own:
    the gather's backward sums, over the ranks, the gradients that reach each rank's slice, and
    every rank differentiated the same global loss L, so rank r's features receive ``K·∂L/∂f_r``;
    DistributedDataParallel's average over the K ranks then gives exactly ``∂L/∂θ``. (Rank-local
    anchors would cost K× less in the B·V × K·B·V similarity, but need the global normaliser and
    an extra all-reduce for the reported value; at fine-tuning batch sizes the matrix is small
    next to the encoder.)
    """

    def __init__(
        self,
        temperature: float = 0.07,
        base_temperature: float = 0.07,
        class_weights: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("temperature", temperature), ("base_temperature", base_temperature)):
            if not (isinstance(value, (int, float)) and value > 0 and value < float("inf")):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        self.temperature, self.base_temperature = float(temperature), float(base_temperature)
        w = None
        if class_weights is not None:
            w = torch.as_tensor(class_weights, dtype=torch.float32).detach().clone()
            if w.dim() != 1 or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError(f"class_weights must be a 1-D tensor of finite values >= 0, got {w}")
        self.register_buffer("class_weights", w)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """features (B, V, D) float L2-normalised, labels (B,) int64 -> 0-dim loss (see the class
        docstring for the distributed case)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Checked before the collectives: a bad argument fails here, not as a gather mismatch.
            check_tensor("features", features, ndim=3, floating=True)
            check_tensor("labels", labels, ndim=1, dtypes=(torch.int64,))
            check_dim("labels", labels, 0, features.shape[0], "the batch size of features")
            features, labels = _gather_batch(features, labels)
        return supcon_loss(features, labels, self.temperature, self.base_temperature, self.class_weights)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, base_temperature={self.base_temperature}"


class _AllGatherCat(torch.autograd.Function):
    """Concatenate equal-shaped tensors of all ranks along dim 0, with the gradient of the gather:
    every rank back-propagates its own loss through the whole (K·B, ...) result, so the gradient of
    a rank's slice is the sum over ranks of the gradients each rank computed for that slice.

    Not ``torch.distributed.nn.functional.all_gather``: on gloo its backward scatters into buffers
    laid out like the incoming gradient, and gloo's scatter writes non-contiguous tensors wrongly
    (pytorch/pytorch#192920) — SupCon's gradient arrives transposed, so the features' gradient came
    back permuted. Here the backward all-reduces one dense copy (any backend) and slices it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        ctx.rank = dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # A fresh dense copy: collectives need contiguous memory, and the incoming gradient must not
        # be modified in place (autograd may share it).
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def _gather_batch(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch in rank order: features (K·B, V, D) with autograd through the gather,
    labels (K·B,). Every rank must pass the same B."""
    label_parts = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(label_parts, labels.contiguous())
    return _AllGatherCat.apply(features), torch.cat(label_parts)
