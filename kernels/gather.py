"""Triton kernels that move rows between the padded (B, N, D) layout and the packed visible layout.

Packed layout (docs/method.md §3.2–3.4): image ``b`` keeps the patches ``ids_keep[cu[b]:cu[b+1]]`` (distinct,
int64; ascending when they come from a selection) and its visible rows live at rows ``cu[b]:cu[b+1]``
of a (T, D) tensor.

* :func:`gather_visible`            x (B, N, D) -> (T, D)
* :func:`scatter_visible`           y (T, D) + mask token -> (B, N, D), each output element written once
* :func:`scatter_visible_backward`  grad (B, N, D) -> (grad_y (T, D), grad_mask_token (D,) fp32)
* :func:`unpack_rows`               y (T, D) + the fused op's inverse map -> (B, N, D), zeros where masked

Nothing here trusts its index arguments or reads them on the host. Grids are sized from T, N and D
alone (never from a caller's ``max_seqlen``); every index is bounds-checked inside the kernels with
masked loads/stores, so bad input never reads or writes out of bounds; and what is wrong is recorded
in a one-element device flag that :func:`assert_ok` turns into an error with ``torch._assert_async``
(no host sync on CUDA; on CPU tensors — the Triton interpreter — a ValueError at once). The checks:
``cu_seqlens`` starts at 0, never decreases and ends at T; every id lies in [0, N); for the scatter,
no id repeats within an image (found from the inverse map, below).

The scatter and its backward do not search the ids: a first launch writes each image's inverse map
``inv[b, n] = t`` (packed row of patch n, -1 where masked), so the ids need not be sorted.

Copies are bit-exact in any dtype; only the mask-token gradient does arithmetic (fp32 accumulation, fp64 for float64,
deterministic: no float atomics). Index arguments may have any strides (made contiguous here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["assert_ok", "gather_visible", "inverse_map", "scatter_visible", "scatter_visible_backward", "unpack_rows"]

# Tile shapes: 16 rows x up to 256 columns per CTA of 4 warps. `amgsn kernels` (ptxas from the Triton wheel,
# Triton 3.8, sm_80-sm_90, the benchmark shapes) reports 32-40 registers for 16-bit rows and 48-56 for fp32,
# no spills, 9-16 CTAs per SM; the scatter backward's 32 x 128 tiles 48-70. Narrow rows (small D) take more
# rows per tile instead. 256 bf16 columns = 512-byte row reads.
_NUM_WARPS = 4
# cu_seqlens entries checked per step by the program that checks them. 128 made ptxas spill 32 bytes in the
# checked 16-bit gather on sm_80 (at 32 registers); 32 does not, and B + 1 = 257 entries are 9 steps.
_CU_BLOCK = 32


def _col_block(D: int) -> int:
    """Column block of the copy tiles: the whole row up to 256 elements, then a loop / grid over D."""
    return min(triton.next_power_of_2(max(D, 1)), 256)


def _row_block(BD: int, rows: int) -> int:
    """Row block matching :func:`_col_block`: 16 rows at BD >= 64, up to 128 for narrow rows."""
    return max(1, min(max(16, 1024 // BD), 128, triton.next_power_of_2(max(rows, 1))))


PACKED_ERROR = (
    "ids_keep / cu_seqlens are not a valid packed selection for N = {N}: cu_seqlens must run from 0 to "
    "len(ids_keep) = {T} without decreasing and ids_keep must hold indices in [0, N){distinct}"
)


def assert_ok(ok: torch.Tensor, message: str) -> None:
    """Raise ``message`` where the kernels cleared the one-element flag ``ok`` — without a host sync on
    CUDA (``torch._assert_async``: a device-side assert, reported at the next synchronisation). On CPU
    tensors (the Triton interpreter) the assert runs at once and is reported as the ValueError it is."""
    if ok.device.type != "cpu":
        torch._assert_async(ok, message)
        return
    try:
        torch._assert_async(ok, message)
    except RuntimeError:
        raise ValueError(message) from None


@triton.jit
def _flag(ok_ptr, bad):
    """Clear the flag where ``bad`` (any shape): every writer stores the same 0, so races are harmless."""
    tl.store(ok_ptr + bad.to(tl.int32) * 0, bad.to(tl.int32) * 0, mask=bad)


@triton.jit
def _check_cu(cu_ptr, B, T, ok_ptr, BC: tl.constexpr):
    """cu[0] == 0, cu[b] <= cu[b+1], cu[B] == T; else clear the flag."""
    for j0 in range(0, B + 1, BC):
        offs = j0 + tl.arange(0, BC)
        inside = offs <= B
        c = tl.load(cu_ptr + offs, mask=inside, other=0)
        prev = tl.load(cu_ptr + offs - 1, mask=inside & (offs > 0), other=0)
        bad = ((offs > 0) & (c < prev)) | ((offs == 0) & (c != 0)) | ((offs == B) & (c != T))
        _flag(ok_ptr, inside & bad)


@triton.jit
def _image_of_rows(cu_ptr, B, offs_t, n_iter):
    """Image of each packed row: ``#{j in [1, B] : cu[j] <= t}`` clamped to [0, B-1] (upper-bound
    binary search over cu[1:]; ``n_iter = bit_length(B)`` halvings empty every interval). With a
    malformed cu_seqlens (flagged by :func:`_check_cu`) the result is still a valid image index."""
    lo = tl.zeros_like(offs_t)
    hi = tl.zeros_like(offs_t) + B
    for _ in range(n_iter):
        active = lo < hi
        mid = (lo + hi) >> 1
        v = tl.load(cu_ptr + 1 + mid, mask=active, other=0)
        right = active & (v <= offs_t)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (v > offs_t), mid, hi)
    return tl.minimum(lo, B - 1)


@triton.jit
def _gather_kernel(
    x_ptr, sxb, sxn, sxd, ids_ptr, cu_ptr, out_ptr, ok_ptr, B, N, T, D, n_iter,
    BR: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, CHECK: tl.constexpr,
):  # fmt: skip
    # grid (cdiv(T, BR), cdiv(D, BD)): program (r, c) writes packed rows r*BR.. (all T rows are covered,
    # so the torch.empty output is fully written); a row whose id is out of range gets zeros. Without
    # CHECK (the fused op, whose selection is its own) nothing is flagged and ok_ptr is not used.
    offs_t = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = offs_t < T
    b = _image_of_rows(cu_ptr, B, offs_t, n_iter)
    ids = tl.load(ids_ptr + offs_t, mask=row_ok, other=0)
    valid = (ids >= 0) & (ids < N)
    if CHECK:
        _flag(ok_ptr, row_ok & ((ids < 0) | (ids >= N)))
    src_rows = x_ptr + b.to(tl.int64)[:, None] * sxb + tl.where(valid, ids, 0)[:, None] * sxn
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m = row_ok[:, None] & (offs_d < D)[None, :]
    val = tl.load(src_rows + offs_d[None, :] * sxd, mask=m & valid[:, None], other=0)
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * D + offs_d[None, :], val, mask=m)
    if CHECK:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            _check_cu(cu_ptr, B, T, ok_ptr, BC)


@triton.jit
def _rows_ids(ids_ptr, t0, end, N, BR: tl.constexpr):
    """Rows t0..t0+BR (those < end), their ids, and which rows hold an id in [0, N)."""
    offs_t = t0 + tl.arange(0, BR)
    row_ok = offs_t < end
    ids = tl.load(ids_ptr + offs_t, mask=row_ok, other=0)
    return offs_t, ids, row_ok & (ids >= 0) & (ids < N)


@triton.jit
def _inverse_kernel(
    ids_ptr, cu_ptr, inv_ptr, ok_ptr, B, N, T, BN: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr
):
    # grid (B,): program b owns inv[b, :] = packed row of each patch, -1 where masked. It writes -1
    # everywhere, then its rows' slots, then reads them back: a slot holding another row means that
    # id is repeated within the image (only one of the stores survives). The barriers make the
    # program's own global stores visible to all of its threads.
    b = tl.program_id(0)
    inv_b = inv_ptr + b.to(tl.int64) * N
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        tl.store(inv_b + offs_n, tl.full([BN], -1, tl.int32), mask=offs_n < N)
    # Clamped into [0, T]: a malformed cu_seqlens (flagged below) cannot move an access out of ids.
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + b), 0), T)
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1), start), T)
    tl.debug_barrier()
    for t0 in range(start, end, BR):
        offs_t, ids, valid = _rows_ids(ids_ptr, t0, end, N, BR)
        _flag(ok_ptr, (offs_t < end) & ~valid)
        tl.store(inv_b + ids, offs_t, mask=valid)
    tl.debug_barrier()
    for t0 in range(start, end, BR):
        offs_t, ids, valid = _rows_ids(ids_ptr, t0, end, N, BR)
        got = tl.load(inv_b + ids, mask=valid, other=0)
        _flag(ok_ptr, valid & (got != offs_t))
    if b == 0:
        _check_cu(cu_ptr, B, T, ok_ptr, BC)


@triton.jit
def _scatter_kernel(
    y_ptr, syt, syd, inv_ptr, tok_ptr, out_ptr, N, D, BN: tl.constexpr, BD: tl.constexpr,
    HAS_TOKEN: tl.constexpr,
):  # fmt: skip
    # grid (B, cdiv(N, BN), cdiv(D, BD)): program (b, j, c) writes out[b, j*BN.., c*BD..] — every element
    # once, from y (kept patch) or the mask token (zeros without HAS_TOKEN), so no fill pass is needed.
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    rows = tl.load(inv_ptr + b * N + offs_n, mask=n_ok, other=-1)
    kept = rows >= 0
    offs_d = tl.program_id(2) * BD + tl.arange(0, BD)
    d_ok = offs_d < D
    val = tl.load(y_ptr + rows.to(tl.int64)[:, None] * syt + offs_d[None, :] * syd, mask=kept[:, None] & d_ok[None, :])
    if HAS_TOKEN:
        tok = tl.load(tok_ptr + offs_d, mask=d_ok)
        val = tl.where(kept[:, None], val, tok[None, :])
    else:
        val = tl.where(kept[:, None], val, tl.zeros_like(val))
    tl.store(out_ptr + (b * N + offs_n)[:, None] * D + offs_d[None, :], val, mask=n_ok[:, None] & d_ok[None, :])


@triton.jit
def _scatter_bwd_kernel(
    g_ptr, sgb, sgn, sgd, inv_ptr, gy_ptr, part_ptr, N, D, BN: tl.constexpr, BD: tl.constexpr
):  # fmt: skip
    # grid (B, cdiv(D, BD)): program (b, c) reads grad[b, :, cols] once: kept rows go to grad_y, masked
    # rows are summed (in part's dtype: fp32, fp64 for float64 gradients; fixed order) into the per-image
    # partial part[b, cols].
    acc_t = part_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = offs_d < D
    g_img = g_ptr + b * sgb
    acc = tl.zeros([BD], dtype=acc_t)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_ok = offs_n < N
        rows = tl.load(inv_ptr + b * N + offs_n, mask=n_ok, other=-1)
        kept = rows >= 0
        m = n_ok[:, None] & d_ok[None, :]
        g = tl.load(g_img + offs_n.to(tl.int64)[:, None] * sgn + offs_d[None, :] * sgd, mask=m, other=0.0)
        tl.store(gy_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :], g, mask=kept[:, None] & m)
        acc += tl.sum(tl.where(kept[:, None], 0.0, g.to(acc_t)), axis=0)
    tl.store(part_ptr + b * D + offs_d, acc, mask=d_ok)


def _new_flag(device: torch.device) -> torch.Tensor:
    return torch.ones((1,), dtype=torch.int32, device=device)


def gather_visible(x: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) any float dtype, any strides -> (T, D) contiguous: ``out[t] = x[b(t), ids_keep[t]]``.

    ids_keep (T,) int64, cu_seqlens (B+1,) int32 on x's device, checked on the device (see module doc).
    Launches: the flag, the kernel, the assert.
    """
    B, N, D = x.shape
    T = ids_keep.shape[0]
    out = torch.empty((T, D), dtype=x.dtype, device=x.device)
    if B == 0:
        return out
    ids, cu = ids_keep.contiguous(), cu_seqlens.contiguous()
    ok = _new_flag(x.device)
    BD = _col_block(D)
    BR = _row_block(BD, T)
    grid = (max(1, triton.cdiv(T, BR)), max(1, triton.cdiv(D, BD)))
    _gather_kernel[grid](
        x, x.stride(0), x.stride(1), x.stride(2), ids, cu, out, ok, B, N, T, D, B.bit_length(),
        BR=BR, BD=BD, BC=_CU_BLOCK, CHECK=True, num_warps=_NUM_WARPS,
    )  # fmt: skip
    assert_ok(ok, PACKED_ERROR.format(N=N, T=T, distinct=""))
    return out


