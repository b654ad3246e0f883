"""ABMG masking operators (docs/method.md §3.1–3.5): attention scores -> mask selection -> visible tokens.

Each public function validates its arguments (static checks here, so ``torch.compile`` can trace
them) and calls a ``torch.library.custom_op`` whose CPU kernel is C++ (``amgsn._C``) and whose CUDA
kernel is a Triton launcher (``amgsn.kernels``). ``register_fake`` gives the output shapes and
``register_autograd`` the gradients of the gathers/scatters.

Packed layout: image ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]`` of every (T, ...) tensor.

A packed selection passed to the gathers/scatters is checked by the kernels themselves, every call:
the C++ kernels raise ValueError; the Triton kernels bound every index inside the kernel and clear a
device flag that ``torch._assert_async`` reports (no host sync). ``max_seqlen`` is never trusted: the
grids are sized from T and N. NaN scores rank as -inf everywhere (docs/method.md, "Masking ops: edge
cases").

``AMGSN_TRITON_ON_CPU=1`` (read at import; needs ``TRITON_INTERPRET=1``, both set before importing
amgsn) sends CPU tensors down the CUDA route — the Triton launchers, the same planning and checks —
through the Triton interpreter, so the test-suite runs the whole CUDA op path without a GPU.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

import amgsn._ext  # noqa: F401  (loads amgsn._C: registers torch.ops.amgsn._*_cpu)
from amgsn.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from amgsn.ops.reference import MaskSelection

__all__ = [
    "MaskSelection",
    "cls_attention_scores",
    "abmg_select",
    "gather_visible",
    "scatter_visible",
    "abmg_mask_and_gather",
]

TRITON_ON_CPU = os.environ.get("AMGSN_TRITON_ON_CPU", "0") == "1"
if TRITON_ON_CPU and os.environ.get("TRITON_INTERPRET", "0") != "1":
    raise RuntimeError(
        "AMGSN_TRITON_ON_CPU=1 runs the Triton kernels on CPU tensors, which needs the Triton interpreter: "
        "set TRITON_INTERPRET=1 as well (both before importing amgsn)"
    )


def _kernels():
    # Imported lazily: Triton is only needed (and only importable) where CUDA tensors are used.
    from amgsn import kernels

    return kernels


# --------------------------------------------------------------------------------------------
# Checks and the ratio plan
# --------------------------------------------------------------------------------------------


def _check_selection_args(ids_keep: object, cu_seqlens: object) -> None:
    check_tensor("ids_keep", ids_keep, ndim=1, dtypes=(torch.int64,))
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))


def _ratio_plan(
    mask_ratio: float | torch.Tensor, batch: int, num_patches: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """-> (num_keep (B,) int32, cu_seqlens (B+1,) int32, total T, max_seqlen), on ``device``; one launch.

    ``num_keep = clamp(floor((1 - r) * N + 1e-4), 1, N)`` in float64. A Python float is planned
    without touching tensors (so ``torch.compile`` sees constants): one arange for ``cu_seqlens``, and
    ``num_keep`` is a stride-0 view of its element 1 (= keep). A tensor of per-image ratios is
    planned on the host: a CPU tensor is read in place (a numpy view: no copy, no sync), a GPU one is
    copied back first (one sync: keep MRUS ratios on the host to avoid it); the int32 plan then goes
    to the device in one pinned, non-blocking copy. The kernels read ``num_keep`` with its stride.
    """
    if isinstance(mask_ratio, torch.Tensor):
        if not mask_ratio.is_floating_point():
            raise TypeError(f"mask_ratio must be a float or a floating tensor, got dtype {mask_ratio.dtype}")
        if mask_ratio.dim() > 1 or mask_ratio.numel() not in (1, batch):
            raise ValueError(
                f"mask_ratio must be a scalar or have shape (B,) = ({batch},), got {tuple(mask_ratio.shape)}"
            )
        host = mask_ratio.detach()
        if host.device.type != "cpu":
            host = host.cpu()
        r = host.to(torch.float64).reshape(-1).numpy()
        if np.isnan(r).any() or ((r < 0) | (r > 1)).any():
            raise ValueError(f"mask_ratio must lie in [0, 1] (no NaN), got values in [{r.min()}, {r.max()}]")
        keep = np.clip(np.floor((1.0 - r) * num_patches + 1e-4), 1, num_patches).astype(np.int64)
        plan = np.zeros(2 * batch + 1, dtype=np.int64)
        plan[:batch] = keep  # broadcasts a single ratio
        np.cumsum(plan[:batch], out=plan[batch + 1 :])
        total, max_seqlen = int(plan[-1]), int(plan[:batch].max())
        if total > np.iinfo(np.int32).max:
            raise ValueError(f"the selection keeps {total} tokens: more than int32 cu_seqlens can index")
        plan_t = torch.from_numpy(plan.astype(np.int32))
        if device.type == "cuda":
            # A plain .to(device) of pageable memory waits for the whole stream to drain; the caching
            # host allocator keeps the pinned buffer alive until the copy is done.
            plan_t = plan_t.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            plan_t = plan_t.to(device)
        return plan_t[:batch], plan_t[batch:], total, max_seqlen
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a float or a tensor, got {type(mask_ratio).__name__}")
    r = float(mask_ratio)
    if not 0.0 <= r <= 1.0:  # also rejects NaN
        raise ValueError(f"mask_ratio must lie in [0, 1], got {mask_ratio}")
    return fixed_plan(min(num_patches, max(1, math.floor((1.0 - r) * num_patches + 1e-4))), batch, device)


def fixed_plan(keep: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The plan of ``keep`` >= 1 patches in every image: one arange for ``cu_seqlens``; ``num_keep`` is a
    stride-0 view of its element 1 (= keep)."""
    cu_seqlens = torch.arange(0, (batch + 1) * keep, keep, dtype=torch.int32, device=device)
    return cu_seqlens[1:2].expand(batch), cu_seqlens, batch * keep, keep


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


