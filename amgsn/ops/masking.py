"""ABMG masking operators (DESIGN §3.1–3.5): attention scores -> mask selection -> visible tokens.

Each public function validates its arguments (static checks here, so ``torch.compile`` can trace
them; data-dependent checks inside the op implementations, which the compiler treats as opaque)
and calls a ``torch.library.custom_op`` whose CPU kernel is C++ (``amgsn._C``) and whose CUDA
kernel is a Triton launcher (``amgsn.kernels``). ``register_fake`` gives the output shapes and
``register_autograd`` the gradients of the gathers/scatters.

Packed layout: image ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]`` of every (T, ...) tensor.

A packed selection passed to the gathers/scatters is checked (ranges, counts, repeated ids: a host
sync on CUDA) unless it is known valid: returned by :func:`abmg_select` / :func:`abmg_mask_and_gather`,
or checked before, and not changed in place since (tracked through the tensors' version counters).
"""

from __future__ import annotations

import math
import weakref

import torch

import amgsn._ext  # noqa: F401  (loads amgsn._C: registers torch.ops.amgsn._*_cpu)
from amgsn.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from amgsn.ops.reference import MaskSelection, num_keep_from_ratio

__all__ = [
    "MaskSelection",
    "cls_attention_scores",
    "abmg_select",
    "gather_visible",
    "scatter_visible",
    "abmg_mask_and_gather",
]


def _kernels():
    # Imported lazily: Triton is only needed (and only importable) where CUDA tensors are used.
    from amgsn import kernels

    return kernels


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _duplicate_ids(ids_keep: torch.Tensor, cu_seqlens: torch.Tensor, batch: int, num_patches: int) -> torch.Tensor:
    """0-d bool on the ids' device: does some image hold a patch index twice? (No host sync.)"""
    rows = torch.arange(ids_keep.numel(), device=ids_keep.device, dtype=torch.int32)
    image = torch.searchsorted(cu_seqlens[1:].contiguous(), rows, right=True).clamp_(max=batch - 1)
    key = image.long() * num_patches + ids_keep.clamp(0, num_patches - 1)
    hits = torch.zeros(batch * num_patches, dtype=torch.int32, device=ids_keep.device)
    hits.index_put_((key,), torch.ones_like(key, dtype=torch.int32), accumulate=True)
    return (hits > 1).any()


def _check_packed(
    ids_keep: torch.Tensor, cu_seqlens: torch.Tensor, batch: int, num_patches: int, distinct: bool = False
) -> None:
    """Data-dependent checks of a packed selection (one host sync); run inside the op kernels.
    ``distinct``: also reject an index repeated within an image (the C++ CPU kernels check that
    themselves; the CUDA scatter would write one row twice)."""
    if cu_seqlens.numel() != batch + 1:
        raise ValueError(f"cu_seqlens must have B + 1 = {batch + 1} entries, got {cu_seqlens.numel()}")
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    no = torch.zeros((), dtype=torch.bool, device=ids_keep.device)
    bad = torch.stack(
        [
            cu_seqlens[0] != 0,
            cu_seqlens[-1] != ids_keep.numel(),
            (counts < 0).any(),
            (counts > num_patches).any(),
            (ids_keep < 0).any() if ids_keep.numel() else no,
            (ids_keep >= num_patches).any() if ids_keep.numel() else no,
            _duplicate_ids(ids_keep, cu_seqlens, batch, num_patches) if distinct and ids_keep.numel() and batch else no,
        ]
    ).tolist()
    if bad[0] or bad[1]:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at len(ids_keep) = {ids_keep.numel()}, "
            f"got {cu_seqlens[0].item()} ... {cu_seqlens[-1].item()}"
        )
    if bad[2] or bad[3]:
        raise ValueError(f"cu_seqlens must be non-decreasing with per-image counts <= N = {num_patches}")
    if bad[4] or bad[5]:
        raise ValueError(f"ids_keep holds an index outside [0, N) with N = {num_patches}")
    if bad[6]:
        raise ValueError("ids_keep holds the same patch index twice within one image")


