"""FER data sets (RAF-DB, AffectNet, FER2013, FERPlus, image folder, the synthetic set),
transforms and a class-balanced sampler (docs/method.md §5, §6).

``build_dataset(name, root, split)`` is the entry point; every data set yields
``(image, label, index)`` and exposes ``classes`` (its own label order), ``targets``,
``class_counts``, ``skipped`` and ``excluded``. The generator lives in :mod:`amgsn.data.synthetic`.
"""

from .affectnet import AffectNet
from .base import DataError, FERDataset, SkippedItem
from .classes import (
    AFFECTNET_CLASSES,
    CLASS_NAMES,
    FER2013_CLASSES,
    FERPLUS_CLASSES,
    RAFDB_CLASSES,
)
from .datasets import DATASETS, build_dataset
from .fer2013 import FER2013, FERPlus
from .folder import ImageFolderFER
from .rafdb import RafDB, SyntheticFER
from .sampler import build_balanced_sampler, inverse_frequency_weights
from .transforms import (
    TwoViewTransform,
    build_eval_transform,
    build_finetune_transform,
    build_pretrain_transform,
    build_transform,
)

__all__ = [
    "AFFECTNET_CLASSES",
    "CLASS_NAMES",
    "DATASETS",
    "FER2013_CLASSES",
    "FERPLUS_CLASSES",
    "RAFDB_CLASSES",
    "AffectNet",
    "DataError",
    "FER2013",
    "FERDataset",
    "FERPlus",
    "ImageFolderFER",
    "RafDB",
    "SkippedItem",
    "SyntheticFER",
    "TwoViewTransform",
    "build_balanced_sampler",
    "build_dataset",
    "build_eval_transform",
    "build_finetune_transform",
    "build_pretrain_transform",
    "build_transform",
    "inverse_frequency_weights",
]
