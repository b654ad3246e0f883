"""The repeated regions of a training step, as plain functions, and how a model runs them.

A model does not call its transformer blocks (or its decoder entry and loss) directly: it asks its
``regions`` object to run a named region (:data:`REGIONS`) with the block as an argument. The default,
:class:`Regions`, calls the function as it is (eager). ``--compile`` swaps in
:class:`amgsn.engine.compile.CompiledRegions`, which runs the same functions through ``torch.compile``
— one compiled graph per region, shared by every block of the same shape (the block's weights are
graph inputs, not constants) — see docs/method.md §9.3. The state dict never changes: nothing here is
a module.

Regions (the function, what varies between calls):

* ``encoder.attn_in`` / ``encoder.attn_out`` — a packed encoder block before / after its varlen
  attention (:func:`~amgsn.models.blocks.packed_attn_in`, ``packed_attn_out``): T rows, which change
  every step under per-image ratios (the attention itself runs between them, uncompiled);
* ``teacher.block`` — a dense block of the teacher's pass (``blocks[:-1]`` on the whole image);
* ``decoder.embed`` — ``decoder_embed``, the visible rows scattered back to their patches
  (``amgsn::scatter_visible`` inside the graph), the CLS row, position embedding;
* ``decoder.block`` — a dense decoder block;
* ``decoder.loss`` — ``decoder_norm``, ``decoder_pred`` and the per-image norm-pix loss;
* ``classifier.block`` — a block of the fine-tuning classifier (:class:`~amgsn.models.ViTClassifier`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from amgsn.models.blocks import packed_attn_in, packed_attn_out
from amgsn.ops import scatter_visible


def teacher_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A dense block of the teacher's pass: x (B, 1+N, D) -> (B, 1+N, D)."""
    return block(x)


def decoder_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A dense decoder block: x (B, 1+N, Dd) -> (B, 1+N, Dd)."""
    return block(x)


def classifier_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A block of the fine-tuning classifier: x (B, L, D) -> (B, L, D)."""
    return block(x)


def decoder_embed(embed: nn.Module, mask_token: torch.Tensor, pos_embed: torch.Tensor, latent: torch.Tensor,
                  vis_pos: torch.Tensor, cls_pos: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor,
                  num_patches: int) -> torch.Tensor:
    """The decoder's input: latent (T+B, D) packed with CLS rows at ``cls_pos`` (B,) and visible rows at
    ``vis_pos`` (T,) -> (B, 1+N, Dd): ``embed``-ded, the visible rows scattered to their patches
    (``mask_token`` elsewhere), the CLS row first, plus ``pos_embed`` (1, 1+N, Dd)."""
    y = embed(latent)
    full = scatter_visible(y.index_select(0, vis_pos), ids_keep, cu_seqlens, mask_token.reshape(-1), num_patches)
    return torch.cat([y.index_select(0, cls_pos)[:, None], full], dim=1) + pos_embed


def patchify(imgs: torch.Tensor, patch_size: int, in_chans: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches row-major, each patch (p, p, C) flattened (MAE)."""
    B, p = imgs.shape[0], patch_size
    g = imgs.shape[2] // p
    x = imgs.reshape(B, in_chans, g, p, g, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, g * g, p * p * in_chans)


def patch_losses(imgs: torch.Tensor, pred: torch.Tensor, patch_size: int, in_chans: int,
                 norm_pix: bool) -> torch.Tensor:
    """(B, N) mean squared error per patch, in float32, against (normalised) target pixels."""
    target = patchify(imgs, patch_size, in_chans).float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return (pred.float() - target).square().mean(dim=-1)


def decoder_loss(norm: nn.Module, head: nn.Module, x: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
                 patch_size: int, in_chans: int, norm_pix: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder's tail and MAE's loss: x (B, 1+N, Dd) after the decoder blocks, ``mask`` (B, N) True =
    masked -> (loss: mean over all masked patches of the batch, per-image loss (B,) float32, pred
    (B, N, p*p*C))."""
    pred = head(norm(x))[:, 1:]
    per_patch = patch_losses(imgs, pred, patch_size, in_chans, norm_pix)
    m = mask.to(per_patch.dtype)
    masked_sum = (per_patch * m).sum(dim=1)
    counts = m.sum(dim=1)
    loss = masked_sum.sum() / counts.sum().clamp_min(1.0)
    return loss, masked_sum / counts.clamp_min(1.0), pred


# name -> (function, the positions of the arguments whose dim 0 varies from call to call)
REGIONS: dict[str, tuple[Callable[..., Any], tuple[int, ...]]] = {
    "encoder.attn_in": (packed_attn_in, (1,)),  # T (+ B CLS rows)
    "encoder.attn_out": (packed_attn_out, (1, 2, 3, 4, 5)),
    "teacher.block": (teacher_block, (1,)),  # B: the batch, a bank's refreshed images, the gallery, the probe
    "decoder.embed": (decoder_embed, (3, 4, 6)),  # T
    "decoder.block": (decoder_block, ()),
    "decoder.loss": (decoder_loss, ()),
    "classifier.block": (classifier_block, (1,)),  # 2B training views, B validation, a last partial batch
}
PACKED_REGIONS = ("encoder.attn_in", "encoder.attn_out")  # whose T --compile-shapes bucket pads


class Regions:
    """Runs each region eagerly (the default; also what ``copy.deepcopy`` of a model shares)."""

    compiled = False

    def run(self, name: str, *args: Any) -> Any:
        return REGIONS[name][0](*args)

    def padded_rows(self, rows: int) -> int:
        """How many rows the packed encoder runs for ``rows`` real ones (eager: the same)."""
        return rows

    def __deepcopy__(self, memo: dict) -> Regions:
        return self  # an EMA copy of a model runs the same (compiled) regions


EAGER = Regions()
