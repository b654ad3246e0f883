"""Pure-PyTorch references for every public op, written the way the anchor code bases write them.

They are the ground truth of the tests and the baseline of the benchmarks:

* scores — DINO/AttMask: materialise the attention matrix, softmax, take the CLS row;
* selection + gather — MAE: ``argsort`` then gather (packed, since ratios are per image);
* center loss — the common distance-matrix code, and a separate center-update pass.

Nothing here is fast on purpose; nothing here validates input (the public ops do).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# --------------------------------------------------------------------------------------------
# Masking (docs/method.md §3.1–3.5)
# --------------------------------------------------------------------------------------------


class MaskSelection(NamedTuple):
    """Which patches each image keeps, packed over the batch (docs/method.md §3.2).

    ids_keep:   (T,) int64 — kept patch indices, ascending within each image, images concatenated.
    cu_seqlens: (B+1,) int32 — prefix sums of the per-image kept counts, starting at 0.
    max_seqlen: int — the largest per-image kept count.
    mask:       (B, N) bool — True where the patch is masked (removed), as MAE's 1.

    The order is the gathers' argument order: ``gather_visible(x, *sel)`` and
    ``scatter_visible(y, *sel, mask_token=token)`` take the whole selection, and the mask tells them
    B and N (so an ``x`` that still holds its CLS token is refused, not read shifted by one).
    """

    ids_keep: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    mask: torch.Tensor


def num_keep_from_ratio(mask_ratio: float | torch.Tensor, batch: int, num_patches: int) -> torch.Tensor:
    """``clamp(floor((1 - r) * N + 1e-4), 1, N)`` per image, in float64 -> (B,) int64."""
    r = torch.as_tensor(mask_ratio, dtype=torch.float64).reshape(-1).expand(batch)
    return torch.clamp(torch.floor((1.0 - r) * num_patches + 1e-4), 1, num_patches).to(torch.int64)


def _widen(t: torch.Tensor) -> torch.Tensor:
    """At least float32: float64 stays float64 (every op computes in at least its input's precision)."""
    return t if t.dtype == torch.float64 else t.float()


def _score_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def cls_attention_scores_full(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """DINO/AttMask: the block's full attention matrix, then its CLS row without the CLS column.

    q, k: (B, H, 1+N, d), CLS first -> (B, N) float32, float64 for float64 inputs
    (``attn[:, :, 0, 1:].mean(1)``).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    attn = (q @ k.transpose(-2, -1)) * scale  # (B, H, 1+N, 1+N)
    attn = attn.to(_score_dtype(q, k)).softmax(dim=-1)
    return attn[:, :, 0, 1:].mean(dim=1)


def cls_attention_scores(q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Reference of docs/method.md §3.1 from the CLS query alone: q_cls (B, H, d), k (B, H, 1+N, d) -> (B, N),
    computed and returned in float32 (float64 when either input is float64)."""
    dtype = _score_dtype(q_cls, k)
    scale = 1.0 / math.sqrt(q_cls.shape[-1])
    logits = torch.einsum("bhd,bhnd->bhn", q_cls.to(dtype), k.to(dtype)) * scale
    return logits.softmax(dim=-1)[:, :, 1:].mean(dim=1)


def selection_values(
    scores: torch.Tensor, noise: torch.Tensor | None = None, relative_noise: bool = False
) -> torch.Tensor:
    """The values ranked by the selection, in float64 -> (B, N).

    ``v = float64(s) + float64(z) * scale`` where ``s`` and ``z`` are the scores and the noise each in
    at least float32 (float64 stays float64: no float32 round trip), ``scale = 1``, or with
    ``relative_noise`` the image's score range ``max - min`` taken in the precision of ``s`` (1 where the
    range is 0). Adding noise scaled by the range ranks exactly like adding it to min-max-normalised
    scores (ABMG, docs/method.md §4.1). For float32 operands the product is exact in float64, so a fused
    multiply-add and a separate multiply + add give the same bits; with a float64 operand every
    implementation multiplies, then adds (no contraction). Either way they all rank identical values.

    NaN (docs/method.md, "Masking ops: edge cases"): a NaN value becomes -inf, so it ranks below every
    number and ties with -inf (index order decides), and the range is taken over the non-NaN scores.
    """
    s = _widen(scores)
    values = s.double()
    if noise is not None:
        scale = torch.ones_like(values[:, :1])
        if relative_noise:
            nan = s.isnan()
            hi = s.masked_fill(nan, float("-inf")).amax(dim=1, keepdim=True)
            lo = s.masked_fill(nan, float("inf")).amin(dim=1, keepdim=True)
            span = (hi - lo).double()
            scale = torch.where(span > 0, span, scale)
        values = values + _widen(noise).double() * scale
    return values.masked_fill(values.isnan(), float("-inf"))


def abmg_select(
    scores: torch.Tensor,
    mask_ratio: float | torch.Tensor,
    noise: torch.Tensor | None = None,
    relative_noise: bool = False,
) -> MaskSelection:
    """MAE-style ``argsort`` selection (docs/method.md §3.2): mask the most salient ``N - num_keep`` patches.

    Order = (value descending, index ascending), value from :func:`selection_values`.
    """
    B, N = scores.shape
    values = selection_values(scores, noise, relative_noise)
    num_keep = num_keep_from_ratio(mask_ratio, B, N).to(scores.device)
    # A stable descending sort keeps equal values in index order: the tie rule.
    order = torch.argsort(values, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(N, device=scores.device).expand(B, N))
    mask = rank < (N - num_keep)[:, None]
    ids_keep = (~mask).nonzero()[:, 1]  # row-major: ascending within an image, images in order
    cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=scores.device)
    cu_seqlens[1:] = torch.cumsum(num_keep, 0)
    return MaskSelection(ids_keep, cu_seqlens, int(num_keep.max()), mask)


def _batch_index(cu_seqlens: torch.Tensor) -> torch.Tensor:
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=cu_seqlens.device), counts)


