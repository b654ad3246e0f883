"""Public operators of amgsn (docs/method.md §3). Each works on CPU (C++) and CUDA (Triton / CUDA),
under autograd and ``torch.compile``, and has a pure-PyTorch twin in :mod:`amgsn.ops.reference`.
The drop-in functions for MAE / timm code (§3.9) live in :mod:`amgsn.ops.dropin`."""

from amgsn.ops.center_loss import (
    CenterStats,
    center_apply_,
    center_stats,
    center_update_,
    debiased_center_loss,
    debiased_center_loss_with_stats,
)
from amgsn.ops.dropin import attention_masking, from_padded, random_masking, to_padded
from amgsn.ops.masking import (
    MaskSelection,
    abmg_mask_and_gather,
    abmg_select,
    cls_attention_scores,
    gather_visible,
    scatter_visible,
)
from amgsn.ops.saliency import saliency_bank_read, saliency_bank_write_
from amgsn.ops.supcon import supcon_loss

__all__ = [
    "CenterStats",
    "MaskSelection",
    "center_apply_",
    "center_stats",
    "center_update_",
    "debiased_center_loss",
    "debiased_center_loss_with_stats",
    "saliency_bank_read",
    "saliency_bank_write_",
    "supcon_loss",
    "abmg_mask_and_gather",
    "attention_masking",
    "from_padded",
    "random_masking",
    "to_padded",
    "abmg_select",
    "cls_attention_scores",
    "gather_visible",
    "scatter_visible",
]
