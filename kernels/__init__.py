"""Triton kernels of the masking operators (installed as ``amgsn.kernels``; docs/method.md §3.1–3.5).

Plain launchers: ``amgsn.ops`` validates shapes and dtypes and calls them on CUDA tensors (and on CPU
tensors with ``AMGSN_TRITON_ON_CPU=1``). Index arguments are checked inside the kernels, without a
host sync (``gather.assert_ok``). With ``TRITON_INTERPRET=1`` they also run on CPU tensors.
"""

from .abmg import abmg_mask_and_gather, abmg_select, cls_attention_scores
from .gather import assert_ok, gather_visible, inverse_map, scatter_visible, scatter_visible_backward, unpack_rows

__all__ = [
    "abmg_mask_and_gather",
    "abmg_select",
    "assert_ok",
    "cls_attention_scores",
    "gather_visible",
    "inverse_map",
    "unpack_rows",
    "scatter_visible",
    "scatter_visible_backward",
]
