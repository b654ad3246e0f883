"""Masking policies for MAE pre-training: ABMG (attention-guided), the MRUS ratio bank and the saliency bank."""

from amgsn.masking.abmg import IMPLS, MODES, EMATeacher, MaskedBatch, MaskingPolicy
from amgsn.masking.mrus import RatioBank
from amgsn.masking.saliency_bank import SaliencyBank, SaliencyRefresh, spearman, split_views

__all__ = ["IMPLS", "MODES", "EMATeacher", "MaskedBatch", "MaskingPolicy", "RatioBank", "SaliencyBank",
           "SaliencyRefresh", "spearman", "split_views"]
