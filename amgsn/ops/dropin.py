"""Drop-in API for MAE / timm code (docs/method.md §3.9): the masking ops with MAE's conventions.

* :func:`random_masking` — MAE's ``random_masking`` (``models_mae.py``), bit for bit for the same noise.
* :func:`attention_masking` — the same contract, the most attended patches removed (ABMG / AttMask-High
  at one ratio), on the fused op of docs/method.md §3.5.
* :func:`to_padded` / :func:`from_padded` — packed (T, D) tokens <-> padded (B, L, D) + key mask, so
  per-image ratios run through any model that takes a padded batch (a timm ``Block`` with ``attn_mask``).

MAE's conventions: ``x`` (B, L, D) holds the patches only (MAE masks before it prepends the CLS token);
``len_keep = int(L * (1 - mask_ratio))`` (Python's float arithmetic, as MAE); ``x_masked`` (B, len_keep, D);
``mask`` (B, L) in the default float dtype, 1 = removed; ``ids_restore`` (B, L) int64 with
``x_full[b, n] = cat([x_masked, mask_tokens], 1)[b, ids_restore[b, n]]`` — what MAE's decoder gathers.
"""

from __future__ import annotations

import torch

from amgsn.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from amgsn.ops.masking import (
    _check_noise,
    _check_qk,
    _check_x_matches_k,
    _fused_op,
    fixed_plan,
    gather_visible,
    scatter_visible,
)

__all__ = ["random_masking", "attention_masking", "to_padded", "from_padded"]


def _len_keep(mask_ratio: object, L: int) -> int:
    if isinstance(mask_ratio, torch.Tensor):
        raise TypeError(
            "mask_ratio must be a float (MAE's one ratio for the batch); for per-image ratios use "
            "abmg_select / abmg_mask_and_gather (packed) with to_padded"
        )
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a float, got {type(mask_ratio).__name__}")
    if not 0.0 <= float(mask_ratio) <= 1.0:  # also rejects NaN
        raise ValueError(f"mask_ratio must lie in [0, 1], got {mask_ratio}")
    return int(L * (1 - mask_ratio))


def _mask_from_restore(ids_restore: torch.Tensor, keep: int) -> torch.Tensor:
    # MAE's torch.ones(...) then gather: 1 = removed, in the default float dtype.
    return (ids_restore >= keep).to(torch.get_default_dtype())


def _nothing_kept(x: torch.Tensor, ids_restore: torch.Tensor):
    return x[:, :0], _mask_from_restore(ids_restore, 0), ids_restore


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking, bit for bit: ``(x_masked, mask, ids_restore)``.

    Args:
        x: (B, L, D) patch tokens (no CLS token), any float dtype and strides.
        mask_ratio: a float in [0, 1]; ``len_keep = int(L * (1 - mask_ratio))`` as MAE.
        noise: optional (B, L) floating noise; default ``torch.rand(B, L)`` on x's device, as MAE.
    Returns:
        ``x_masked`` (B, len_keep, D) — the patches of the ``len_keep`` smallest noise values, in
        ascending noise order (ties: lower index first; MAE's unstable argsort leaves them open);
        ``mask`` (B, L) default float dtype, 1 = removed; ``ids_restore`` (B, L) int64, the inverse of that
        order. ``x_masked`` is differentiable in ``x`` (the gather is :func:`gather_visible`).
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    B, L, D = x.shape
    keep = _len_keep(mask_ratio, L)
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    _check_noise(noise, (B, L))
    check_same_device(x=x, noise=noise)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # ascending: small is keep, large is remove
    ids_restore = torch.empty_like(ids_shuffle).scatter_(
        1, ids_shuffle, torch.arange(L, device=x.device).expand(B, L)
    )
    if keep == 0:
        return _nothing_kept(x, ids_restore)
    _, cu_seqlens, _, _ = fixed_plan(keep, B, x.device)
    x_masked = gather_visible(x, ids_shuffle[:, :keep].reshape(-1), cu_seqlens).view(B, keep, D)
    return x_masked, _mask_from_restore(ids_restore, keep), ids_restore


def attention_masking(
    x: torch.Tensor,
    q_cls: torch.Tensor,
    k: torch.Tensor,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    *,
    relative_noise: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention-guided masking with MAE's contract: ``(x_masked, mask, ids_restore)``.

    Removes the ``L - len_keep`` patches with the highest CLS attention (plus ``noise``), the rule of
    :func:`abmg_select`, through the fused op (:func:`abmg_mask_and_gather`: scores, selection and gather
    without the attention matrix).

    Args:
        x: (B, L, D) patch tokens (no CLS token).
        q_cls: (B, H, d) the CLS query, k: (B, H, 1+L, d) the keys (CLS first) of a block — e.g. from
            :func:`amgsn.models.cls_query_keys` on a teacher's last block.
        mask_ratio: a float in [0, 1]; ``len_keep = int(L * (1 - mask_ratio))`` as MAE.
        noise, relative_noise: optional (B, L) noise added to the scores before ranking (as
            :func:`abmg_select`); without it the masking is deterministic.
    Returns:
        ``x_masked`` (B, len_keep, D) — the kept patches in index order; ``mask`` (B, L) default float
        dtype, 1 = removed; ``ids_restore`` (B, L) int64 — kept patches first (index order), then the
        removed ones (index order), inverted — so MAE's decoder restores the layout unchanged.
        ``x_masked`` is differentiable in ``x``.
    """
    B, _, L = _check_qk(q_cls, k)
    _check_x_matches_k(x, B, L)
    _check_noise(noise, (B, L))
    check_same_device(q_cls=q_cls, k=k, x=x, noise=noise)
    keep = _len_keep(mask_ratio, L)
    if keep == 0:
        return _nothing_kept(x, torch.arange(L, device=x.device).expand(B, L).clone())
    num_keep, cu_seqlens, total, _ = fixed_plan(keep, B, x.device)
    visible, _, removed, _ = _fused_op(q_cls, k, x, num_keep, cu_seqlens, total, noise, bool(relative_noise))
    kept_rank = torch.cumsum(~removed, dim=1) - 1
    removed_rank = torch.cumsum(removed, dim=1) + (keep - 1)
    ids_restore = torch.where(removed, removed_rank, kept_rank)
    return visible.view(B, keep, x.shape[2]), removed.to(torch.get_default_dtype()), ids_restore


def _positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(T,) int64: each packed row's position within its own sequence."""
    cu = cu_seqlens.long()
    seqlens = cu[1:] - cu[:-1]
    return torch.arange(total, device=cu.device) - torch.repeat_interleave(cu[:-1], seqlens, output_size=total)


def _check_packing(cu_seqlens: object, total: int | None, max_seqlen: object) -> None:
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have B + 1 >= 2 entries, got {cu_seqlens.numel()}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)
                                   or max_seqlen < 1):
        raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
    if cu_seqlens.device.type != "cpu" or torch.compiler.is_compiling():
        return  # checked by the kernels (no host sync)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if int(cu_seqlens[0]) != 0 or bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {cu_seqlens.tolist()}")
    if total is not None and int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens must end at T = {total} (the rows of visible), got {int(cu_seqlens[-1])}")
    if max_seqlen is not None and int(lengths.max()) > max_seqlen:
        raise ValueError(f"max_seqlen = {max_seqlen} is less than the longest sequence ({int(lengths.max())})")


