"""The CLS query and the keys of a timm block's attention, for :func:`amgsn.ops.cls_attention_scores` /
:func:`amgsn.ops.attention_masking` (docs/method.md §3.9).

timm's ``Attention`` runs fused SDPA, so its attention matrix is never there to read; this recomputes
only what the CLS row of that matrix needs: the block's ``norm1``, the query part of ``qkv`` for the CLS
token alone, the key part for every token, and ``q_norm`` / ``k_norm`` — no values, no attention output.
"""

from __future__ import annotations

import torch
from torch import nn

from amgsn.ops._checks import FLOAT_DTYPES, check_tensor

__all__ = ["cls_query_keys"]


def _split(block: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """-> (attention module, the norm applied before it or None)."""
    attn = getattr(block, "attn", None)
    if attn is not None and isinstance(getattr(attn, "qkv", None), nn.Linear):
        return attn, getattr(block, "norm1", None)
    if isinstance(getattr(block, "qkv", None), nn.Linear):
        return block, None
    raise TypeError(
        f"block must be a timm Block (norm1 + attn) or Attention with a fused qkv Linear, got {type(block).__name__}"
    )


def cls_query_keys(
    block: nn.Module, x: torch.Tensor, *, all_queries: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS query and the keys that ``block``'s attention computes on input ``x``.

    Args:
        block: a timm ``Block`` (its ``norm1`` is applied first) or a timm ``Attention`` — any head
            count, fused ``qkv`` with or without bias, ``qk_norm`` or not.
        x: (B, 1+N, D) the block's input, CLS token first (for a ``Block``: before ``norm1``).
        all_queries: also return every token's query (B, H, 1+N, d) instead of the CLS one (for the
            anchors' full attention matrix, :func:`amgsn.ops.reference.cls_attention_scores_full`).
    Returns:
        ``(q_cls (B, H, d), k (B, H, 1+N, d))`` in the layer's output dtype — the q and k of timm's
        ``Attention.forward`` (after ``q_norm`` / ``k_norm``, before the scale). Differentiable; call under
        ``torch.no_grad()`` for a teacher.
    """
    attn, norm = _split(block)
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    B, L, D = x.shape
    if L < 2:
        raise ValueError(f"x must be (B, 1+N, D) with the CLS token first and N >= 1, got {tuple(x.shape)}")
    if D != attn.qkv.in_features:
        raise ValueError(f"x must have D = {attn.qkv.in_features} features (the block's width), got {tuple(x.shape)}")
    H, d = attn.num_heads, attn.head_dim
    width = H * d
    if attn.qkv.out_features != 3 * width:
        raise TypeError(f"block's qkv must produce 3 * heads * head_dim = {3 * width} features, "
                        f"got {attn.qkv.out_features}")
    h = norm(x) if norm is not None else x
    w, b = attn.qkv.weight, attn.qkv.bias
    b_q, b_k = (None, None) if b is None else (b[:width], b[width : 2 * width])
    k = nn.functional.linear(h, w[width : 2 * width], b_k).reshape(B, L, H, d).transpose(1, 2)
    q = nn.functional.linear(h if all_queries else h[:, :1], w[:width], b_q).reshape(B, -1, H, d).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return (q if all_queries else q[:, :, 0]), k