def _check_x_matches_k(x: object, B: int, N: int) -> None:
    """x (B, N, D) must hold one row per patch key of k (N = k's 1+N - 1). x with one row more than k's
    patches is k without its CLS key — or x with its CLS token: the error names k and says both."""
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    if x.shape[0] == B and x.shape[1] == N + 1:
        raise ValueError(
            f"k has {N + 1} keys for the {N + 1} patches of x: k must hold the CLS key first and then one key "
            f"per patch, (B, H, 1+N, d) with 1+N = {N + 2}; if x still holds its CLS token, pass the patches "
            f"only (x[:, 1:])"
        )
    if x.shape[0] != B or x.shape[1] != N:
        raise ValueError(
            f"x must be (B, N, D) = ({B}, {N}, D) to match k (1+N = {N + 1} keys, CLS first), got {tuple(x.shape)}"
        )


def _check_x_matches_mask(x: torch.Tensor, mask: object) -> None:
    """The selection's mask (B, N) gives B and N: ``x`` must have them (an x that still holds its CLS token
    has N+1 rows and would be read shifted by one)."""
    check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
    B, N = mask.shape
    if x.shape[0] == B and x.shape[1] == N + 1:
        raise ValueError(
            f"x has {N + 1} tokens per image but the selection is for N = {N} patches: x still holds its CLS "
            f"token; pass the patches only (x[:, 1:])"
        )
    if x.shape[0] != B or x.shape[1] != N:
        raise ValueError(f"x must be (B, N, D) = ({B}, {N}, D) to match the selection's mask, got {tuple(x.shape)}")


def as_token(mask_token: object, D: int) -> torch.Tensor:
    """``mask_token`` of shape (D,), or MAE's parameter of shape (1, 1, D) (any leading 1s) -> (D,)."""
    check_tensor("mask_token", mask_token, dtypes=FLOAT_DTYPES)
    if tuple(mask_token.shape[-1:]) != (D,) or any(n != 1 for n in mask_token.shape[:-1]):
        raise ValueError(
            f"mask_token must have shape (D,) = ({D},) or (1, 1, D) as MAE's parameter, got {tuple(mask_token.shape)}"
        )
    return mask_token.reshape(D)


