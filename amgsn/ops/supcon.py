"""Supervised contrastive loss (Khosla et al. 2020, docs/method.md §3.8) in plain PyTorch ops.

One (BV × BV) similarity matmul and a handful of elementwise / row reductions, no Python loops:
small next to the encoder, and every op is fusable by ``torch.compile``.
"""

from __future__ import annotations

import math

import torch

from amgsn.ops._checks import check_dim, check_same_device, check_tensor

__all__ = ["supcon_loss"]


def _check_temperature(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Supervised contrastive loss over ``V`` views (docs/method.md §3.8).

    Every one of the ``B·V`` embeddings is an anchor; its positives are all other embeddings with
    the same label (the other views of the same sample included), its denominator runs over all
    other embeddings (self-pairs excluded):

    ``ℓ_a = −(τ/τ_b) · mean_{p ∈ P(a)} log( exp(z_a·z_p/τ) / Σ_{k ≠ a} exp(z_a·z_k/τ) )``

    Anchors with no positive (a class seen once, with V = 1) are excluded. The loss is
    ``Σ_a w_a ℓ_a / Σ_a w_a`` with ``w_a = class_weights[y_a]`` (1 without class weights); it is 0
    (with a zero gradient) when no anchor has a positive.

    Args:
        features: (B, V, D) float, L2-normalised along D (not re-normalised here). Half types are
            computed in float32: logits are divided by a small temperature.
        labels: (B,) int64 (in [0, C) when ``class_weights`` is given).
        temperature, base_temperature: τ and τ_b, finite and > 0.
        class_weights: optional (C,) float per-class anchor weights.

    Returns:
        A 0-dim tensor (float32, or float64 for float64 features).
    """
    check_tensor("features", features, ndim=3, floating=True)
    check_tensor("labels", labels, ndim=1, dtypes=(torch.int64,))
    check_dim("labels", labels, 0, features.shape[0], "the batch size of features")
    temperature = _check_temperature("temperature", temperature)
    base_temperature = _check_temperature("base_temperature", base_temperature)
    if class_weights is not None:
        check_tensor("class_weights", class_weights, ndim=1, floating=True)
    check_same_device(features=features, labels=labels, class_weights=class_weights)

    B, V, D = features.shape
    n = B * V
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    if n < 2:  # no pair at all: nothing to contrast (avoids a row with an empty denominator)
        return features.to(dtype).sum() * 0.0
    # View-major order (row v·B + b), as Khosla's torch.cat(torch.unbind(features, 1)).
    z = features.to(dtype).transpose(0, 1).reshape(n, D)
    y = labels.repeat(V)
    logits = (z @ z.T) / temperature
    eye = torch.eye(n, dtype=torch.bool, device=features.device)
    # -inf on the diagonal removes self-pairs from the log-sum-exp (which is max-stabilised).
    log_prob = logits - torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~eye
    n_pos = pos.sum(dim=1)
    mean_log_prob_pos = log_prob.masked_fill(~pos, 0.0).sum(dim=1) / n_pos.clamp_min(1)
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    weights = (n_pos > 0).to(dtype)
    if class_weights is not None:
        weights = weights * class_weights.to(dtype)[y]
    return (weights * loss).sum() / weights.sum().clamp_min(torch.finfo(dtype).tiny)
