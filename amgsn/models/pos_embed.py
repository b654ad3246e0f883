"""Fixed 2-D sine-cosine position embeddings, as in MAE (``util/pos_embed.py``).

Half of the channels encode the row, half the column; each half is ``[sin(p * w), cos(p * w)]``
with ``w_i = 1 / 10000^(i / (D/4))``. Computed in float64 and returned in float32.
"""

from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos (M,) -> (M, embed_dim): ``[sin(pos * omega), cos(pos * omega)]``; embed_dim must be even."""
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim must be even for a 1-D sin-cos embedding, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """2-D sin-cos table -> (grid_h * grid_w [+1], embed_dim) float32, row-major patch order.

    With ``cls_token`` a zero row is prepended for the CLS position (MAE's convention).
    ``embed_dim`` must be divisible by 4.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos embedding, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if gh < 1 or gw < 1:
        raise ValueError(f"grid_size must be positive, got {grid_size}")
    # MAE builds meshgrid(w, h): its first half encodes the column index, the second the row.
    rows = torch.arange(gh, dtype=torch.float64)[:, None].expand(gh, gw).reshape(-1)
    cols = torch.arange(gw, dtype=torch.float64)[None, :].expand(gh, gw).reshape(-1)
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float()