def to_padded(
    visible: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed tokens -> a padded batch for any model: ``(padded (B, L, D), key_valid (B, L) bool)``.

    Args:
        visible: (T, D) packed tokens (image b's at rows ``cu_seqlens[b]:cu_seqlens[b+1]``).
        cu_seqlens: (B+1,) int32 prefix sums (a :class:`MaskSelection`'s).
        max_seqlen: L; default the longest sequence (read from ``cu_seqlens``: a host sync on CUDA —
            pass the selection's ``max_seqlen`` to avoid it).
    Returns:
        ``padded[b, :len_b]`` = image b's rows, zeros after; ``key_valid`` True on real tokens — as a
        timm ``Block``'s ``attn_mask``: ``key_valid[:, None, None, :]``. Differentiable in ``visible``.
    """
    check_tensor("visible", visible, ndim=2, dtypes=FLOAT_DTYPES)
    check_same_device(visible=visible, cu_seqlens=cu_seqlens)
    _check_packing(cu_seqlens, visible.shape[0], max_seqlen)
    if max_seqlen is None:
        max_seqlen = max(1, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
    pos = _positions(cu_seqlens, visible.shape[0])
    zero = visible.new_zeros((visible.shape[1],))
    padded = scatter_visible(visible, pos, cu_seqlens, zero, max_seqlen)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1])[:, None]
    return padded, torch.arange(max_seqlen, device=visible.device)[None, :] < lengths


def from_padded(padded: torch.Tensor, cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """The inverse of :func:`to_padded`: padded (B, L, D) -> packed (T, D), each image's first
    ``cu_seqlens[b+1] - cu_seqlens[b]`` rows. ``total`` = T when known (else read from ``cu_seqlens``: a
    host sync on CUDA). Differentiable in ``padded``."""
    check_tensor("padded", padded, ndim=3, dtypes=FLOAT_DTYPES)
    check_same_device(padded=padded, cu_seqlens=cu_seqlens)
    _check_packing(cu_seqlens, total, padded.shape[1])
    if cu_seqlens.numel() != padded.shape[0] + 1:
        raise ValueError(f"cu_seqlens must have B + 1 = {padded.shape[0] + 1} entries, got {cu_seqlens.numel()}")
    if total is None:
        total = int(cu_seqlens[-1])
    return gather_visible(padded, _positions(cu_seqlens, total), cu_seqlens)
