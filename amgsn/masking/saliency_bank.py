"""The saliency bank (docs/method.md §4.4): ABMG's saliency kept per training image, refreshed a fraction at a time.

ABMG's price is the teacher's dense pass over every image of every step, yet an image's saliency
drifts slowly. The bank keeps one map per training image (dataset index, as the MRUS
:class:`~amgsn.masking.mrus.RatioBank`) on the pre-training patch grid, in the *original image's*
coordinates, fp16, with the bank step at which it was last written (-1: never). Per step only
``ceil(P * B)`` images of the batch go through the teacher — never-seen first, then the oldest maps
(ties: batch order); their scores are warped back through the view's crop box and flip into the bank
(:func:`amgsn.ops.saliency_bank_write_`; inside the crop box a seen map moves half-way towards the new
view — ``blend`` — so it averages the views it was refreshed from). Every other image reads its view's
scores out of the bank (:func:`amgsn.ops.saliency_bank_read`, bilinear). A never-seen image that is not
refreshed reads a constant map: the ABMG noise alone then chooses its mask (random masking) until its
turn comes.

A *view* is a (5,) row ``(top, left, height, width, flipped)``: the crop box in fractions of the
original image and the horizontal flip (what :class:`amgsn.data.transforms.ViewRecordingTransform`
returns next to each image).

Identical on every rank under torchrun: the refresh plan depends only on the host-side refresh steps,
and every rank writes the gathered refreshes of all ranks in rank order (the engine's job).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from amgsn.masking.mrus import _as_index
from amgsn.ops import reference as ref_ops
from amgsn.ops import saliency_bank_read, saliency_bank_write_

NEVER = -1  # last-refresh step of an image never written
DEFAULT_BLEND = 0.5  # SaliencyBank.blend


class SaliencyRefresh(NamedTuple):
    """What one step refreshed: ``indices`` (k,) int64 CPU dataset indices, the teacher's ``scores``
    (k, N) float32 on the views' patch grid, and the ``views`` (k, 5) they were computed on."""

    indices: torch.Tensor
    scores: torch.Tensor
    views: torch.Tensor


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor to ``device`` without a host sync: through pinned memory, non-blocking, on CUDA (a
    pageable copy may wait for the stream). The refresh plan and the indices live on the host."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def split_views(views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 5) views -> boxes (B, 4) float32 (top, left, height, width) and flips (B,) bool."""
    if not isinstance(views, torch.Tensor) or views.dim() != 2 or views.shape[1] != 5:
        raise ValueError(f"views must be a (B, 5) tensor (top, left, height, width, flipped), got "
                         f"{tuple(views.shape) if isinstance(views, torch.Tensor) else type(views).__name__}")
    return views[:, :4].float(), views[:, 4] > 0.5


IDENTITY_VIEW = (0.0, 0.0, 1.0, 1.0, 0.0)  # the whole image, not flipped


