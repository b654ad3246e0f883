"""Triton kernels of the saliency bank (docs/method.md §4.4): read a batch of views out of the bank, write
refreshed views back into it. One program per view; lanes over the (Gh, Gw) patch grid.

Semantics are those of ``amgsn.ops.reference.saliency_bank_read`` / ``saliency_bank_write_`` and of the
C++ kernels (csrc/saliency.cpp): a view = crop box (top, left, height, width) in fractions of the
original image + a horizontal flip; bilinear sampling with pixel centres at ``(j + .5) / G`` and
border clamping (``grid_sample(align_corners=False, padding_mode="border")``).

* read  (``saliency_bank_read``): a stage of its own in front of select -> gather (one launch, B
  programs, no host sync). It is not fused into the ABMG select kernel (kernels/abmg.py) because
  that pipeline is being restructured by the CUDA hot-path work; the read costs one (B, N) fp32
  round trip through memory (~B·N·4 bytes: 200 KB at B=256, N=196).
* write (``saliency_bank_write_``): in place; a never-seen image takes the sampled value ``s`` in every
  cell; a seen one's cells whose centre lies inside the crop box move towards it, ``m + alpha * (s - m)``
  (``alpha`` = 1: overwrite), the others keep their value. Indices must be distinct
  (the bank deduplicates on the host): programs run in parallel.

Bank rows outside ``[0, M)`` are not accessed: such a view reads zeros / writes nothing and clears
the device flag that :func:`~amgsn.kernels.gather.assert_ok` reports without a host sync.
The launchers do not validate shapes (``amgsn.ops`` does) and accept any strides of ``boxes``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gather import _flag, assert_ok

__all__ = ["saliency_bank_read", "saliency_bank_write_"]


@triton.jit
def _bilinear(map_ptr, H, W, px, py, m):
    """Bilinear sample (fp32) of the (H, W) row-major map at pixel coordinates px, py (border clamp)."""
    px = tl.where(px == px, px, 0.0)  # NaN (a degenerate box) stays in bounds
    py = tl.where(py == py, py, 0.0)
    px = tl.minimum(tl.maximum(px, 0.0), (W - 1).to(tl.float32))
    py = tl.minimum(tl.maximum(py, 0.0), (H - 1).to(tl.float32))
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    x1 = tl.minimum(x0 + 1, W - 1)
    y1 = tl.minimum(y0 + 1, H - 1)
    wx = px - x0f
    wy = py - y0f
    a = tl.load(map_ptr + y0 * W + x0, mask=m, other=0.0).to(tl.float32)
    b = tl.load(map_ptr + y0 * W + x1, mask=m, other=0.0).to(tl.float32)
    c = tl.load(map_ptr + y1 * W + x0, mask=m, other=0.0).to(tl.float32)
    d = tl.load(map_ptr + y1 * W + x1, mask=m, other=0.0).to(tl.float32)
    top = (1.0 - wx) * a + wx * b
    bottom = (1.0 - wx) * c + wx * d
    return (1.0 - wy) * top + wy * bottom


@triton.jit
def _load_view(idx_ptr, box_ptr, sbb, sbc, flip_ptr, b, M, ok_ptr):
    """(row, row_ok, top, left, height, width, flipped) of view b; a row outside [0, M) clears the flag."""
    row = tl.load(idx_ptr + b).to(tl.int64)
    row_ok = (row >= 0) & (row < M)
    _flag(ok_ptr, ~row_ok)
    row = tl.where(row_ok, row, 0)
    top = tl.load(box_ptr + b * sbb).to(tl.float32)
    left = tl.load(box_ptr + b * sbb + sbc).to(tl.float32)
    height = tl.load(box_ptr + b * sbb + 2 * sbc).to(tl.float32)
    width = tl.load(box_ptr + b * sbb + 3 * sbc).to(tl.float32)
    flipped = tl.load(flip_ptr + b) != 0
    return row, row_ok, top, left, height, width, flipped


@triton.jit(do_not_specialize=["M", "H", "W"])
def _read_kernel(bank_ptr, idx_ptr, box_ptr, sbb, sbc, flip_ptr, out_ptr, M, H, W, ok_ptr, NP: tl.constexpr):
    b = tl.program_id(0)
    row, row_ok, top, left, height, width, flipped = _load_view(idx_ptr, box_ptr, sbb, sbc, flip_ptr, b, M, ok_ptr)
    N = H * W
    offs = tl.arange(0, NP)
    m = offs < N
    r = offs // W
    c = offs % W
    Hf = H.to(tl.float32)
    Wf = W.to(tl.float32)
    y = (r.to(tl.float32) + 0.5) / Hf
    v = top + height * y
    x = (c.to(tl.float32) + 0.5) / Wf
    x = tl.where(flipped, 1.0 - x, x)
    u = left + width * x
    val = _bilinear(bank_ptr + row * N, H, W, u * Wf - 0.5, v * Hf - 0.5, m & row_ok)
    tl.store(out_ptr + b.to(tl.int64) * N + offs, tl.where(row_ok, val, 0.0), mask=m)


@triton.jit(do_not_specialize=["M", "H", "W"])
def _write_kernel(bank_ptr, idx_ptr, score_ptr, box_ptr, sbb, sbc, flip_ptr, fresh_ptr, alpha, M, H, W, ok_ptr,
                  NP: tl.constexpr):
    b = tl.program_id(0)
    row, row_ok, top, left, height, width, flipped = _load_view(idx_ptr, box_ptr, sbb, sbc, flip_ptr, b, M, ok_ptr)
    fresh = tl.load(fresh_ptr + b) != 0
    N = H * W
    offs = tl.arange(0, NP)
    m = offs < N
    s_row = score_ptr + b.to(tl.int64) * N
    s = tl.load(s_row + offs, mask=m, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(m, s, float("inf")), axis=0)
    hi = tl.max(tl.where(m, s, float("-inf")), axis=0)
    span = hi - lo
    i = offs // W
    j = offs % W
    Hf = H.to(tl.float32)
    Wf = W.to(tl.float32)
    v = (i.to(tl.float32) + 0.5) / Hf
    y = (v - top) / height
    u = (j.to(tl.float32) + 0.5) / Wf
    x = (u - left) / width
    inside = (y >= 0.0) & (y <= 1.0) & (x >= 0.0) & (x <= 1.0)
    x = tl.where(flipped, 1.0 - x, x)
    raw = _bilinear(s_row, H, W, x * Wf - 0.5, y * Hf - 0.5, m)
    # Normalising after the (affine-invariant) interpolation = interpolating the normalised scores.
    val = tl.where(span > 0.0, (raw - lo) / tl.where(span > 0.0, span, 1.0), 0.0)
    dst = bank_ptr + row * N + offs
    write = m & row_ok & (inside | fresh)
    old = tl.load(dst, mask=write & ~fresh, other=0.0).to(tl.float32)
    val = tl.where(fresh, val, old + alpha * (val - old))
    tl.store(dst, val.to(bank_ptr.dtype.element_ty), mask=write)


def _flag_tensor(device: torch.device) -> torch.Tensor:
    return torch.ones(1, dtype=torch.int32, device=device)


def _as_int8(flags: torch.Tensor) -> torch.Tensor:
    return flags.contiguous().view(torch.int8) if flags.dtype == torch.bool else flags.contiguous()


def saliency_bank_read(bank: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor,
                       flips: torch.Tensor) -> torch.Tensor:
    """bank (M, Gh, Gw) contiguous, indices (B,) int64, boxes (B, 4) float, flips (B,) bool
    -> (B, Gh*Gw) float32."""
    M, H, W = bank.shape
    B = indices.shape[0]
    out = torch.empty((B, H * W), dtype=torch.float32, device=bank.device)
    if B == 0:
        return out
    ok = _flag_tensor(bank.device)
    NP = triton.next_power_of_2(H * W)
    _read_kernel[(B,)](bank, indices.contiguous(), boxes, boxes.stride(0), boxes.stride(1), _as_int8(flips), out,
                       M, H, W, ok, NP=NP, num_warps=4 if NP <= 256 else 8)
    assert_ok(ok, "indices must lie in [0, M) (rows of the bank)")
    return out


def saliency_bank_write_(bank: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor, boxes: torch.Tensor,
                         flips: torch.Tensor, fresh: torch.Tensor, alpha: float = 1.0) -> None:
    """In place: bank (M, Gh, Gw) contiguous, indices (B,) distinct, scores (B, Gh*Gw), boxes (B, 4),
    flips / fresh (B,) bool, alpha in [0, 1]."""
    M, H, W = bank.shape
    B = indices.shape[0]
    if B == 0:
        return
    ok = _flag_tensor(bank.device)
    NP = triton.next_power_of_2(H * W)
    _write_kernel[(B,)](bank, indices.contiguous(), scores.contiguous(), boxes, boxes.stride(0), boxes.stride(1),
                        _as_int8(flips), _as_int8(fresh), float(alpha), M, H, W, ok, NP=NP,
                        num_warps=4 if NP <= 256 else 8)
    assert_ok(ok, "indices must lie in [0, M) (rows of the bank)")
