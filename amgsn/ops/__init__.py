"""Public operators of amgsn (DESIGN §3). Each works on CPU (C++) and CUDA (Triton / CUDA),
under autograd and ``torch.compile``, and has a pure-PyTorch twin in :mod:`amgsn.ops.reference`."""

from amgsn.ops.masking import (
    MaskSelection,
    abmg_mask_and_gather,
    abmg_select,
    cls_attention_scores,
    gather_visible,
    scatter_visible,
)

__all__ = [
    "MaskSelection",
    "abmg_mask_and_gather",
    "abmg_select",
    "cls_attention_scores",
    "gather_visible",
    "scatter_visible",
]
