"""Run an unmodified timm ``Block`` on packed (T, D) tokens, or on padded (B, L, D) tokens with a mask.

The packed runner calls the block's own sub-modules (``norm1``, ``attn.qkv``, ``attn.q_norm`` /
``k_norm``, ``attn.proj``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``)
so the parameters keep timm's names and a timm ``VisionTransformer`` can load them. Token-wise
layers act on the 2-D packed tensor; only attention needs the sequence boundaries.
"""

from __future__ import annotations

import inspect

import torch
from timm.layers import DropPath
from timm.models.vision_transformer import Block
from torch import nn

from amgsn.models.attention import PackedLayout, padded_attention_reference, varlen_attention


def _drop_path_packed(module: nn.Module, y: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Stochastic depth per *sequence* (as timm's DropPath per sample), not per packed token."""
    if not isinstance(module, DropPath):
        return module(y)
    if not module.training or module.drop_prob == 0.0:
        return y
    keep_prob = 1.0 - module.drop_prob
    keep = y.new_empty(layout.batch_size).bernoulli_(keep_prob)
    if keep_prob > 0.0 and module.scale_by_keep:
        keep.div_(keep_prob)
    return y * keep[layout.token_batch][:, None]


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


def block_forward_packed(
    block: Block, x: torch.Tensor, layout: PackedLayout, *, backend: str = "auto"
) -> torch.Tensor:
    """One pre-norm transformer block on packed tokens: x (T, D) -> (T, D).

    ``layout`` describes the sequences (see :class:`PackedLayout`); attention is restricted to each
    sequence and computed by :func:`varlen_attention` with ``backend``.
    """
    _check_no_attn_dropout(block)
    attn = block.attn
    T = x.shape[0]
    h = block.norm1(x)
    qkv = attn.qkv(h).reshape(T, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.unbind(1)  # (T, H, d) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = varlen_attention(q, k, v, layout.cu_seqlens, layout.max_seqlen, backend=backend, layout=layout)
    o = _attn_output(attn, o.reshape(T, attn.num_heads * attn.head_dim), h)
    x = x + _drop_path_packed(block.drop_path1, block.ls1(o), layout)
    x = x + _drop_path_packed(block.drop_path2, block.ls2(block.mlp(block.norm2(x))), layout)
    return x


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