# Packed selections known to be valid, so the gathers and scatters skip re-checking them (on CUDA the
# check is a host sync plus ~10 small launches, more than the copy itself at training sizes): those
# our selection ops returned, and those a gather/scatter has already checked. Keyed by id(ids_keep);
# an entry holds weak references (it never keeps a tensor alive and goes when ids_keep goes) and both
# tensors' version counters, so any in-place change, through a view too, sends them to the check again.
_VALIDATED: dict[int, tuple] = {}


def _remember_valid(ids_keep: torch.Tensor, cu_seqlens: torch.Tensor, batch: int, num_patches: int,
                    distinct: bool) -> None:
    if torch.compiler.is_compiling() or ids_keep.is_inference() or cu_seqlens.is_inference():
        return  # traced tensors are not the ones the kernels will see; inference tensors have no versions
    key = id(ids_keep)

    def forget(ref: weakref.ref, key: int = key) -> None:
        if _VALIDATED.get(key, (None,))[0] is ref:
            del _VALIDATED[key]

    _VALIDATED[key] = (weakref.ref(ids_keep, forget), weakref.ref(cu_seqlens), ids_keep._version,
                       cu_seqlens._version, batch, num_patches, distinct)


def _known_valid(ids_keep: torch.Tensor, cu_seqlens: torch.Tensor, batch: int, num_patches: int,
                 distinct: bool) -> bool:
    entry = _VALIDATED.get(id(ids_keep))
    if entry is None:
        return False
    ids_ref, cu_ref, ids_version, cu_version, b, n, was_distinct = entry
    # Identity first: only registered (never inference) tensors get as far as reading _version.
    return (ids_ref() is ids_keep and cu_ref() is cu_seqlens and ids_keep._version == ids_version
            and cu_seqlens._version == cu_version and (b, n) == (batch, num_patches)
            and (was_distinct or not distinct))


def _validate_packed(ids_keep: torch.Tensor, cu_seqlens: torch.Tensor, batch: int, num_patches: int,
                     distinct: bool = False) -> None:
    """:func:`_check_packed`, skipped for a selection already known valid (see ``_VALIDATED``)."""
    if _known_valid(ids_keep, cu_seqlens, batch, num_patches, distinct):
        return
    _check_packed(ids_keep, cu_seqlens, batch, num_patches, distinct)
    _remember_valid(ids_keep, cu_seqlens, batch, num_patches, distinct)


def _check_selection_args(ids_keep: object, cu_seqlens: object) -> None:
    check_tensor("ids_keep", ids_keep, ndim=1, dtypes=(torch.int64,))
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))


def _ratio_plan(
    mask_ratio: float | torch.Tensor, batch: int, num_patches: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """-> (num_keep (B,) int64, cu_seqlens (B+1,) int32, total T, max_seqlen), on ``device``.

    A Python float is planned without touching tensors (so ``torch.compile`` sees constants); a
    tensor of per-image ratios is planned on the CPU (one copy if it lives on the GPU).
    """
    if isinstance(mask_ratio, torch.Tensor):
        if not mask_ratio.is_floating_point():
            raise TypeError(f"mask_ratio must be a float or a floating tensor, got dtype {mask_ratio.dtype}")
        if mask_ratio.dim() > 1 or mask_ratio.numel() not in (1, batch):
            raise ValueError(
                f"mask_ratio must be a scalar or have shape (B,) = ({batch},), got {tuple(mask_ratio.shape)}"
            )
        ratio = mask_ratio.detach().to("cpu", torch.float64).reshape(-1)
        if bool(torch.isnan(ratio).any()) or bool(((ratio < 0) | (ratio > 1)).any()):
            raise ValueError(f"mask_ratio must lie in [0, 1] (no NaN), got values in [{ratio.min()}, {ratio.max()}]")
        num_keep = num_keep_from_ratio(ratio, batch, num_patches)
        cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32)
        torch.cumsum(num_keep, 0, out=cu_seqlens[1:])
        total, max_seqlen = int(cu_seqlens[-1]), int(num_keep.max())
        if device.type == "cuda":
            # One pinned, non-blocking copy: a plain .to(device) of pageable memory waits for the
            # whole stream to drain, twice per call. The caching host allocator keeps the pinned
            # buffer alive until the copy is done.
            plan = torch.cat([num_keep, cu_seqlens.to(torch.int64)]).pin_memory().to(device, non_blocking=True)
            return plan[:batch], plan[batch:].to(torch.int32), total, max_seqlen
        return num_keep.to(device), cu_seqlens.to(device), total, max_seqlen
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a float or a tensor, got {type(mask_ratio).__name__}")
    r = float(mask_ratio)
    if not 0.0 <= r <= 1.0:  # also rejects NaN
        raise ValueError(f"mask_ratio must lie in [0, 1], got {mask_ratio}")
    keep = min(num_patches, max(1, math.floor((1.0 - r) * num_patches + 1e-4)))
    num_keep = torch.full((batch,), keep, dtype=torch.int64, device=device)
    cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=device) * keep
    return num_keep, cu_seqlens, batch * keep, keep