def gather_visible(x: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``out[t] = x[b(t), ids_keep[t]]``: x (B, N, D) -> (T, D)."""
    return x[_batch_index(cu_seqlens), ids_keep]


def scatter_visible(
    y: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor, mask_token: torch.Tensor, N: int
) -> torch.Tensor:
    """Inverse of ``gather_visible`` with ``mask_token`` (D,) elsewhere: y (T, D) -> (B, N, D)."""
    B = cu_seqlens.numel() - 1
    out = mask_token.to(y.dtype).expand(B, N, y.shape[-1]).clone()
    out[_batch_index(cu_seqlens), ids_keep] = y
    return out


def abmg_mask_and_gather(
    q_cls: torch.Tensor,
    k: torch.Tensor,
    x: torch.Tensor,
    mask_ratio: float | torch.Tensor,
    noise: torch.Tensor | None = None,
    relative_noise: bool = False,
) -> tuple[torch.Tensor, MaskSelection]:
    """§3.1 + §3.2 + §3.3 composed from the references above."""
    scores = cls_attention_scores(q_cls, k)
    sel = abmg_select(scores, mask_ratio, noise, relative_noise)
    return gather_visible(x, sel.ids_keep, sel.cu_seqlens), sel


def abmg_mask_and_gather_full(
    q: torch.Tensor,
    k: torch.Tensor,
    x: torch.Tensor,
    mask_ratio: float | torch.Tensor,
    noise: torch.Tensor | None = None,
    relative_noise: bool = False,
) -> tuple[torch.Tensor, MaskSelection]:
    """The anchors' whole path, as benchmarked: full attention matrix (all 1+N queries), argsort,
    gather. q, k (B, H, 1+N, d)."""
    scores = cls_attention_scores_full(q, k)
    sel = abmg_select(scores, mask_ratio, noise, relative_noise)
    return gather_visible(x, sel.ids_keep, sel.cu_seqlens), sel


def attention_masking(
    x: torch.Tensor,
    q_cls: torch.Tensor,
    k: torch.Tensor,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    relative_noise: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AttMask-High with MAE's contract (docs/method.md §3.9), written with MAE's argsorts and gathers:
    remove the ``L - int(L * (1 - mask_ratio))`` most attended patches; ``ids_shuffle`` = the kept
    patches, then the removed ones, each in index order -> ``(x_masked, mask, ids_restore)``."""
    B, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    values = selection_values(cls_attention_scores(q_cls, k), noise, relative_noise)
    order = torch.argsort(values, dim=1, descending=True, stable=True)  # most attended first
    removed = torch.zeros(B, L, dtype=torch.uint8, device=x.device).scatter_(1, order[:, : L - len_keep], 1)
    ids_shuffle = torch.argsort(removed, dim=1, stable=True)  # kept (0) first, each group in index order
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_masked = torch.gather(x, dim=1, index=ids_shuffle[:, :len_keep, None].expand(-1, -1, D))
    mask = torch.ones(B, L, device=x.device)
    mask[:, :len_keep] = 0
    return x_masked, torch.gather(mask, dim=1, index=ids_restore), ids_restore


# --------------------------------------------------------------------------------------------
# Losses (docs/method.md §3.6–3.8) — see below.
# --------------------------------------------------------------------------------------------


def debiased_center_loss(
    features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, class_weights: torch.Tensor
) -> torch.Tensor:
    """The common distance-matrix center loss, with class weights (docs/method.md §3.6).

    ``‖f‖² + ‖c‖² − 2 f cᵀ`` for every (sample, class) pair (B, C), masked to each sample's own
    class, clamped at 0 (the expansion can dip below), summed per sample, weighted by
    ``class_weights[labels]``: ``Σ_i w[y_i]·½ d_i / Σ_i w[y_i]`` (0 when the weights sum to 0).
    Computed in float32 (float64 when features or centers are); centers get no gradient.
    """
    dtype = torch.float64 if torch.float64 in (features.dtype, centers.dtype) else torch.float32
    f = features.to(dtype)
    c = centers.detach().to(dtype)
    B, C = f.shape[0], c.shape[0]
    distmat = f.pow(2).sum(dim=1, keepdim=True).expand(B, C) + c.pow(2).sum(dim=1, keepdim=True).expand(C, B).t()
    distmat = distmat.addmm(f, c.t(), beta=1, alpha=-2)
    classes = torch.arange(C, device=f.device)
    mask = labels.unsqueeze(1).expand(B, C).eq(classes.expand(B, C))
    dist = (distmat.clamp(min=0) * mask.to(dtype)).sum(dim=1)
    w = class_weights.detach().to(dtype)[labels]
    return 0.5 * (w * dist).sum() / w.sum().clamp_min(torch.finfo(dtype).tiny)


def center_update_(
    features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Wen et al. update as a separate pass (docs/method.md §3.7), vectorised with ``index_add_``:
    ``c_j ← c_j − α·Σ_{i: y_i = j}(c_j − f_i) / (1 + n_j)``, in place; returns ``centers``."""
    with torch.no_grad():
        f = features.detach().to(centers.dtype)
        diff = centers[labels] - f
        delta = torch.zeros_like(centers).index_add_(0, labels, diff)
        counts = torch.bincount(labels, minlength=centers.shape[0]).to(centers.dtype)
        centers.sub_(alpha * delta / (1.0 + counts).unsqueeze(1))
    return centers


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Khosla et al. ``SupConLoss`` (contrast_mode "all"), as in their reference code (docs/method.md §3.8).

    features (B, V, D) L2-normalised, labels (B,). Differences from the original, as the spec asks:
    anchors without a positive are excluded from the mean (the original counts them as 0), and
    optional ``class_weights`` (C,) weight each anchor by its class: ``Σ_a w_a ℓ_a / Σ_a w_a``.
    Computed in float32 (float64 for float64 features).
    """
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    B, V = features.shape[0], features.shape[1]
    device = features.device
    labels = labels.contiguous().view(-1, 1)
    mask = torch.eq(labels, labels.T).to(dtype)
    contrast_feature = torch.cat(torch.unbind(features.to(dtype), dim=1), dim=0)
    anchor_dot_contrast = torch.div(torch.matmul(contrast_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(V, V)
    logits_mask = torch.scatter(
        torch.ones_like(mask), 1, torch.arange(B * V, device=device).view(-1, 1), 0
    )
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    pos_count = mask.sum(1)
    mean_log_prob_pos = (mask * log_prob).sum(1) / pos_count.clamp(min=1)
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    weights = (pos_count > 0).to(dtype)
    if class_weights is not None:
        weights = weights * class_weights.to(dtype)[labels.view(-1)].repeat(V)
    return (loss * weights).sum() / weights.sum().clamp_min(torch.finfo(dtype).tiny)


# --------------------------------------------------------------------------------------------
# Saliency bank (docs/method.md §4.4) — bilinear resampling through a view's crop box and flip
# --------------------------------------------------------------------------------------------


def _view_grid(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, Gh, Gw, 2) grid_sample grid (align_corners=False) from coordinates in [0, 1]: x (B, Gw), y (B, Gh)."""
    return torch.stack(torch.broadcast_tensors(2 * x[:, None, :] - 1, 2 * y[:, :, None] - 1), dim=-1)


def saliency_bank_read(
    bank: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor
) -> torch.Tensor:
    """bank (M, Gh, Gw), indices (B,), boxes (B, 4) = (top, left, height, width) as fractions of the
    original image, flips (B,) bool -> (B, Gh*Gw) float32: each view patch's centre mapped into the
    original image, the bank sampled there bilinearly (``grid_sample``, border padding)."""
    M, Gh, Gw = bank.shape
    maps = bank[indices].float().unsqueeze(1)
    dev = bank.device
    xc = ((torch.arange(Gw, device=dev, dtype=torch.float32) + 0.5) / Gw).expand(len(indices), Gw)
    yc = ((torch.arange(Gh, device=dev, dtype=torch.float32) + 0.5) / Gh).expand(len(indices), Gh)
    xc = torch.where(flips[:, None], 1 - xc, xc)
    b = boxes.float()
    u = b[:, 1:2] + b[:, 3:4] * xc
    v = b[:, 0:1] + b[:, 2:3] * yc
    grid = _view_grid(u, v)
    out = torch.nn.functional.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(len(indices), Gh * Gw)


def saliency_bank_write_(
    bank: torch.Tensor,
    indices: torch.Tensor,
    scores: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    fresh: torch.Tensor,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Warp each view's scores (B, Gh*Gw) back into its image's bank map (in place; distinct indices).

    Scores are min-max normalised per view (a constant view -> 0). Bank cell (i, j) has its centre
    ((j+0.5)/Gw, (i+0.5)/Gh) in the original image; ``s`` = the view's normalised scores sampled there
    bilinearly (border padding), flipped back. A ``fresh`` (never seen) image's cells all take ``s``;
    a seen image's cells inside the crop box (edges included) become ``m + alpha * (s - m)``, the others
    keep their value. Returns ``bank``."""
    M, Gh, Gw = bank.shape
    B = len(indices)
    s = scores.float().reshape(B, Gh * Gw)
    lo, hi = s.amin(1, keepdim=True), s.amax(1, keepdim=True)
    span = hi - lo
    s = torch.where(span > 0, (s - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(s))
    dev = bank.device
    u = ((torch.arange(Gw, device=dev, dtype=torch.float32) + 0.5) / Gw).expand(B, Gw)
    v = ((torch.arange(Gh, device=dev, dtype=torch.float32) + 0.5) / Gh).expand(B, Gh)
    b = boxes.float()
    x = (u - b[:, 1:2]) / b[:, 3:4]
    y = (v - b[:, 0:1]) / b[:, 2:3]
    inside = ((x >= 0) & (x <= 1))[:, None, :] & ((y >= 0) & (y <= 1))[:, :, None]
    x = torch.where(flips[:, None], 1 - x, x)
    grid = _view_grid(x, y)
    sampled = torch.nn.functional.grid_sample(s.reshape(B, 1, Gh, Gw), grid, mode="bilinear",
                                              padding_mode="border", align_corners=False)[:, 0]
    old = bank[indices].float()
    fresh = fresh.reshape(B, 1, 1)
    new = torch.where(fresh, sampled, old + alpha * (sampled - old))
    bank[indices] = torch.where(inside | fresh, new.to(bank.dtype), bank[indices])
    return bank
