"""Fine-tuning losses (docs/method.md §4.3): thin modules over :mod:`amgsn.ops`."""

from amgsn.losses.center import WEIGHTINGS, DebiasedCenterLoss, class_weights_from_counts
from amgsn.losses.supcon import SupConLoss

__all__ = ["WEIGHTINGS", "DebiasedCenterLoss", "SupConLoss", "class_weights_from_counts"]