def _check_noise(noise: object, shape: tuple[int, ...]) -> None:
    if noise is None:
        return
    check_tensor("noise", noise, ndim=2, floating=True)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise must have the shape of the scores {shape}, got {tuple(noise.shape)}")


def _check_qk(q_cls: object, k: object) -> tuple[int, int, int]:
    check_tensor("q_cls", q_cls, ndim=3, floating=True)
    check_tensor("k", k, ndim=4, floating=True)
    B, H, d = q_cls.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != d:
        raise ValueError(f"k must be (B, H, 1+N, d) = ({B}, {H}, 1+N, {d}) to match q_cls, got {tuple(k.shape)}")
    if k.shape[2] < 2:
        raise ValueError(f"k must hold the CLS key and at least one patch key, got 1+N = {k.shape[2]}")
    check_same_device(q_cls=q_cls, k=k)
    return B, H, k.shape[2] - 1


# --------------------------------------------------------------------------------------------
# §3.1 cls_attention_scores
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("amgsn::cls_attention_scores", mutates_args=(), device_types="cpu")
def _scores_op(q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.ops.amgsn._cls_attention_scores_cpu(q_cls, k)


@_scores_op.register_kernel("cuda")
def _scores_cuda(q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return _kernels().cls_attention_scores(q_cls, k)


@_scores_op.register_fake
def _scores_fake(q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return k.new_empty((k.shape[0], k.shape[2] - 1), dtype=torch.float32)


def cls_attention_scores(q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """CLS-attention saliency of each patch (DESIGN §3.1), without the (1+N)×(1+N) matrix.

    Args:
        q_cls: (B, H, d) — the CLS query of a block.
        k: (B, H, 1+N, d) — that block's keys, CLS first.
    Returns:
        (B, N) float32: per head ``softmax(q_cls · kᵀ / sqrt(d))`` over the 1+N keys, CLS column
        dropped, mean over heads (= DINO/AttMask ``attn[:, :, 0, 1:].mean(1)``). Not differentiable.
    """
    _check_qk(q_cls, k)
    return _scores_op(q_cls, k)


# --------------------------------------------------------------------------------------------
# §3.2 abmg_select
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("amgsn::abmg_select", mutates_args=(), device_types="cpu")
def _select_op(
    scores: torch.Tensor,
    num_keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    total: int,
    noise: torch.Tensor | None,
    relative_noise: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.amgsn._abmg_select_cpu(scores, num_keep, cu_seqlens, total, noise, relative_noise)


@_select_op.register_kernel("cuda")
def _select_cuda(scores, num_keep, cu_seqlens, total, noise, relative_noise):
    return _kernels().abmg_select(scores, num_keep, cu_seqlens, total, noise, relative_noise)


@_select_op.register_fake
def _select_fake(scores, num_keep, cu_seqlens, total, noise, relative_noise):
    return scores.new_empty((total,), dtype=torch.int64), scores.new_empty(scores.shape, dtype=torch.bool)


def abmg_select(
    scores: torch.Tensor,
    mask_ratio: float | torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    relative_noise: bool = False,
) -> MaskSelection:
    """Mask the most salient patches of each image (DESIGN §3.2). Deterministic.

    Args:
        scores: (B, N) floating saliency (e.g. from :func:`cls_attention_scores`).
        mask_ratio: a float, or a (B,) tensor of per-image ratios, each in [0, 1]. Image b keeps
            ``num_keep[b] = clamp(floor((1 - r_b) * N + 1e-4), 1, N)`` patches.
        noise: optional (B, N) values added to the scores before ranking (pass your own random
            noise, e.g. ``torch.rand(B, N) * sigma``; ``noise`` with all-zero scores = MAE's random
            masking).
        relative_noise: scale ``noise`` by each image's score range (max - min), which ranks like
            adding the noise to min-max-normalised scores (ABMG, DESIGN §4.1).
    Returns:
        :class:`MaskSelection` — patches ordered by (score + noise descending, index ascending);
        the first ``N - num_keep[b]`` are masked (``mask`` True), the rest are kept, packed in
        ``ids_keep`` (ascending within each image) with int32 ``cu_seqlens`` from 0.
    """
    check_tensor("scores", scores, ndim=2, floating=True)
    B, N = scores.shape
    if B < 1 or N < 1:
        raise ValueError(f"scores must have B >= 1 and N >= 1, got shape {tuple(scores.shape)}")
    _check_noise(noise, (B, N))
    check_same_device(scores=scores, noise=noise)
    num_keep, cu_seqlens, total, max_seqlen = _ratio_plan(mask_ratio, B, N, scores.device)
    ids_keep, mask = _select_op(scores, num_keep, cu_seqlens, total, noise, bool(relative_noise))
    _remember_valid(ids_keep, cu_seqlens, B, N, distinct=True)  # valid by construction
    return MaskSelection(ids_keep, cu_seqlens, mask, max_seqlen)


# --------------------------------------------------------------------------------------------
# §3.3 gather_visible / §3.4 scatter_visible (+ their backward ops)
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("amgsn::gather_visible", mutates_args=(), device_types="cpu")
def _gather_op(x: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    _validate_packed(ids_keep, cu_seqlens, x.shape[0], x.shape[1])
    return torch.ops.amgsn._gather_visible_cpu(x, ids_keep, cu_seqlens)


@_gather_op.register_kernel("cuda")
def _gather_cuda(x, ids_keep, cu_seqlens, max_seqlen):
    _validate_packed(ids_keep, cu_seqlens, x.shape[0], x.shape[1])
    return _kernels().gather_visible(x, ids_keep, cu_seqlens, max_seqlen)


@_gather_op.register_fake
def _gather_fake(x, ids_keep, cu_seqlens, max_seqlen):
    return x.new_empty((ids_keep.shape[0], x.shape[2]))


@torch.library.custom_op("amgsn::scatter_visible", mutates_args=(), device_types="cpu")
def _scatter_op(
    y: torch.Tensor,
    ids_keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mask_token: torch.Tensor,
    N: int,
    max_seqlen: int,
) -> torch.Tensor:
    _validate_packed(ids_keep, cu_seqlens, cu_seqlens.numel() - 1, N)
    return torch.ops.amgsn._scatter_visible_cpu(y, ids_keep, cu_seqlens, mask_token, N)


@_scatter_op.register_kernel("cuda")
def _scatter_cuda(y, ids_keep, cu_seqlens, mask_token, N, max_seqlen):
    _validate_packed(ids_keep, cu_seqlens, cu_seqlens.numel() - 1, N, distinct=True)
    return _kernels().scatter_visible(y, ids_keep, cu_seqlens, mask_token, N, max_seqlen)


@_scatter_op.register_fake
def _scatter_fake(y, ids_keep, cu_seqlens, mask_token, N, max_seqlen):
    return y.new_empty((cu_seqlens.shape[0] - 1, N, y.shape[1]))


@torch.library.custom_op("amgsn::scatter_visible_backward", mutates_args=(), device_types="cpu")
def _scatter_backward_op(
    grad_out: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.amgsn._scatter_visible_backward_cpu(grad_out, ids_keep, cu_seqlens)


@_scatter_backward_op.register_kernel("cuda")
def _scatter_backward_cuda(grad_out, ids_keep, cu_seqlens, max_seqlen):
    return _kernels().scatter_visible_backward(grad_out, ids_keep, cu_seqlens, grad_out.shape[1], max_seqlen)


@_scatter_backward_op.register_fake
def _scatter_backward_fake(grad_out, ids_keep, cu_seqlens, max_seqlen):
    grad_y = grad_out.new_empty((ids_keep.shape[0], grad_out.shape[2]))
    return grad_y, grad_out.new_empty((grad_out.shape[2],), dtype=torch.float32)


def _scatter_zero_token(grad: torch.Tensor, ids_keep, cu_seqlens, N: int, max_seqlen: int) -> torch.Tensor:
    """Backward of a gather: the gradient rows go back to their patches, zeros elsewhere."""
    zero = grad.new_zeros((grad.shape[-1],))
    return _scatter_op(grad.contiguous(), ids_keep, cu_seqlens, zero, N, max_seqlen)


def _gather_setup(ctx, inputs, output):
    x, ids_keep, cu_seqlens, max_seqlen = inputs
    ctx.save_for_backward(ids_keep, cu_seqlens)
    ctx.N, ctx.max_seqlen = x.shape[1], max_seqlen


def _gather_backward(ctx, grad):
    ids_keep, cu_seqlens = ctx.saved_tensors
    return _scatter_zero_token(grad, ids_keep, cu_seqlens, ctx.N, ctx.max_seqlen), None, None, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


def _scatter_setup(ctx, inputs, output):
    y, ids_keep, cu_seqlens, mask_token, N, max_seqlen = inputs
    ctx.save_for_backward(ids_keep, cu_seqlens)
    ctx.max_seqlen, ctx.token_dtype = max_seqlen, mask_token.dtype


def _scatter_backward(ctx, grad):
    ids_keep, cu_seqlens = ctx.saved_tensors
    grad_y, grad_token = _scatter_backward_op(grad.contiguous(), ids_keep, cu_seqlens, ctx.max_seqlen)
    return grad_y, None, None, grad_token.to(ctx.token_dtype), None, None


_scatter_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


def _max_seqlen(cu_seqlens: torch.Tensor, max_seqlen: int | None) -> int:
    if max_seqlen is not None:
        return int(max_seqlen)
    if cu_seqlens.device.type == "cpu":
        return 0  # the CPU kernels do not need it; avoids a pass when tracing on CPU
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def gather_visible(
    x: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None = None
) -> torch.Tensor:
    """Pack the kept tokens of each image (DESIGN §3.3): ``out[t] = x[b(t), ids_keep[t]]``.

    Args:
        x: (B, N, D) any float dtype, any strides.
        ids_keep: (T,) int64 patch indices; image b's at ``cu_seqlens[b]:cu_seqlens[b+1]``.
        cu_seqlens: (B+1,) int32 prefix sums starting at 0.
        max_seqlen: the largest per-image count, if known (saves a host sync on CUDA).
    Returns:
        (T, D) in ``x.dtype``; differentiable in ``x``.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    _check_selection_args(ids_keep, cu_seqlens)
    check_same_device(x=x, ids_keep=ids_keep, cu_seqlens=cu_seqlens)
    if cu_seqlens.numel() != x.shape[0] + 1:
        raise ValueError(f"cu_seqlens must have B + 1 = {x.shape[0] + 1} entries, got {cu_seqlens.numel()}")
    return _gather_op(x, ids_keep, cu_seqlens, _max_seqlen(cu_seqlens, max_seqlen))


def scatter_visible(
    y: torch.Tensor,
    ids_keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mask_token: torch.Tensor,
    N: int,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Unpack tokens back to full images for the decoder (DESIGN §3.4).

    Args:
        y: (T, D) packed tokens, any float dtype.
        ids_keep, cu_seqlens: the packed selection (as :func:`gather_visible`); ids must be
            distinct within an image.
        mask_token: (D,) — fills every position not in ``ids_keep`` (cast to ``y.dtype``).
        N: patches per image.
    Returns:
        (B, N, D) in ``y.dtype``: ``out[b, ids_keep[t]] = y[t]``, ``mask_token`` elsewhere.
        Differentiable in ``y`` and ``mask_token``.
    """
    check_tensor("y", y, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("mask_token", mask_token, ndim=1, dtypes=FLOAT_DTYPES)
    _check_selection_args(ids_keep, cu_seqlens)
    check_same_device(y=y, ids_keep=ids_keep, cu_seqlens=cu_seqlens, mask_token=mask_token)
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"N must be a positive int, got {N!r}")
    if mask_token.shape[0] != y.shape[1]:
        raise ValueError(f"mask_token must have shape (D,) = ({y.shape[1]},), got {tuple(mask_token.shape)}")
    if ids_keep.shape[0] != y.shape[0]:
        raise ValueError(f"ids_keep must have one entry per row of y ({y.shape[0]}), got {ids_keep.shape[0]}")
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must have B + 1 >= 2 entries")
    token = mask_token.to(y.dtype)
    return _scatter_op(y, ids_keep, cu_seqlens, token, N, _max_seqlen(cu_seqlens, max_seqlen))


# --------------------------------------------------------------------------------------------
# §3.5 abmg_mask_and_gather
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("amgsn::abmg_mask_and_gather", mutates_args=(), device_types="cpu")
def _fused_op(
    q_cls: torch.Tensor,
    k: torch.Tensor,
    x: torch.Tensor,
    num_keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    total: int,
    max_seqlen: int,
    noise: torch.Tensor | None,
    relative_noise: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scores = torch.ops.amgsn._cls_attention_scores_cpu(q_cls, k)
    ids_keep, mask = torch.ops.amgsn._abmg_select_cpu(scores, num_keep, cu_seqlens, total, noise, relative_noise)
    return torch.ops.amgsn._gather_visible_cpu(x, ids_keep, cu_seqlens), ids_keep, mask


@_fused_op.register_kernel("cuda")
def _fused_cuda(q_cls, k, x, num_keep, cu_seqlens, total, max_seqlen, noise, relative_noise):
    return _kernels().abmg_mask_and_gather(q_cls, k, x, num_keep, cu_seqlens, total, noise, relative_noise)


@_fused_op.register_fake
def _fused_fake(q_cls, k, x, num_keep, cu_seqlens, total, max_seqlen, noise, relative_noise):
    B, N, D = x.shape
    return (
        x.new_empty((total, D)),
        x.new_empty((total,), dtype=torch.int64),
        x.new_empty((B, N), dtype=torch.bool),
    )


def _fused_setup(ctx, inputs, output):
    x, cu_seqlens, max_seqlen = inputs[2], inputs[4], inputs[6]
    ctx.save_for_backward(output[1], cu_seqlens)
    ctx.N, ctx.max_seqlen = x.shape[1], max_seqlen


def _fused_backward(ctx, grad_visible, grad_ids, grad_mask):
    ids_keep, cu_seqlens = ctx.saved_tensors
    grad_x = _scatter_zero_token(grad_visible, ids_keep, cu_seqlens, ctx.N, ctx.max_seqlen)
    return None, None, grad_x, None, None, None, None, None, None


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


def abmg_mask_and_gather(
    q_cls: torch.Tensor,
    k: torch.Tensor,
    x: torch.Tensor,
    mask_ratio: float | torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    relative_noise: bool = False,
) -> tuple[torch.Tensor, MaskSelection]:
    """Scores -> selection -> gather in one call (DESIGN §3.5); one fused Triton launch on CUDA.

    Args:
        q_cls: (B, H, d), k: (B, H, 1+N, d) — as :func:`cls_attention_scores`.
        x: (B, N, D) the tokens to gather (any float dtype, any strides).
        mask_ratio, noise, relative_noise: as :func:`abmg_select`.
    Returns:
        ``(visible (T, D), MaskSelection)``; ``visible`` is differentiable in ``x``.
    """
    B, _, N = _check_qk(q_cls, k)
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    if x.shape[0] != B or x.shape[1] != N:
        raise ValueError(f"x must be (B, N, D) = ({B}, {N}, D) to match k, got {tuple(x.shape)}")
    _check_noise(noise, (B, N))
    check_same_device(q_cls=q_cls, k=k, x=x, noise=noise)
    num_keep, cu_seqlens, total, max_seqlen = _ratio_plan(mask_ratio, B, N, x.device)
    visible, ids_keep, mask = _fused_op(
        q_cls, k, x, num_keep, cu_seqlens, total, max_seqlen, noise, bool(relative_noise)
    )
    _remember_valid(ids_keep, cu_seqlens, B, N, distinct=True)  # valid by construction
    return visible, MaskSelection(ids_keep, cu_seqlens, mask, max_seqlen)