class SaliencyBank:
    """Per-image saliency maps indexed by dataset index.

    Args:
        num_images: size of the training set (M).
        grid: the pre-training patch grid ``(Gh, Gw)`` (or one int for a square grid).
        refresh: P in (0, 1] — the fraction of each batch that goes through the teacher.
        device: where the maps live (the training device: reads and writes run there).
        impl: ``fused`` (the compiled / Triton ops) | ``reference`` (the pure-PyTorch twins).
        blend: how far a refresh moves a seen map inside the view's crop box (1: overwrite). Below 1
            the map averages the views it was refreshed from, which agrees better with a fresh teacher
            on an unseen view than the last view alone (the teacher's saliency is partly view-specific;
            RESULTS.md, issue 19).
    """

    def __init__(self, num_images: int, grid: int | Sequence[int], refresh: float, device: str | torch.device = "cpu",
                 impl: str = "fused", blend: float = DEFAULT_BLEND) -> None:
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive int, got {num_images!r}")
        gh, gw = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if gh < 1 or gw < 1:
            raise ValueError(f"grid must be positive, got {grid!r}")
        if isinstance(refresh, bool) or not isinstance(refresh, (int, float)) or not 0.0 < refresh <= 1.0:
            raise ValueError(f"refresh must lie in (0, 1], got {refresh!r}")
        if impl not in ("fused", "reference"):
            raise ValueError(f"impl must be 'fused' or 'reference', got {impl!r}")
        if isinstance(blend, bool) or not isinstance(blend, (int, float)) or not 0.0 < blend <= 1.0:
            raise ValueError(f"blend must lie in (0, 1], got {blend!r}")
        self.blend = float(blend)
        self.num_images, self.grid, self.refresh, self.impl = num_images, (int(gh), int(gw)), float(refresh), impl
        self.maps = torch.zeros(num_images, gh, gw, dtype=torch.float16, device=device)
        self.last_refresh = torch.full((num_images,), NEVER, dtype=torch.int64)
        self.clock = 0  # writes so far: the "step" of last_refresh

    @property
    def device(self) -> torch.device:
        return self.maps.device

    def num_refresh(self, batch: int) -> int:
        """``ceil(P * batch)`` (at least 1, at most ``batch``)."""
        return min(batch, max(1, math.ceil(self.refresh * batch - 1e-9)))

    def plan(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """(k,) int64 CPU positions in the batch (ascending) of the images to refresh: the
        ``num_refresh(B)`` with the smallest last-refresh step (never-seen first), ties in batch order."""
        idx = _as_index(indices, self.num_images)
        k = self.num_refresh(idx.numel())
        order = torch.sort(self.last_refresh[idx], stable=True).indices[:k]
        return order.sort().values

    def coverage(self) -> float:
        """Fraction of the images written at least once."""
        return float((self.last_refresh != NEVER).double().mean())

    def seen(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """(B,) bool CPU: which of these images have a map."""
        return self.last_refresh[_as_index(indices, self.num_images)] != NEVER

    def read(self, indices: torch.Tensor | Sequence[int], views: torch.Tensor) -> torch.Tensor:
        """(B, N) float32 on the bank's device: the views' scores resampled out of the bank."""
        idx = to_device(_as_index(indices, self.num_images), self.device)
        boxes, flips = split_views(views.to(self.device))
        op = saliency_bank_read if self.impl == "fused" else ref_ops.saliency_bank_read
        return op(self.maps, idx, boxes, flips)

    def write(self, indices: torch.Tensor | Sequence[int], scores: torch.Tensor, views: torch.Tensor) -> None:
        """Warp these views' teacher scores (B, N) back into the bank. A repeated index keeps its last
        view. Advances the bank's clock by one."""
        idx = _as_index(indices, self.num_images)
        if idx.numel():
            dev = self.device
            # Keep the last occurrence of each index (batch order), as the bank's contract says.
            keep = (idx.numel() - 1 - _first_occurrence(idx.flip(0))).sort().values
            if keep.numel() < idx.numel():  # repeated indices (sampling with replacement): drop the earlier
                scores = scores.index_select(0, to_device(keep, scores.device))
                views = views.index_select(0, to_device(keep, views.device))
                idx = idx[keep]
            fresh = self.last_refresh[idx] == NEVER
            boxes, flips = split_views(views.to(dev))
            op = saliency_bank_write_ if self.impl == "fused" else ref_ops.saliency_bank_write_
            op(self.maps, to_device(idx, dev), scores.to(dev), boxes, flips, to_device(fresh, dev), self.blend)
            self.last_refresh[idx] = self.clock
        self.clock += 1

    def preview(self, indices: torch.Tensor | Sequence[int], scores: torch.Tensor, src_views: torch.Tensor,
                views: torch.Tensor) -> torch.Tensor:
        """(k, N) float32: what these (distinct) images' maps would read through ``views`` after
        ``write(indices, scores, src_views)`` — the bank itself is left as it is (the caller writes,
        after gathering over ranks)."""
        idx = _as_index(indices, self.num_images)
        dev = self.device
        maps = self.maps.index_select(0, to_device(idx, dev))  # a copy: (k, Gh, Gw)
        rows = torch.arange(idx.numel(), device=dev)
        fresh = to_device(self.last_refresh[idx] == NEVER, dev)
        boxes, flips = split_views(src_views.to(dev))
        write = saliency_bank_write_ if self.impl == "fused" else ref_ops.saliency_bank_write_
        read = saliency_bank_read if self.impl == "fused" else ref_ops.saliency_bank_read
        write(maps, rows, scores.to(dev), boxes, flips, fresh, self.blend)
        boxes, flips = split_views(views.to(dev))
        return read(maps, rows, boxes, flips)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain types only (checkpoints load with ``weights_only=True``)."""
        return {"maps": self.maps.detach().cpu().clone(), "last_refresh": self.last_refresh.clone(),
                "clock": self.clock,
                "config": {"num_images": self.num_images, "grid": list(self.grid), "refresh": self.refresh,
                           "blend": self.blend}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; ValueError if it is for another training set or patch grid."""
        maps = torch.as_tensor(state["maps"])
        if maps.dim() != 3 or maps.shape[0] != self.num_images:
            raise ValueError(f"saliency bank state holds {maps.shape[0] if maps.dim() else 0} images, this bank "
                             f"{self.num_images}: the checkpoint was made with a different training set")
        if tuple(maps.shape[1:]) != self.grid:
            raise ValueError(f"saliency bank state is on a {tuple(maps.shape[1:])} patch grid, this bank on "
                             f"{self.grid}: the checkpoint was made with another image / patch size")
        self.maps = maps.to(device=self.device, dtype=torch.float16).contiguous().clone()
        self.last_refresh = torch.as_tensor(state["last_refresh"], dtype=torch.int64).clone()
        self.clock = int(state["clock"])


def _first_occurrence(idx: torch.Tensor) -> torch.Tensor:
    """Position in ``idx`` of each distinct value's first occurrence (one per distinct value)."""
    uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    pos = torch.arange(idx.numel())
    return torch.full((uniq.numel(),), idx.numel(), dtype=torch.int64).scatter_reduce_(0, inverse, pos, "amin")


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Row-wise ranks (0-based, float64) with ties given their average rank, as scipy's rankdata."""
    B, N = x.shape
    order = torch.argsort(x, dim=1, stable=True)
    sorted_x = torch.gather(x, 1, order)
    ranks = torch.empty(B, N, dtype=torch.float64)
    for b in range(B):
        _, inverse, counts = torch.unique_consecutive(sorted_x[b], return_inverse=True, return_counts=True)
        ends = torch.cumsum(counts, 0).double()
        avg = (ends - 1 + ends - counts.double()) / 2  # mean of the positions start..end-1 of each tie group
        ranks[b, order[b]] = avg[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman rank correlation of two (B, N) tensors -> (B,) float64 (0 for a constant row)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must be (B, N) of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra = _average_ranks(a.detach().double().cpu())
    rb = _average_ranks(b.detach().double().cpu())
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))