def inverse_map(ids_keep: torch.Tensor, cu_seqlens: torch.Tensor, N: int) -> torch.Tensor:
    """(B, N) int32: ``inv[b, ids_keep[t]] = t`` for image b's rows, -1 at masked patches. Checks the
    selection on the device (ids in [0, N), distinct within an image; cu_seqlens from 0 to T)."""
    B, T = cu_seqlens.shape[0] - 1, ids_keep.shape[0]
    inv = torch.empty((B, N), dtype=torch.int32, device=ids_keep.device)
    if inv.numel() == 0:
        return inv
    ok = _new_flag(ids_keep.device)
    BN = min(triton.next_power_of_2(N), 1024)
    BR = min(triton.next_power_of_2(max(T, 1)), 256)
    _inverse_kernel[(B,)](
        ids_keep.contiguous(), cu_seqlens.contiguous(), inv, ok, B, N, T, BN=BN, BR=BR, BC=_CU_BLOCK,
        num_warps=_NUM_WARPS,
    )  # fmt: skip
    assert_ok(ok, PACKED_ERROR.format(N=N, T=T, distinct=", each at most once per image"))
    return inv


def scatter_visible(
    y: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor, mask_token: torch.Tensor, N: int
) -> torch.Tensor:
    """y (T, D), mask_token (D,) -> (B, N, D) contiguous in y.dtype: ``out[b, ids_keep[t]] = y[t]``,
    ``mask_token`` (cast to y.dtype, as the reference does) at every other position.
    Launches: the flag, the inverse map, the assert, the token cast, the scatter."""
    B = cu_seqlens.shape[0] - 1
    D = y.shape[1]
    out = torch.empty((B, N, D), dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    inv = inverse_map(ids_keep, cu_seqlens, N)
    # Casting here (D elements) matches the reference's ``mask_token.to(y.dtype)`` rounding exactly.
    tok = mask_token.to(y.dtype).contiguous()
    BD = _col_block(D)
    BN = _row_block(BD, N)
    grid = (B, triton.cdiv(N, BN), triton.cdiv(D, BD))
    _scatter_kernel[grid](
        y, y.stride(0), y.stride(1), inv, tok, out, N, D, BN=BN, BD=BD, HAS_TOKEN=True, num_warps=_NUM_WARPS
    )
    return out


def unpack_rows(y: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """y (T, D) any strides, inv (B, N) int32 from the fused op (packed row of each kept patch, -1 where
    masked) -> (B, N, D) in y.dtype: ``out[b, n] = y[inv[b, n]]``, zeros where masked. The fused op's
    backward: one launch, no token, no flag (the map is the forward kernel's own, valid by construction)."""
    B, N = inv.shape
    D = y.shape[1]
    out = torch.empty((B, N, D), dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    BD = _col_block(D)
    BN = _row_block(BD, N)
    grid = (B, triton.cdiv(N, BN), triton.cdiv(D, BD))
    _scatter_kernel[grid](
        y, y.stride(0), y.stride(1), inv.contiguous(), y, out, N, D, BN=BN, BD=BD, HAS_TOKEN=False,
        num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out


def scatter_visible_backward(
    grad_out: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor, N: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out (B, N, D) -> (grad_y (T, D) in grad_out.dtype, grad_mask_token (D,) float32, float64 for a
    float64 grad_out).

    grad_mask_token = sum of grad_out over masked positions, accumulated in that dtype: per-image partials
    (B, D) from the kernel, then one ``torch.sum`` — deterministic, no float atomics.
    """
    B, _, D = grad_out.shape
    T = ids_keep.shape[0]
    grad_y = torch.empty((T, D), dtype=grad_out.dtype, device=grad_out.device)
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    if B == 0 or D == 0 or N == 0:
        return grad_y.zero_(), torch.zeros((D,), dtype=acc, device=grad_out.device)
    inv = inverse_map(ids_keep, cu_seqlens, N)
    partial = torch.empty((B, D), dtype=acc, device=grad_out.device)
    # 32 x 128 tiles (48-70 registers, `amgsn kernels`): each program loops over all N rows of its column block.
    BD = min(_col_block(D), 128)
    BN = max(32, _row_block(BD, N))
    g = grad_out
    _scatter_bwd_kernel[(B, triton.cdiv(D, BD))](
        g, g.stride(0), g.stride(1), g.stride(2), inv, grad_y, partial, N, D, BN=BN, BD=BD, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return grad_y, partial.sum(dim=0)
