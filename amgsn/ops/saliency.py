"""Saliency-bank operators (docs/method.md §4.4): resample per-image saliency maps through a view's crop
box and flip — bank -> view (read) and view -> bank (write, in place).

A *view* of a training image is what the pre-training transform made of it: a crop box
``(top, left, height, width)`` in fractions of the original image (timm's RandomResizedCrop
parameters divided by the image's height / width), resized to the patch grid, then flipped
horizontally or not. The bank holds one ``(Gh, Gw)`` map per image in the original image's
coordinates, on the same patch grid as the views (``N = Gh * Gw``).

Both ops are ``torch.library.custom_op``\\ s: CPU kernel = C++ (``amgsn._C``, csrc/saliency.cpp), CUDA
kernel = Triton (``amgsn.kernels.saliency``), with ``register_fake``; pure-PyTorch twins in
:mod:`amgsn.ops.reference` (``grid_sample``). ``AMGSN_TRITON_ON_CPU=1`` sends CPU tensors through the
Triton launchers (see :mod:`amgsn.ops.masking`).

Checks that need the values (index range, box sizes) run on the host for CPU tensors (ValueError naming
the argument; under ``torch.compile`` only the C++ kernels' own index checks remain). On CUDA they would
cost a host sync: there the kernels bound every bank row and report a bad index through a device-side
assert; box values are the caller's (the data pipeline's) contract. Both ops work under
``torch.compile(fullgraph=True)`` on the CPU.
"""

from __future__ import annotations

import torch

import amgsn._ext  # noqa: F401  (loads amgsn._C: registers torch.ops.amgsn._saliency_*_cpu)
from amgsn.ops._checks import check_dim, check_same_device, check_tensor
from amgsn.ops.masking import TRITON_ON_CPU

__all__ = ["saliency_bank_read", "saliency_bank_write_"]

BANK_DTYPES = (torch.float16, torch.float32, torch.float64)


def _kernels():
    from amgsn.kernels import saliency

    return saliency


def _check_views(bank: object, indices: object, boxes: object, flips: object) -> int:
    """Static + (CPU only) value checks shared by both ops; returns B."""
    check_tensor("bank", bank, ndim=3, dtypes=BANK_DTYPES)
    if not bank.is_contiguous():
        raise ValueError("bank must be contiguous (one row of Gh*Gw values per image)")
    M, Gh, Gw = bank.shape
    if M < 1 or Gh < 1 or Gw < 1:
        raise ValueError(f"bank must have M, Gh, Gw >= 1, got shape {tuple(bank.shape)}")
    check_tensor("indices", indices, ndim=1, dtypes=(torch.int64,))
    B = indices.shape[0]
    check_tensor("boxes", boxes, ndim=2, floating=True)
    check_dim("boxes", boxes, 0, B, "one box per index")
    check_dim("boxes", boxes, 1, 4, "(top, left, height, width)")
    check_tensor("flips", flips, ndim=1, dtypes=(torch.bool,))
    check_dim("flips", flips, 0, B, "one flag per index")
    check_same_device(bank=bank, indices=indices, boxes=boxes, flips=flips)
    if indices.device.type == "cpu" and B and not torch.compiler.is_compiling():  # the C++ kernels check too
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= M:
            raise ValueError(f"indices must lie in [0, {M}) (rows of the bank), got values in [{lo}, {hi}]")
        b = boxes.detach()
        if not bool(torch.isfinite(b).all()) or bool((b[:, 2:] <= 0).any()):
            raise ValueError("boxes must be finite with height > 0 and width > 0 (fractions of the image)")
    return B


# ------------------------------------------------------------------------------------ read