# --------------------------------------------------------------------------------------------
# §3.1 cls_attention_scores
# --------------------------------------------------------------------------------------------


# The CPU kernel of every op below is the C++ one, or with TRITON_ON_CPU the Triton launcher its CUDA
# kernel is: ``_scores_triton`` & co. are registered for "cuda" and called from the CPU kernels.


def _scores_triton(q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return _kernels().cls_attention_scores(q_cls, k)


@torch.library.custom_op("amgsn::cls_attention_scores", mutates_args=(), device_types="cpu")
def _scores_op(q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    if TRITON_ON_CPU:
        return _scores_triton(q_cls, k)
    return torch.ops.amgsn._cls_attention_scores_cpu(q_cls, k)


_scores_op.register_kernel("cuda")(_scores_triton)


def score_dtype(*inputs: torch.Tensor | None) -> torch.dtype:
    """Scores are computed in and returned as float64 when any input is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in inputs) else torch.float32


@_scores_op.register_fake
def _scores_fake(q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return k.new_empty((k.shape[0], k.shape[2] - 1), dtype=score_dtype(q_cls, k))


def cls_attention_scores(q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """CLS-attention saliency of each patch (docs/method.md §3.1), without the (1+N)×(1+N) matrix.

    Args:
        q_cls: (B, H, d) — the CLS query of a block.
        k: (B, H, 1+N, d) — that block's keys, CLS first.
    Returns:
        (B, N) float32 — float64 when q_cls or k is float64, computed in that precision: per head
        ``softmax(q_cls · kᵀ / sqrt(d))`` over the 1+N keys, CLS column dropped, mean over heads
        (= DINO/AttMask ``attn[:, :, 0, 1:].mean(1)``). Not differentiable.
    """
    _check_qk(q_cls, k)
    return _scores_op(q_cls, k)


# --------------------------------------------------------------------------------------------
# §3.2 abmg_select
# --------------------------------------------------------------------------------------------


def _select_triton(scores, num_keep, cu_seqlens, total, noise, relative_noise):
    return _kernels().abmg_select(scores, num_keep, cu_seqlens, total, noise, relative_noise)


@torch.library.custom_op("amgsn::abmg_select", mutates_args=(), device_types="cpu")
def _select_op(
    scores: torch.Tensor,
    num_keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    total: int,
    noise: torch.Tensor | None,
    relative_noise: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if TRITON_ON_CPU:
        return _select_triton(scores, num_keep, cu_seqlens, total, noise, relative_noise)
    return torch.ops.amgsn._abmg_select_cpu(scores, num_keep, cu_seqlens, total, noise, relative_noise)


_select_op.register_kernel("cuda")(_select_triton)


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
    """Mask the most salient patches of each image (docs/method.md §3.2). Deterministic.

    Args:
        scores: (B, N) floating saliency (e.g. from :func:`cls_attention_scores`).
        mask_ratio: a float, or a (B,) tensor of per-image ratios, each in [0, 1]. Image b keeps
            ``num_keep[b] = clamp(floor((1 - r_b) * N + 1e-4), 1, N)`` patches. Keep per-image
            ratios on the host (a CPU tensor): a GPU tensor costs a host sync to plan the packing.
        noise: optional (B, N) values added to the scores before ranking (pass your own random
            noise, e.g. ``torch.rand(B, N) * sigma``; ``noise`` with all-zero scores = MAE's random
            masking).
        relative_noise: scale ``noise`` by each image's score range (max - min), which ranks like
            adding the noise to min-max-normalised scores (ABMG, docs/method.md §4.1).
    Returns:
        :class:`MaskSelection` — patches ordered by (score + noise descending, index ascending);
        the first ``N - num_keep[b]`` are masked (``mask`` True), the rest are kept, packed in
        ``ids_keep`` (ascending within each image) with int32 ``cu_seqlens`` from 0. A NaN value
        ranks as -inf (the range ignores NaN scores), on every device.
    """
    check_tensor("scores", scores, ndim=2, floating=True)
    B, N = scores.shape
    if B < 1 or N < 1:
        raise ValueError(f"scores must have B >= 1 and N >= 1, got shape {tuple(scores.shape)}")
    _check_noise(noise, (B, N))
    check_same_device(scores=scores, noise=noise)
    num_keep, cu_seqlens, total, max_seqlen = _ratio_plan(mask_ratio, B, N, scores.device)
    ids_keep, mask = _select_op(scores, num_keep, cu_seqlens, total, noise, bool(relative_noise))
    return MaskSelection(ids_keep, cu_seqlens, max_seqlen, mask)


# --------------------------------------------------------------------------------------------
# §3.3 gather_visible / §3.4 scatter_visible (+ their backward ops)
# --------------------------------------------------------------------------------------------


def _gather_triton(x, ids_keep, cu_seqlens):
    return _kernels().gather_visible(x, ids_keep, cu_seqlens)


@torch.library.custom_op("amgsn::gather_visible", mutates_args=(), device_types="cpu")
def _gather_op(x: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    if TRITON_ON_CPU:
        return _gather_triton(x, ids_keep, cu_seqlens)
    return torch.ops.amgsn._gather_visible_cpu(x, ids_keep, cu_seqlens)


_gather_op.register_kernel("cuda")(_gather_triton)


@_gather_op.register_fake
def _gather_fake(x, ids_keep, cu_seqlens):
    return x.new_empty((ids_keep.shape[0], x.shape[2]))


def _scatter_triton(y, ids_keep, cu_seqlens, mask_token, N):
    return _kernels().scatter_visible(y, ids_keep, cu_seqlens, mask_token, N)


@torch.library.custom_op("amgsn::scatter_visible", mutates_args=(), device_types="cpu")
def _scatter_op(
    y: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor, mask_token: torch.Tensor, N: int
) -> torch.Tensor:
    if TRITON_ON_CPU:
        return _scatter_triton(y, ids_keep, cu_seqlens, mask_token, N)
    return torch.ops.amgsn._scatter_visible_cpu(y, ids_keep, cu_seqlens, mask_token, N)


_scatter_op.register_kernel("cuda")(_scatter_triton)


@_scatter_op.register_fake
def _scatter_fake(y, ids_keep, cu_seqlens, mask_token, N):
    return y.new_empty((cu_seqlens.shape[0] - 1, N, y.shape[1]))


def _scatter_backward_triton(grad_out, ids_keep, cu_seqlens):
    return _kernels().scatter_visible_backward(grad_out, ids_keep, cu_seqlens, grad_out.shape[1])


@torch.library.custom_op("amgsn::scatter_visible_backward", mutates_args=(), device_types="cpu")
def _scatter_backward_op(
    grad_out: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if TRITON_ON_CPU:
        return _scatter_backward_triton(grad_out, ids_keep, cu_seqlens)
    return torch.ops.amgsn._scatter_visible_backward_cpu(grad_out, ids_keep, cu_seqlens)


_scatter_backward_op.register_kernel("cuda")(_scatter_backward_triton)


@_scatter_backward_op.register_fake
def _scatter_backward_fake(grad_out, ids_keep, cu_seqlens):
    grad_y = grad_out.new_empty((ids_keep.shape[0], grad_out.shape[2]))
    return grad_y, grad_out.new_empty((grad_out.shape[2],), dtype=score_dtype(grad_out))


def _scatter_zero_token(grad: torch.Tensor, ids_keep, cu_seqlens, N: int) -> torch.Tensor:
    """Backward of a gather: the gradient rows go back to their patches, zeros elsewhere."""
    zero = grad.new_zeros((grad.shape[-1],))
    return _scatter_op(grad.contiguous(), ids_keep, cu_seqlens, zero, N)


def _gather_setup(ctx, inputs, output):
    x, ids_keep, cu_seqlens = inputs
    ctx.save_for_backward(ids_keep, cu_seqlens)
    ctx.N = x.shape[1]


def _gather_backward(ctx, grad):
    ids_keep, cu_seqlens = ctx.saved_tensors
    return _scatter_zero_token(grad, ids_keep, cu_seqlens, ctx.N), None, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


def _scatter_setup(ctx, inputs, output):
    y, ids_keep, cu_seqlens, mask_token, N = inputs
    ctx.save_for_backward(ids_keep, cu_seqlens)
    ctx.token_dtype = mask_token.dtype


def _scatter_backward(ctx, grad):
    ids_keep, cu_seqlens = ctx.saved_tensors
    grad_y, grad_token = _scatter_backward_op(grad.contiguous(), ids_keep, cu_seqlens)
    return grad_y, None, None, grad_token.to(ctx.token_dtype), None


_scatter_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


def gather_visible(
    x: torch.Tensor,
    ids_keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pack the kept tokens of each image (docs/method.md §3.3): ``out[t] = x[b(t), ids_keep[t]]``.

    ``gather_visible(x, *sel)`` takes a whole :class:`MaskSelection`.

    Args:
        x: (B, N, D) any float dtype, any strides — the patches only, no CLS token.
        ids_keep: (T,) int64 patch indices in [0, N); image b's at ``cu_seqlens[b]:cu_seqlens[b+1]``.
        cu_seqlens: (B+1,) int32 prefix sums starting at 0 and ending at T.
        max_seqlen: accepted for compatibility and not used (nothing is sized from it).
        mask: optional (B, N) bool, the selection's mask: then x must have exactly B images of N rows
            (an x that still holds its CLS token is refused instead of being read shifted by one).
    Returns:
        (T, D) in ``x.dtype``; differentiable in ``x``. An invalid ``ids_keep`` / ``cu_seqlens`` raises
        ValueError on CPU and trips a device-side assert on CUDA (checked in the kernels, no sync).
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    _check_selection_args(ids_keep, cu_seqlens)
    check_same_device(x=x, ids_keep=ids_keep, cu_seqlens=cu_seqlens)
    if mask is not None:
        _check_x_matches_mask(x, mask)
    if cu_seqlens.numel() != x.shape[0] + 1:
        raise ValueError(f"cu_seqlens must have B + 1 = {x.shape[0] + 1} entries, got {cu_seqlens.numel()}")
    return _gather_op(x, ids_keep, cu_seqlens)


_SCATTER_ORDERS = {True: ("mask_token", "N", "max_seqlen"), False: ("max_seqlen", "mask")}


def scatter_visible(
    y: torch.Tensor,
    ids_keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *args: object,
    mask_token: torch.Tensor | None = None,
    N: int | None = None,
    max_seqlen: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unpack tokens back to full images for the decoder (docs/method.md §3.4).

    Two call forms: ``scatter_visible(y, ids_keep, cu_seqlens, mask_token, N[, max_seqlen])`` (§3.4), and
    ``scatter_visible(y, *sel, mask_token=token)`` with a whole :class:`MaskSelection` (after
    ``cu_seqlens`` come its ``max_seqlen`` and ``mask``; N is the mask's width).

    Args:
        y: (T, D) packed tokens, any float dtype.
        ids_keep, cu_seqlens: the packed selection (as :func:`gather_visible`); ids must be
            distinct within an image (any order).
        mask_token: (D,), or (1, 1, D) as MAE's parameter — fills every position not in ``ids_keep``
            (cast to ``y.dtype``).
        N: patches per image (optional when ``mask`` is given).
        max_seqlen: accepted for compatibility and not used.
        mask: optional (B, N) bool, the selection's mask (gives B and N, checked against the others).
    Returns:
        (B, N, D) in ``y.dtype``: ``out[b, ids_keep[t]] = y[t]``, ``mask_token`` elsewhere.
        Differentiable in ``y`` and ``mask_token``. Invalid selections: as :func:`gather_visible`.
    """
    named = {"mask_token": mask_token, "N": N, "max_seqlen": max_seqlen, "mask": mask}
    if args:
        order = _SCATTER_ORDERS[isinstance(args[0], torch.Tensor)]
        if len(args) > len(order):
            raise TypeError(f"scatter_visible takes at most {3 + len(order)} positional arguments in this form "
                            f"(y, ids_keep, cu_seqlens, {', '.join(order)}), got {3 + len(args)}")
        for name, value in zip(order, args):
            if named[name] is not None:
                raise TypeError(f"scatter_visible got multiple values for {name}")
            named[name] = value
    mask_token, N, mask = named["mask_token"], named["N"], named["mask"]
    check_tensor("y", y, ndim=2, dtypes=FLOAT_DTYPES)
    _check_selection_args(ids_keep, cu_seqlens)
    if mask_token is None:
        raise TypeError("scatter_visible needs mask_token (D,)")
    token = as_token(mask_token, y.shape[1])
    check_same_device(y=y, ids_keep=ids_keep, cu_seqlens=cu_seqlens, mask_token=mask_token, mask=mask)
    if mask is not None:
        check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
        if N is not None and N != mask.shape[1]:
            raise ValueError(f"N = {N!r} does not match the selection's mask, which has N = {mask.shape[1]}")
        if cu_seqlens.numel() != mask.shape[0] + 1:
            raise ValueError(f"cu_seqlens must have B + 1 = {mask.shape[0] + 1} entries (the mask's B + 1), "
                             f"got {cu_seqlens.numel()}")
        N = mask.shape[1]
    if N is None:
        raise TypeError("scatter_visible needs N (or the selection's mask)")
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"N must be a positive int, got {N!r}")
    if ids_keep.shape[0] != y.shape[0]:
        raise ValueError(f"ids_keep must have one entry per row of y ({y.shape[0]}), got {ids_keep.shape[0]}")
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must have B + 1 >= 2 entries")
    return _scatter_op(y, ids_keep, cu_seqlens, token.to(y.dtype), N)


# --------------------------------------------------------------------------------------------
# §3.5 abmg_mask_and_gather
# --------------------------------------------------------------------------------------------


def _fused_triton(q_cls, k, x, num_keep, cu_seqlens, total, noise, relative_noise):
    return _kernels().abmg_mask_and_gather(q_cls, k, x, num_keep, cu_seqlens, total, noise, relative_noise)


def _fused_writes_inverse(x: torch.Tensor) -> bool:
    # The Triton route (CUDA, or CPU tensors with TRITON_ON_CPU) returns the inverse map (B, N); the C++
    # route returns an empty (0, N) placeholder and its backward scatters through ids_keep instead.
    return x.device.type != "cpu" or TRITON_ON_CPU


@torch.library.custom_op("amgsn::abmg_mask_and_gather", mutates_args=(), device_types="cpu")
def _fused_op(
    q_cls: torch.Tensor,
    k: torch.Tensor,
    x: torch.Tensor,
    num_keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    total: int,
    noise: torch.Tensor | None,
    relative_noise: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if TRITON_ON_CPU:
        return _fused_triton(q_cls, k, x, num_keep, cu_seqlens, total, noise, relative_noise)
    scores = torch.ops.amgsn._cls_attention_scores_cpu(q_cls, k)
    ids_keep, mask = torch.ops.amgsn._abmg_select_cpu(scores, num_keep, cu_seqlens, total, noise, relative_noise)
    visible = torch.ops.amgsn._gather_visible_cpu(x, ids_keep, cu_seqlens)
    return visible, ids_keep, mask, x.new_empty((0, x.shape[1]), dtype=torch.int32)


_fused_op.register_kernel("cuda")(_fused_triton)


@_fused_op.register_fake
def _fused_fake(q_cls, k, x, num_keep, cu_seqlens, total, noise, relative_noise):
    B, N, D = x.shape
    return (
        x.new_empty((total, D)),
        x.new_empty((total,), dtype=torch.int64),
        x.new_empty((B, N), dtype=torch.bool),
        x.new_empty((B if _fused_writes_inverse(x) else 0, N), dtype=torch.int32),
    )


def _unpack_triton(y: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    return _kernels().unpack_rows(y, inv)


@torch.library.custom_op("amgsn::unpack_rows", mutates_args=(), device_types="cpu")
def _unpack_op(y: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """(B, N, D): ``out[b, n] = y[inv[b, n]]``, zeros where ``inv`` is -1 — the fused op's backward."""
    if TRITON_ON_CPU:
        return _unpack_triton(y, inv)
    out = y.new_zeros((inv.shape[0], inv.shape[1], y.shape[1]))  # not reached by the C++ route's ops
    kept = inv >= 0
    out[kept] = y[inv[kept].long()]
    return out


_unpack_op.register_kernel("cuda")(_unpack_triton)


@_unpack_op.register_fake
def _unpack_fake(y, inv):
    return y.new_empty((inv.shape[0], inv.shape[1], y.shape[1]))


def _unpack_setup(ctx, inputs, output):
    y, inv = inputs
    ctx.save_for_backward(inv)
    ctx.T = y.shape[0]


def _unpack_backward(ctx, grad):
    # Only reached by double backward through the fused op: the adjoint gathers each packed row back
    # from its patch. Every row t has exactly one kept (b, n); masked positions add exact zeros.
    (inv,) = ctx.saved_tensors
    D = grad.shape[-1]
    kept = (inv >= 0)[..., None]
    rows = inv.clamp_min(0).reshape(-1).long()
    src = torch.where(kept, grad, torch.zeros_like(grad)).reshape(-1, D)
    return grad.new_zeros((ctx.T, D)).index_put_((rows,), src, accumulate=True), None


_unpack_op.register_autograd(_unpack_backward, setup_context=_unpack_setup)


def _fused_setup(ctx, inputs, output):
    x, cu_seqlens = inputs[2], inputs[4]
    ctx.set_materialize_grads(False)  # ids_keep / mask / inv get no gradient: no zero tensors for them
    inv = output[3]
    ctx.by_inverse = inv.shape[0] > 0
    # Triton route: the forward's own inverse map, so the backward is one launch and cannot be misled
    # by a later change to the returned ids_keep. C++ route: ids_keep, checked again by the scatter.
    ctx.save_for_backward(*((inv,) if ctx.by_inverse else (output[1], cu_seqlens)))
    ctx.N = x.shape[1]


def _fused_backward(ctx, grad_visible, grad_ids, grad_mask, grad_inv):
    if grad_visible is None:
        return None, None, None, None, None, None, None, None
    if ctx.by_inverse:
        (inv,) = ctx.saved_tensors
        grad_x = _unpack_op(grad_visible, inv)
    else:
        ids_keep, cu_seqlens = ctx.saved_tensors
        grad_x = _scatter_zero_token(grad_visible, ids_keep, cu_seqlens, ctx.N)
    return None, None, grad_x, None, None, None, None, None


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
    """Scores -> selection -> gather in one call (docs/method.md §3.5); on CUDA three Triton launches with
    no host sync between them (per-head scores, rank + inverse map, gather over packed rows) and a
    one-launch backward through the forward's inverse map.

    Args:
        q_cls: (B, H, d), k: (B, H, 1+N, d) — as :func:`cls_attention_scores` (k with its CLS key first).
        x: (B, N, D) the patch tokens to gather, no CLS token (any float dtype, any strides).
        mask_ratio, noise, relative_noise: as :func:`abmg_select`.
    Returns:
        ``(visible (T, D), MaskSelection)``; ``visible`` is differentiable in ``x``.
    """
    B, _, N = _check_qk(q_cls, k)
    _check_x_matches_k(x, B, N)
    _check_noise(noise, (B, N))
    check_same_device(q_cls=q_cls, k=k, x=x, noise=noise)
    num_keep, cu_seqlens, total, max_seqlen = _ratio_plan(mask_ratio, B, N, x.device)
    visible, ids_keep, mask, _ = _fused_op(q_cls, k, x, num_keep, cu_seqlens, total, noise, bool(relative_noise))
    return visible, MaskSelection(ids_keep, cu_seqlens, max_seqlen, mask)
