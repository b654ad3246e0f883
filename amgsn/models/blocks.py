"""Run an unmodified timm ``Block`` on packed (T, D) tokens, or on padded (B, L, D) tokens with a mask.

The packed runner calls the block's own sub-modules (``norm1``, ``attn.qkv``, ``attn.q_norm`` /
``k_norm``, ``attn.proj``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``)
so the parameters keep timm's names and a timm ``VisionTransformer`` can load them. Token-wise
layers act on the 2-D packed tensor; only attention needs the sequence boundaries. The block is
split at the attention call into :func:`packed_attn_in` and :func:`packed_attn_out` — token-wise
halves whose only shape is T, which ``--compile`` compiles (:mod:`amgsn.models.regions`) while the
variable-length attention between them runs as it is.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from timm.layers import DropPath
from timm.models.vision_transformer import Block
from torch import nn

from amgsn.models.attention import PackedLayout, padded_attention_reference, varlen_attention


def drop_path_scale(module: nn.Module, layout: PackedLayout, like: torch.Tensor) -> torch.Tensor | None:
    """Stochastic depth per *sequence* (as timm's DropPath per sample), not per packed token: the
    (T, 1) factor a branch is multiplied by (0 or 1 / keep_prob), or None when ``module`` drops
    nothing. Padding sequences (``layout.pad_sequences``) draw nothing and keep their rows."""
    if not isinstance(module, DropPath) or not module.training or module.drop_prob == 0.0:
        return None
    keep_prob = 1.0 - module.drop_prob
    real = layout.batch_size - layout.pad_sequences
    keep = like.new_empty(real).bernoulli_(keep_prob)
    if keep_prob > 0.0 and module.scale_by_keep:
        keep.div_(keep_prob)
    if layout.pad_sequences:
        keep = torch.cat([keep, keep.new_ones(layout.pad_sequences)])
    return keep[layout.token_batch][:, None]


def _check_no_attn_dropout(block: Block) -> None:
    # The varlen kernels take no dropout; MAE pre-training uses none. Refuse rather than ignore it.
    if block.training and block.attn.attn_drop.p > 0:
        raise ValueError(f"attention dropout (p={block.attn.attn_drop.p}) is not supported on packed tokens")


def _attn_output(attn: nn.Module, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """timm Attention's tail after the attention product: optional norm and gate, proj, proj_drop.
    ``o`` (..., H*d) attention output, ``h`` the block input after norm1 (for the gate)."""
    norm = getattr(attn, "norm", None)  # newer timm: scale_norm; absent in older releases
    if norm is not None:
        o = norm(o)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        o = o * gate(h).sigmoid()
    return attn.proj_drop(attn.proj(o))


def packed_attn_in(
    block: Block, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block up to its attention: x (T, D) -> (q, k, v (T, H, d) each, h = norm1(x) (T, D))."""
    attn = block.attn
    T = x.shape[0]
    h = block.norm1(x)
    qkv = attn.qkv(h).reshape(T, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.unbind(1)  # (T, H, d) each
    return attn.q_norm(q), attn.k_norm(k), v, h


def packed_attn_out(
    block: Block, x: torch.Tensor, o: torch.Tensor, h: torch.Tensor, scale1: torch.Tensor | None,
    scale2: torch.Tensor | None
) -> torch.Tensor:
    """The block after its attention: x (T, D) the block input, o (T, H, d) the attention output, h
    from :func:`packed_attn_in`, ``scale1`` / ``scale2`` the stochastic-depth factors of the two
    branches (:func:`drop_path_scale`; None: no drop) -> (T, D)."""
    attn = block.attn
    o = _attn_output(attn, o.reshape(x.shape[0], attn.num_heads * attn.head_dim), h)
    y = block.ls1(o)
    x = x + (y if scale1 is None else y * scale1)
    y = block.ls2(block.mlp(block.norm2(x)))
    return x + (y if scale2 is None else y * scale2)


def block_forward_packed(
    block: Block, x: torch.Tensor, layout: PackedLayout, *, backend: str = "auto",
    attn_in: Callable = packed_attn_in, attn_out: Callable = packed_attn_out
) -> torch.Tensor:
    """One pre-norm transformer block on packed tokens: x (T, D) -> (T, D).

    ``layout`` describes the sequences (see :class:`PackedLayout`); attention is restricted to each
    sequence and computed by :func:`varlen_attention` with ``backend``. ``attn_in`` / ``attn_out``:
    the two token-wise halves (compiled ones under ``--compile``)."""
    _check_no_attn_dropout(block)
    q, k, v, h = attn_in(block, x)
    o = varlen_attention(q, k, v, layout.cu_seqlens, layout.max_seqlen, backend=backend, layout=layout)
    scale1 = drop_path_scale(block.drop_path1, layout, o)
    scale2 = drop_path_scale(block.drop_path2, layout, o)
    return attn_out(block, x, o, h, scale1, scale2)


def _accepts_attn_mask(block: Block) -> bool:
    return "attn_mask" in inspect.signature(block.forward).parameters


def block_forward_padded(block: Block, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """The reference: one block on padded tokens x (B, L, D), keys masked where ``key_valid`` (B, L)
    is False -> (B, L, D). Uses timm's own ``Block.forward(x, attn_mask=...)`` when this timm has
    it (SDPA with a boolean mask, as the anchors run it); otherwise the same computation written
    out with an explicit attention matrix."""
    if _accepts_attn_mask(block):
        return block(x, attn_mask=key_valid[:, None, None, :])
    _check_no_attn_dropout(block)
    attn = block.attn
    B, L, _ = x.shape
    h = block.norm1(x)
    qkv = attn.qkv(h).reshape(B, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, L, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = padded_attention_reference(q, k, v, key_valid).transpose(1, 2).reshape(B, L, -1)
    x = x + block.drop_path1(block.ls1(_attn_output(attn, o, h)))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x
