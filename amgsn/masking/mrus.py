"""MRUS — the Mask Ratio Update Strategy (docs/method.md §4.2): one mask ratio per training image.

After each step, image i's ratio moves by ``eta * (lbar - l_i) / lbar`` and is clipped to
``[r_min, r_max]``: an image reconstructed better than the running mean loss ``lbar`` (easy) gets
masked more, a harder one keeps more context. ``lbar`` is an exponential moving average of the
batch mean loss, initialised from the first batch. Everything lives on the CPU in float64 and is
updated in a fixed order, so a run and its resume agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _as_index(indices: torch.Tensor | Sequence[int], num_images: int) -> torch.Tensor:
    idx = torch.as_tensor(indices).detach().to("cpu").reshape(-1)
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
    idx = idx.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_images):
        raise ValueError(f"indices must lie in [0, {num_images}) (dataset indices), got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    return idx


class RatioBank:
    """Per-image mask ratios indexed by dataset index.

    Args:
        num_images: size of the training set.
        r0: initial ratio of every image.
        eta: step size of the update.
        r_min, r_max: clipping range (``0 <= r_min <= r0 <= r_max <= 1``).
        momentum: EMA momentum of the running mean loss ``lbar``.
    """

    def __init__(
        self,
        num_images: int,
        r0: float = 0.75,
        eta: float = 0.05,
        r_min: float = 0.5,
        r_max: float = 0.9,
        momentum: float = 0.99,
    ) -> None:
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive int, got {num_images!r}")
        if not 0.0 <= r_min <= r0 <= r_max <= 1.0:
            raise ValueError(
                f"need 0 <= r_min <= r0 <= r_max <= 1, got r_min={r_min}, r0={r0}, r_max={r_max}"
            )
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.num_images = num_images
        self.r0, self.eta, self.r_min, self.r_max, self.momentum = r0, eta, r_min, r_max, momentum
        self._ratios = torch.full((num_images,), float(r0), dtype=torch.float64)
        self.loss_mean: float | None = None
        self.num_updates = 0

    def ratios(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """(B,) float32 CPU tensor of the current ratios of these dataset indices."""
        return self._ratios[_as_index(indices, self.num_images)].float()

    @property
    def all_ratios(self) -> torch.Tensor:
        """(num_images,) float64 copy of every ratio."""
        return self._ratios.clone()

    def update(self, indices: torch.Tensor | Sequence[int], losses: torch.Tensor) -> None:
        """Apply one MRUS step with these images' per-image losses (B,) (any device/dtype).

        ``lbar`` first absorbs the batch mean (or is set by the first batch), then
        ``r_i <- clip(r_i + eta * (lbar - l_i) / lbar, r_min, r_max)``. An index that occurs
        several times in the batch (sampling with replacement) is updated once, with the mean of
        its losses. Non-finite losses raise ValueError (the caller skips such steps).
        """
        idx = _as_index(indices, self.num_images)
        loss = torch.as_tensor(losses).detach().to("cpu", torch.float64).reshape(-1)
        if loss.numel() != idx.numel():
            raise ValueError(f"losses must have one entry per index ({idx.numel()}), got {loss.numel()}")
        if loss.numel() == 0:
            return
        if not bool(torch.isfinite(loss).all()):
            raise ValueError("losses must be finite to update the ratio bank")
        batch_mean = float(loss.mean())
        if self.loss_mean is None:
            self.loss_mean = batch_mean
        else:
            self.loss_mean = self.momentum * self.loss_mean + (1.0 - self.momentum) * batch_mean
        self.num_updates += 1
        if self.loss_mean <= 0.0:
            return  # every loss so far is 0: nothing to compare against
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, loss)
        counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(loss))
        per_image = sums / counts
        step = self.eta * (self.loss_mean - per_image) / self.loss_mean
        self._ratios[uniq] = (self._ratios[uniq] + step).clamp(self.r_min, self.r_max)

    # ------------------------------------------------------------------ logging

    def histogram(self, bins: int = 10) -> tuple[list[int], list[float]]:
        """(counts, edges) of all ratios over ``bins`` equal bins spanning [r_min, r_max]."""
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be a positive int, got {bins!r}")
        lo, hi = self.r_min, self.r_max
        if hi <= lo:  # degenerate range: one value, everything in the first bin
            return [self.num_images] + [0] * (bins - 1), [lo] * (bins + 1)
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        # bucketize against the inner edges; the top edge belongs to the last bin.
        which = torch.bucketize(self._ratios, edges[1:-1], right=True)
        counts = torch.bincount(which, minlength=bins)
        return counts.tolist(), edges.tolist()

    def summary(self) -> dict[str, float | None]:
        """Mean / min / max / std of every ratio and the running mean loss, for the logs."""
        r = self._ratios
        return {"mean": float(r.mean()), "min": float(r.min()), "max": float(r.max()),
                "std": float(r.std(unbiased=False)), "loss_mean": self.loss_mean}

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"ratios": self._ratios.clone(), "loss_mean": self.loss_mean, "num_updates": self.num_updates,
                "config": {"num_images": self.num_images, "r0": self.r0, "eta": self.eta,
                           "r_min": self.r_min, "r_max": self.r_max, "momentum": self.momentum}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; ValueError if it is for a different number of images."""
        ratios = torch.as_tensor(state["ratios"], dtype=torch.float64).reshape(-1)
        if ratios.numel() != self.num_images:
            raise ValueError(f"ratio bank state holds {ratios.numel()} images, this bank {self.num_images}: "
                             "the checkpoint was made with a different training set")
        cfg = state.get("config", {})
        for key in ("r0", "eta", "r_min", "r_max", "momentum"):
            if key in cfg:
                setattr(self, key, float(cfg[key]))
        self._ratios = ratios.clone()
        self.loss_mean = None if state.get("loss_mean") is None else float(state["loss_mean"])
        self.num_updates = int(state.get("num_updates", 0))