def _read_triton(bank: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    return _kernels().saliency_bank_read(bank, indices, boxes, flips)


@torch.library.custom_op("amgsn::saliency_bank_read", mutates_args=(), device_types="cpu")
def _read_op(bank: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    if TRITON_ON_CPU:
        return _read_triton(bank, indices, boxes, flips)
    return torch.ops.amgsn._saliency_bank_read_cpu(bank, indices, boxes, flips)


_read_op.register_kernel("cuda")(_read_triton)


@_read_op.register_fake
def _read_fake(bank, indices, boxes, flips):
    return bank.new_empty((indices.shape[0], bank.shape[1] * bank.shape[2]), dtype=torch.float32)


def saliency_bank_read(
    bank: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor
) -> torch.Tensor:
    """Each view's patch scores, resampled out of its image's bank map (docs/method.md §4.4).

    Args:
        bank: (M, Gh, Gw) float16/32/64, contiguous — one map per training image.
        indices: (B,) int64 — the bank row (dataset index) of each view.
        boxes: (B, 4) float — crop box (top, left, height, width) in fractions of the original image.
        flips: (B,) bool — the view was flipped horizontally after the crop.
    Returns:
        (B, Gh*Gw) float32: view patch (r, c) = the bank sampled bilinearly (border clamp) at the
        point of the original image its centre came from. Not differentiable.
    """
    _check_views(bank, indices, boxes, flips)
    return _read_op(bank, indices, boxes, flips)


# ------------------------------------------------------------------------------------ write


def _write_triton(bank, indices, scores, boxes, flips, fresh, alpha) -> None:
    _kernels().saliency_bank_write_(bank, indices, scores, boxes, flips, fresh, alpha)


@torch.library.custom_op("amgsn::saliency_bank_write_", mutates_args=("bank",), device_types="cpu")
def _write_op(bank: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor, boxes: torch.Tensor,
              flips: torch.Tensor, fresh: torch.Tensor, alpha: float) -> None:
    if TRITON_ON_CPU:
        _write_triton(bank, indices, scores, boxes, flips, fresh, alpha)
        return
    torch.ops.amgsn._saliency_bank_write_cpu(bank, indices, scores, boxes, flips, fresh, alpha)


_write_op.register_kernel("cuda")(_write_triton)


@_write_op.register_fake
def _write_fake(bank, indices, scores, boxes, flips, fresh, alpha) -> None:
    return None


def saliency_bank_write_(
    bank: torch.Tensor,
    indices: torch.Tensor,
    scores: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    fresh: torch.Tensor,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Warp fresh view scores back into their images' bank maps, in place (docs/method.md §4.4).

    Args:
        bank: (M, Gh, Gw) float16/32/64, contiguous — modified in place.
        indices: (B,) int64, distinct — the bank rows to refresh.
        scores: (B, Gh*Gw) float — the teacher's scores on each view's patch grid.
        boxes, flips: as for :func:`saliency_bank_read`.
        fresh: (B,) bool — the image was never written before: fill its whole map.
        alpha: in [0, 1] — how far a seen image's cells move towards the new view (1: overwrite; below
            1 the map averages over the views it was refreshed from).
    Returns:
        ``bank``. Each view's scores are min-max normalised (a constant view -> 0) and sampled
        bilinearly at each bank cell's place in the view (flipped back): ``s``. A ``fresh`` image's
        cells all take ``s`` (border extension outside the crop box); a seen image's cells whose centre
        lies inside the crop box become ``m + alpha * (s - m)``, the others keep their value.
    """
    B = _check_views(bank, indices, boxes, flips)
    check_tensor("scores", scores, ndim=2, floating=True)
    check_dim("scores", scores, 0, B, "one row per index")
    check_dim("scores", scores, 1, bank.shape[1] * bank.shape[2], "Gh*Gw of the bank")
    check_tensor("fresh", fresh, ndim=1, dtypes=(torch.bool,))
    check_dim("fresh", fresh, 0, B, "one flag per index")
    check_same_device(bank=bank, scores=scores, fresh=fresh)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
    if indices.device.type == "cpu" and B and not torch.compiler.is_compiling() and torch.unique(indices).numel() != B:
        raise ValueError("indices must be distinct (one view per bank row in one write)")
    _write_op(bank, indices, scores, boxes, flips, fresh, float(alpha))
    return bank
