"""``SupConLoss`` (DESIGN §3.8): module form of :func:`amgsn.ops.supcon.supcon_loss`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from amgsn.ops.supcon import supcon_loss

__all__ = ["SupConLoss"]


class SupConLoss(nn.Module):
    """Supervised contrastive loss over V views (Khosla et al. 2020).

    ``forward(features (B, V, D) L2-normalised, labels (B,))`` -> 0-dim loss. Positives: same label,
    other views and other samples; self-pairs excluded; anchors without a positive excluded.
    Optional ``class_weights`` (C,) weight each anchor by its class (kept as a buffer).
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
        return supcon_loss(features, labels, self.temperature, self.base_temperature, self.class_weights)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, base_temperature={self.base_temperature}"
