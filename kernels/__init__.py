"""Triton kernels of the masking operators (installed as ``amgsn.kernels``; DESIGN §3.1–3.5).

Plain launchers, no argument validation: ``amgsn.ops`` validates and calls them on CUDA tensors. With
``TRITON_INTERPRET=1`` they also run on CPU tensors (the test-suite does this).
"""

from .abmg import abmg_mask_and_gather, abmg_select, cls_attention_scores
from .gather import gather_visible, scatter_visible, scatter_visible_backward

__all__ = [
    "abmg_mask_and_gather",
    "abmg_select",
    "cls_attention_scores",
    "gather_visible",
    "scatter_visible",
    "scatter_visible_backward",
]
