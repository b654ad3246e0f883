"""Triton kernels of ABMG masking: CLS-attention scores (docs/method.md §3.1), selection (§3.2) and the fused
scores -> selection -> visible-row gather (§3.5).

The fused op is three launches with no host sync between them (issue 18 item 4):

1. ``_head_probs_kernel`` on a (B, H) grid: one program per (image, head) loads the head's CLS query and
   its whole (N, d) key block (full rows up to a 32 KiB tile) and writes that head's CLS-attention
   row ``P[b, h, :]`` (fp32; fp64 for float64 inputs) to scratch — B·H programs instead of B, and no
   chain of dependent tile loads;
2. ``_rank_kernel`` on a (B,) grid: the head mean ``s = Σ_h P[b, h] / H`` (h ascending), the rank, and
   the selection's outputs — ``ids_keep``, the mask and the inverse map ``inv[b, n]`` (packed row of
   patch n, -1 where masked) that the backward scatters through (no search, no inverse-map launch);
3. the gather over packed rows (``gather._gather_kernel``) on a (row blocks, D blocks) grid.

:func:`cls_attention_scores` runs the same first kernel and the same head mean, so its scores are
bit-identical to the ones the fused op ranks.

Semantics are exactly those of ``amgsn.ops.reference``:

* scores: per head ``softmax(q_cls · kᵀ / sqrt(d))`` over all 1+N keys (fp32 accumulation, max
  subtracted), CLS column dropped, mean over heads;
* selection: values ``v = f64(s) + f64(noise) * scale`` ranked by (v descending, index ascending);
  the first ``N - num_keep[b]`` are masked. A NaN value ranks as -inf (below every number; NaNs and
  -inf tie and fall back to index order), and the relative-noise range is taken over the non-NaN
  scores — the rule of the reference and the C++ kernel (docs/method.md, "Masking ops: edge cases"),
  so no flag, no error and no host sync; The rank is a chunked pairwise count in float64 — packed
  64-bit (value, index) keys cannot hold an f64 value plus an index, and ``tl.topk`` returns values
  only (and differs across Triton versions);
* kept ids ascending per image at ``ids_keep[cu[b]:cu[b+1]]``, output slot = exclusive cumsum.

The launchers do not validate their arguments (``amgsn.ops`` does; ``num_keep`` / ``cu_seqlens`` come
from its plan) and accept any strides; they never read a device value on the host.
Only long-standing ``tl`` APIs are used (Triton 3.6 on the GPU machine, 3.8 + interpreter here).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .gather import _col_block, _gather_kernel, _row_block

__all__ = ["cls_attention_scores", "abmg_select", "abmg_mask_and_gather"]


def _launch_config(N: int, d: int, key_bytes: int = 2) -> dict[str, int]:
    """Block sizes by problem size, held to register budgets that ``amgsn kernels`` checks (docs/method.md §9.1:
    no spills, at least 2 CTAs per SM on sm_90 at the benchmark shapes).

    NP = N padded to a power of two. BDH = the head-dim block of the key tile: the whole row (d) while the
    (NP, BDH) tile stays within 32 KiB of keys — 16K bf16 / fp16, 8K fp32 or 4K fp64 elements, i.e. 64 / 32
    / 16 elements per thread at 8 warps (N = 196, d = 64: each head's keys in one tile for 16-bit keys, two
    for fp32; a 16K-element fp32 tile needed 141 registers on sm_90, one CTA per SM). BJ = the j-block of the
    rank's (NP, BJ) float64 compare tile, 16 elements per thread (32 per thread needed 126-145 registers on
    sm_80-sm_90 with Triton 3.8 — one CTA per SM for the noisy selection, 8 spilled bytes on sm_89 — 16 needs
    64-95)."""
    NP = triton.next_power_of_2(max(N, 1))
    num_warps = 4 if NP <= 64 else 8
    per_cta = 16 * 32 * num_warps
    tile = 32768 // max(key_bytes, 1)
    return {
        "NP": NP,
        "BDH": max(1, min(triton.next_power_of_2(max(d, 1)), max(16, tile // NP))),
        "BJ": max(1, min(32, per_cta // NP)),
        "num_warps": num_warps,
    }


@triton.jit
def _head_probs_kernel(
    q_ptr, sqb, sqh, sqd, k_ptr, skb, skh, skn, skd, p_ptr, H, N, d, sm_scale,
    NP: tl.constexpr, BDH: tl.constexpr,
):  # fmt: skip
    """grid (B, H): P[b, h, n] = softmax over the 1+N keys of head h, patch columns only, in P's dtype (fp32;
    fp64 for float64 inputs — every op computes in at least its input's precision)."""
    acc_t = p_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    q_h = q_ptr + b * sqb + h * sqh
    k_h = k_ptr + b * skb + h * skh
    offs_n = tl.arange(0, NP)
    n_ok = offs_n < N
    # Patch n is key 1+n: the CLS key (row 0) is handled separately so NP = next_pow2(N), not N+1.
    key_rows = (1 + offs_n).to(tl.int64)[:, None] * skn
    dots = tl.zeros([NP], dtype=acc_t)
    dot_cls = tl.zeros([BDH], dtype=acc_t)
    for d0 in range(0, d, BDH):  # one iteration when the whole row fits the tile
        offs_d = d0 + tl.arange(0, BDH)
        d_ok = offs_d < d
        q = tl.load(q_h + offs_d * sqd, mask=d_ok, other=0.0).to(acc_t)
        k_cls = tl.load(k_h + offs_d * skd, mask=d_ok, other=0.0).to(acc_t)
        dot_cls += q * k_cls
        kt = tl.load(k_h + key_rows + offs_d[None, :] * skd, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(acc_t)
        dots += tl.sum(kt * q[None, :], axis=1)
    if acc_t == tl.float64:
        # A Python float argument is passed as fp32: the float64 scale is computed here (float64 sqrt and
        # division are correctly rounded on the GPU, as math.sqrt and 1.0 / x are on the host).
        scale = 1.0 / tl.sqrt(tl.full([], d, tl.float64))
    else:
        scale = sm_scale
    logit_cls = tl.sum(dot_cls, axis=0) * scale
    logits = tl.where(n_ok, dots * scale, float("-inf"))
    m = tl.maximum(tl.max(logits, axis=0), logit_cls)
    e = tl.exp(logits - m)  # padding lanes: exp(-inf) = 0
    p = e / (tl.sum(e, axis=0) + tl.exp(logit_cls - m))
    tl.store(p_ptr + (b * H + h) * N + offs_n, p, mask=n_ok)


@triton.jit
def _mean_heads(p_img, H, N, NP: tl.constexpr):
    """(NP,) = Σ_h P[h, :] / H in P's dtype, heads in ascending order (lanes >= N are 0). p_img = P[b]."""
    offs = tl.arange(0, NP)
    ok = offs < N
    acc = tl.zeros([NP], dtype=p_img.dtype.element_ty)
    for h in range(H):
        acc += tl.load(p_img + h * N + offs, mask=ok, other=0.0)
    return acc / H


@triton.jit
def _widen(x):
    """x in at least float32: float64 stays float64, narrower floats go to float32."""
    if x.dtype == tl.float64:
        return x
    else:
        return x.to(tl.float32)


@triton.jit
def _values(s, z, scale, HAS_NOISE: tl.constexpr):
    """Selection values in float64. s, z fp32 (or fp64 for float64 inputs); the f32*f32 product is exact in
    f64, so FMA contraction (which the compiler may apply on one call site and not another) cannot change a
    single bit. With a float64 operand the launcher turns FMA contraction off instead."""
    if HAS_NOISE:
        return s.to(tl.float64) + z.to(tl.float64) * scale
    else:
        return s.to(tl.float64)


@triton.jit
def _select_image(
    s_ptr,  # the image's scores, element n at s_ptr + n * ssn
    ssn,
    z_ptr,  # the image's noise (ignored without HAS_NOISE)
    szn,
    keep,  # num_keep of the image
    t_start,  # cu_seqlens[b]
    ids_ptr,  # packed ids_keep (int64)
    mask_ptr,  # the image's mask row (uint8 view of bool)
    inv_ptr,  # the image's inverse-map row (int32; written only with WRITE_INV)
    N,
    HAS_NOISE: tl.constexpr,
    RELATIVE: tl.constexpr,
    NP: tl.constexpr,
    BJ: tl.constexpr,
    WRITE_INV: tl.constexpr,
):
    offs = tl.arange(0, NP)
    ok = offs < N
    s = _widen(tl.load(s_ptr + offs * ssn, mask=ok, other=0.0))
    z = s
    scale = 1.0
    if HAS_NOISE:
        z = _widen(tl.load(z_ptr + offs * szn, mask=ok, other=0.0))
        if RELATIVE:
            # Range over the non-NaN scores in their precision (float32 — rounded there first, as the
            # reference computes it — or float64); 1 where it is 0 (or undefined: no number, or inf - inf).
            num = ok & (s == s)
            s_max = tl.max(tl.where(num, s, float("-inf")), axis=0)
            span = s_max - tl.min(tl.where(num, s, float("inf")), axis=0)
            scale = tl.where(span > 0, span, 1.0).to(tl.float64)
    v = _values(s, z, scale, HAS_NOISE)
    # NaN ranks as -inf: the ranks stay a permutation, every image writes exactly num_keep ids.
    v = tl.where(v != v, float("-inf"), v)

    # rank[i] = #{j : v[j] > v[i] or (v[j] == v[i] and j < i)}, counted over (NP, BJ) tiles. The j-side
    # values are recomputed from memory (same formula, same bits): a register vector cannot be sliced.
    rank = tl.zeros([NP], dtype=tl.int32)
    for j0 in range(0, N, BJ):
        offs_j = j0 + tl.arange(0, BJ)
        j_ok = offs_j < N
        s_j = _widen(tl.load(s_ptr + offs_j * ssn, mask=j_ok, other=0.0))
        z_j = s_j
        if HAS_NOISE:
            z_j = _widen(tl.load(z_ptr + offs_j * szn, mask=j_ok, other=0.0))
        v_j = _values(s_j, z_j, scale, HAS_NOISE)
        v_j = tl.where(v_j != v_j, float("-inf"), v_j)
        # Float compares: -0.0 == +0.0, so signed zeros tie and fall back to index order.
        tie = (v_j[None, :] == v[:, None]) & (offs_j[None, :] < offs[:, None])
        before = (v_j[None, :] > v[:, None]) | tie
        rank += tl.sum((before & j_ok[None, :]).to(tl.int32), axis=1)

    masked = rank < (N - keep)
    kept = ok & (rank >= (N - keep))
    tl.store(mask_ptr + offs, masked.to(tl.uint8), mask=ok)
    kept_i = kept.to(tl.int32)
    slot = t_start + tl.cumsum(kept_i, axis=0) - kept_i  # exclusive prefix count: ascending ids
    tl.store(ids_ptr + slot, offs.to(tl.int64), mask=kept)
    if WRITE_INV:
        tl.store(inv_ptr + offs, tl.where(kept, slot, -1).to(tl.int32), mask=ok)


@triton.jit
def _scores_mean_kernel(p_ptr, out_ptr, H, N, NP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, NP)
    tl.store(out_ptr + b * N + offs, _mean_heads(p_ptr + b * H * N, H, N, NP), mask=offs < N)


@triton.jit
def _select_kernel(
    s_ptr, ssb, ssn, z_ptr, szb, szn, keep_ptr, skp, cu_ptr, ids_ptr, mask_ptr, N,
    HAS_NOISE: tl.constexpr, RELATIVE: tl.constexpr, NP: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    keep = tl.load(keep_ptr + b * skp)
    t_start = tl.load(cu_ptr + b)
    _select_image(
        s_ptr + b * ssb, ssn, z_ptr + b * szb, szn, keep, t_start, ids_ptr, mask_ptr + b * N, mask_ptr, N,
        HAS_NOISE, RELATIVE, NP, BJ, False,
    )  # fmt: skip


@triton.jit
def _rank_kernel(
    p_ptr, s_ptr, z_ptr, szb, szn, keep_ptr, skp, cu_ptr, ids_ptr, mask_ptr, inv_ptr, H, N,
    HAS_NOISE: tl.constexpr, RELATIVE: tl.constexpr, NP: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    # grid (B,): the head mean goes through a (B, N) fp32 scratch row (L1/L2-resident) because the
    # pairwise rank re-reads it in chunks; the barrier makes this program's stores visible to all of
    # its threads.
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, NP)
    tl.store(s_ptr + b * N + offs, _mean_heads(p_ptr + b * H * N, H, N, NP), mask=offs < N)
    tl.debug_barrier()
    keep = tl.load(keep_ptr + b * skp)
    t_start = tl.load(cu_ptr + b)
    _select_image(
        s_ptr + b * N, 1, z_ptr + b * szb, szn, keep, t_start, ids_ptr, mask_ptr + b * N, inv_ptr + b * N, N,
        HAS_NOISE, RELATIVE, NP, BJ, True,
    )  # fmt: skip


def score_dtype(*inputs: torch.Tensor | None) -> torch.dtype:
    """The precision scores are computed and returned in: float64 if any input is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in inputs) else torch.float32


def _fp_fusion(*inputs: torch.Tensor | None) -> bool:
    # A float64 operand makes the selection's f64 product inexact, so FMA contraction would round
    # differently from the reference's multiply + add: it is turned off for such launches.
    return score_dtype(*inputs) != torch.float64


def _head_probs(q_cls: torch.Tensor, k: torch.Tensor, probs: torch.Tensor) -> None:
    """probs (B, H, N) fp32 (fp64 for float64 inputs) <- per-head CLS attention over the patches."""
    B, H, d = q_cls.shape
    N = k.shape[2] - 1
    cfg = _launch_config(N, d, max(q_cls.element_size(), k.element_size()))
    _head_probs_kernel[(B, H)](
        q_cls, *q_cls.stride(), k, *k.stride(), probs, H, N, d, 1.0 / math.sqrt(d),
        NP=cfg["NP"], BDH=cfg["BDH"], num_warps=cfg["num_warps"],
    )  # fmt: skip


def cls_attention_scores(q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q_cls (B, H, d), k (B, H, 1+N, d) any float dtype and strides -> scores (B, N) float32 (float64 when
    either input is float64).

    Per head softmax(q·kᵀ/sqrt(d)) over all 1+N keys (fp32 or fp64 accumulation), CLS column dropped, mean
    over heads. Two launches — the fused op's head kernel, then the head mean — so the scores are
    bit-identical to the ones :func:`abmg_mask_and_gather` ranks.
    """
    B, H, d = q_cls.shape
    N = k.shape[2] - 1
    acc = score_dtype(q_cls, k)
    out = torch.empty((B, N), dtype=acc, device=q_cls.device)
    if out.numel() == 0:
        return out
    probs = torch.empty((B, H, N), dtype=acc, device=q_cls.device)
    _head_probs(q_cls, k, probs)
    cfg = _launch_config(N, 1)
    _scores_mean_kernel[(B,)](probs, out, H, N, NP=cfg["NP"], num_warps=cfg["num_warps"])
    return out


def _noise_args(scores: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, int, int]:
    # Without noise the kernel never reads the pointer (HAS_NOISE=False); pass any valid tensor.
    if noise is None:
        return scores, 0, 0
    return noise, noise.stride(0), noise.stride(1)


def abmg_select(
    scores: torch.Tensor,
    num_keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    total: int,
    noise: torch.Tensor | None,
    relative_noise: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (B, N) float, num_keep (B,) int32/int64 any stride, cu_seqlens (B+1,) int32 (its prefix sums),
    total = T = sum(num_keep), noise (B, N) or None -> (ids_keep (T,) int64, mask (B, N) bool).

    One program per image; see the module docstring for the exact ranking rule.
    """
    B, N = scores.shape
    ids = torch.empty((total,), dtype=torch.int64, device=scores.device)
    mask = torch.empty((B, N), dtype=torch.bool, device=scores.device)
    if mask.numel() == 0:
        return ids, mask
    z, szb, szn = _noise_args(scores, noise)
    cfg = _launch_config(N, 1)
    _select_kernel[(B,)](
        scores, scores.stride(0), scores.stride(1), z, szb, szn, num_keep, num_keep.stride(0), cu_seqlens.contiguous(),
        ids, mask.view(torch.uint8), N, HAS_NOISE=noise is not None, RELATIVE=bool(relative_noise),
        NP=cfg["NP"], BJ=cfg["BJ"], num_warps=cfg["num_warps"], enable_fp_fusion=_fp_fusion(scores, noise),
    )  # fmt: skip
    return ids, mask


def abmg_mask_and_gather(
    q_cls: torch.Tensor,
    k: torch.Tensor,
    x: torch.Tensor,
    num_keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    total: int,
    noise: torch.Tensor | None,
    relative_noise: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores + selection + gather in three launches, no host sync (see the module docstring).

    q_cls (B, H, d), k (B, H, 1+N, d), x (B, N, D), num_keep (B,) int32/int64 any stride, cu_seqlens (B+1,) int32,
    total = T, noise (B, N) or None -> (visible (T, D) in x.dtype, ids_keep (T,) int64, mask (B, N) bool,
    inv (B, N) int32: the packed row of each kept patch, -1 where masked — for :func:`unpack_rows`).
    Every output is written in full by the kernels (``torch.empty``).
    """
    B, H, d = q_cls.shape
    N, D = x.shape[1], x.shape[2]
    dev = x.device
    visible = torch.empty((total, D), dtype=x.dtype, device=dev)
    ids = torch.empty((total,), dtype=torch.int64, device=dev)
    mask = torch.empty((B, N), dtype=torch.bool, device=dev)
    inv = torch.empty((B, N), dtype=torch.int32, device=dev)
    if mask.numel() == 0:
        return visible, ids, mask, inv
    # One scratch allocation: the per-head rows P (B, H, N) and the head means (B, N).
    scratch = torch.empty((B * (H + 1) * N,), dtype=score_dtype(q_cls, k), device=dev)
    probs, scores = scratch[: B * H * N].view(B, H, N), scratch[B * H * N :].view(B, N)
    _head_probs(q_cls, k, probs)
    z, szb, szn = _noise_args(scores, noise)
    cu = cu_seqlens.contiguous()
    cfg = _launch_config(N, d)
    _rank_kernel[(B,)](
        probs, scores, z, szb, szn, num_keep, num_keep.stride(0), cu, ids, mask.view(torch.uint8), inv, H, N,
        HAS_NOISE=noise is not None, RELATIVE=bool(relative_noise), NP=cfg["NP"], BJ=cfg["BJ"],
        num_warps=cfg["num_warps"], enable_fp_fusion=_fp_fusion(scores, noise),
    )  # fmt: skip
    # The selection is the kernels' own (valid by construction): the gather runs without the checks.
    BD = _col_block(D)
    BR = _row_block(BD, total)
    grid = (max(1, triton.cdiv(total, BR)), max(1, triton.cdiv(D, BD)))
    _gather_kernel[grid](
        x, x.stride(0), x.stride(1), x.stride(2), ids, cu, visible, ids, B, N, total, D, B.bit_length(),
        BR=BR, BD=BD, BC=1, CHECK=False, num_warps=4,
    )  # fmt: skip
    return visible, ids, mask, inv
