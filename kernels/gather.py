"""Triton kernels that move rows between the padded (B, N, D) layout and the packed visible layout.

Packed layout (DESIGN §3.2–3.4): image ``b`` keeps the patches ``ids_keep[cu[b]:cu[b+1]]`` (ascending,
distinct, int64) and its visible rows live at rows ``cu[b]:cu[b+1]`` of a (T, D) tensor.

* :func:`gather_visible`            x (B, N, D) -> (T, D)
* :func:`scatter_visible`           y (T, D) + mask token -> (B, N, D), each output element written once
* :func:`scatter_visible_backward`  grad (B, N, D) -> (grad_y (T, D), grad_mask_token (D,) fp32)

The launchers do not validate their arguments (``amgsn.ops`` does). Copies are bit-exact in any dtype;
only the mask-token gradient does arithmetic (fp32 accumulation, deterministic: no float atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gather_visible", "scatter_visible", "scatter_visible_backward"]

# Tile shapes, checked with ptxas -v for sm_90 (bf16, unit D stride): 16 rows x up to 256 columns stays
# near 100 registers per thread without spills (32 rows x 256 reaches 218-254), so several CTAs fit on
# an SM. Narrow rows (small D) take more rows per tile instead. 256 bf16 columns = 512-byte row reads.
_NUM_WARPS = 4


def _col_block(D: int) -> int:
    """Column block of the copy tiles: the whole row up to 256 elements, then a loop over D."""
    return min(triton.next_power_of_2(max(D, 1)), 256)


def _row_block(BD: int, rows: int) -> int:
    """Row block matching :func:`_col_block`: 16 rows at BD >= 64, up to 128 for narrow rows."""
    return max(1, min(max(16, 1024 // BD), 128, triton.next_power_of_2(max(rows, 1))))


@triton.jit
def _copy_rows(
    src_ptr,  # image base of x: row n at src_ptr + n * s_n
    s_n,
    s_d,
    ids_ptr,  # packed kept indices (int64)
    t_start,  # first packed row to copy (int32)
    t_end,  # one past the last packed row to copy (int32)
    dst_ptr,  # packed output base: row t at dst_ptr + t * dst_st
    dst_st,
    D,
    BR: tl.constexpr,
    BD: tl.constexpr,
):
    """dst[t, :] = src[ids[t], :] for t in [t_start, t_end). Shared by the gather and the fused kernel."""
    for t0 in range(t_start, t_end, BR):
        offs_t = t0 + tl.arange(0, BR)
        row_ok = offs_t < t_end
        rows = tl.load(ids_ptr + offs_t, mask=row_ok, other=0).to(tl.int64)
        src_rows = src_ptr + rows[:, None] * s_n
        dst_rows = dst_ptr + offs_t.to(tl.int64)[:, None] * dst_st
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            m = row_ok[:, None] & (offs_d < D)[None, :]
            val = tl.load(src_rows + offs_d[None, :] * s_d, mask=m)
            tl.store(dst_rows + offs_d[None, :], val, mask=m)


@triton.jit
def _find_rows(ids_ptr, t_start, t_end, offs_n, n_iter):
    """For each patch index in ``offs_n`` (int32 vector), its packed row among the image's sorted kept
    ids ``ids[t_start:t_end]`` -> (row, kept). A vectorised lower-bound binary search: ``n_iter`` =
    bit_length(max kept count) halvings empty every interval, so the result is exact."""
    lo = tl.zeros_like(offs_n) + t_start
    hi = tl.zeros_like(offs_n) + t_end
    for _ in range(n_iter):
        active = lo < hi
        mid = (lo + hi) >> 1
        v = tl.load(ids_ptr + mid, mask=active, other=0)
        right = active & (v < offs_n)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (v >= offs_n), mid, hi)
    in_range = lo < t_end
    found = tl.load(ids_ptr + lo, mask=in_range, other=-1)
    return lo, in_range & (found == offs_n)


@triton.jit
def _gather_kernel(
    x_ptr,
    sxb,
    sxn,
    sxd,
    ids_ptr,
    cu_ptr,
    out_ptr,
    D,
    BR: tl.constexpr,
    BD: tl.constexpr,
):
    # grid (B, cdiv(max_seqlen, BR)): program (b, r) copies packed rows [cu[b] + r*BR, ...) of image b.
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b)
    end = tl.load(cu_ptr + b + 1)
    t0 = start + tl.program_id(1) * BR
    t1 = tl.minimum(t0 + BR, end)
    _copy_rows(x_ptr + b.to(tl.int64) * sxb, sxn, sxd, ids_ptr, t0, t1, out_ptr, D, D, BR, BD)


@triton.jit
def _scatter_kernel(
    y_ptr,
    syt,
    syd,
    ids_ptr,
    cu_ptr,
    tok_ptr,
    out_ptr,
    N,
    D,
    n_iter,
    BN: tl.constexpr,
    BD: tl.constexpr,
):
    # grid (B, cdiv(N, BN)): program (b, j) writes out[b, j*BN : (j+1)*BN, :] — every element once,
    # either from y (kept patch) or the mask token, so no separate fill pass is needed.
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b)
    end = tl.load(cu_ptr + b + 1)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    rows, kept = _find_rows(ids_ptr, start, end, offs_n, n_iter)
    kept = kept & n_ok
    src_rows = y_ptr + rows.to(tl.int64)[:, None] * syt
    dst_rows = out_ptr + (b.to(tl.int64) * N + offs_n)[:, None] * D
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        d_ok = offs_d < D
        tok = tl.load(tok_ptr + offs_d, mask=d_ok)
        val = tl.load(src_rows + offs_d[None, :] * syd, mask=kept[:, None] & d_ok[None, :])
        val = tl.where(kept[:, None], val, tok[None, :])
        tl.store(dst_rows + offs_d[None, :], val, mask=n_ok[:, None] & d_ok[None, :])


@triton.jit
def _scatter_bwd_kernel(
    g_ptr,
    sgb,
    sgn,
    sgd,
    ids_ptr,
    cu_ptr,
    gy_ptr,
    part_ptr,
    N,
    D,
    n_iter,
    BN: tl.constexpr,
    BD: tl.constexpr,
):
    # grid (B, cdiv(D, BD)): program (b, c) reads grad[b, :, cols] once: kept rows go to grad_y, masked
    # rows are summed (fp32, fixed order) into the per-image partial part[b, cols].
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = offs_d < D
    start = tl.load(cu_ptr + b)
    end = tl.load(cu_ptr + b + 1)
    g_img = g_ptr + b.to(tl.int64) * sgb
    acc = tl.zeros([BD], dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_ok = offs_n < N
        rows, kept = _find_rows(ids_ptr, start, end, offs_n, n_iter)
        kept = kept & n_ok
        m = n_ok[:, None] & d_ok[None, :]
        g = tl.load(g_img + offs_n.to(tl.int64)[:, None] * sgn + offs_d[None, :] * sgd, mask=m, other=0.0)
        tl.store(gy_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :], g, mask=kept[:, None] & m)
        acc += tl.sum(tl.where(kept[:, None], 0.0, g.to(tl.float32)), axis=0)
    tl.store(part_ptr + b.to(tl.int64) * D + offs_d, acc, mask=d_ok)


def gather_visible(
    x: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    """x (B, N, D) any float dtype, any strides -> (T, D) contiguous: ``out[t] = x[b(t), ids_keep[t]]``.

    ids_keep (T,) int64, cu_seqlens (B+1,) int32 on x's device; max_seqlen = max kept count (host int).
    """
    B, _, D = x.shape
    T = ids_keep.shape[0]
    out = torch.empty((T, D), dtype=x.dtype, device=x.device)
    if T == 0 or D == 0:
        return out
    BD = _col_block(D)
    BR = _row_block(BD, max_seqlen)
    grid = (B, triton.cdiv(max_seqlen, BR))
    _gather_kernel[grid](
        x, x.stride(0), x.stride(1), x.stride(2), ids_keep, cu_seqlens, out, D,
        BR=BR, BD=BD, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out


def scatter_visible(
    y: torch.Tensor,
    ids_keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mask_token: torch.Tensor,
    N: int,
    max_seqlen: int,
) -> torch.Tensor:
    """y (T, D), mask_token (D,) -> (B, N, D) contiguous in y.dtype: ``out[b, ids_keep[t]] = y[t]``,
    ``mask_token`` (cast to y.dtype, as the reference does) at every other position."""
    B = cu_seqlens.shape[0] - 1
    D = y.shape[1]
    out = torch.empty((B, N, D), dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    # Casting here (D elements) matches the reference's ``mask_token.to(y.dtype)`` rounding exactly.
    tok = mask_token.to(y.dtype).contiguous()
    BD = _col_block(D)
    BN = _row_block(BD, N)
    grid = (B, triton.cdiv(N, BN))
    _scatter_kernel[grid](
        y, y.stride(0), y.stride(1), ids_keep, cu_seqlens, tok, out, N, D, int(max_seqlen).bit_length(),
        BN=BN, BD=BD, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out


def scatter_visible_backward(
    grad_out: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor, N: int, max_seqlen: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out (B, N, D) -> (grad_y (T, D) in grad_out.dtype, grad_mask_token (D,) float32).

    grad_mask_token = sum of grad_out over masked positions, accumulated in fp32: per-image partials
    (B, D) from the kernel, then one ``torch.sum`` — deterministic, no float atomics.
    """
    B, _, D = grad_out.shape
    T = ids_keep.shape[0]
    grad_y = torch.empty((T, D), dtype=grad_out.dtype, device=grad_out.device)
    partial = torch.zeros((B, D), dtype=torch.float32, device=grad_out.device)
    if B > 0 and D > 0 and N > 0:
        # 32 x 128 tiles (~94 registers): each program loops over all N rows of its column block.
        BD = min(_col_block(D), 128)
        BN = max(32, _row_block(BD, N))
        grid = (B, triton.cdiv(D, BD))
        g = grad_out
        _scatter_bwd_kernel[grid](
            g, g.stride(0), g.stride(1), g.stride(2), ids_keep, cu_seqlens, grad_y, partial, N, D,
            int(max_seqlen).bit_length(), BN=BN, BD=BD, num_warps=_NUM_WARPS,
        )  # fmt: skip
    return grad_y, partial.sum(dim=0)
