"""Masking policies for MAE pre-training: ABMG (attention-guided) and the MRUS ratio bank."""

from amgsn.masking.abmg import IMPLS, MODES, EMATeacher, MaskedBatch, MaskingPolicy
from amgsn.masking.mrus import RatioBank

__all__ = ["IMPLS", "MODES", "EMATeacher", "MaskedBatch", "MaskingPolicy", "RatioBank"]
