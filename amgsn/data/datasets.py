"""``build_dataset``: one entry point for every supported FER data set (docs/method.md §5)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .affectnet import AffectNet
from .base import FERDataset
from .fer2013 import FER2013, FERPlus
from .folder import ImageFolderFER
from .rafdb import RafDB, SyntheticFER

DATASETS: dict[str, type[FERDataset]] = {
    "rafdb": RafDB,
    "affectnet": AffectNet,
    "fer2013": FER2013,
    "ferplus": FERPlus,
    "folder": ImageFolderFER,
    "synthetic": SyntheticFER,
}
# Data sets whose number of classes is fixed (the others take num_classes as an option).
_FIXED_CLASSES = {"rafdb": 7, "synthetic": 7, "fer2013": 7}


def build_dataset(
    name: str,
    root: str | os.PathLike,
    split: str,
    *,
    num_classes: int | None = None,
    transform: Callable | None = None,
    skip_bad: bool = False,
    **kwargs: Any,
) -> FERDataset:
    """Build data set ``name`` (``rafdb``, ``affectnet``, ``fer2013``, ``ferplus``, ``folder``,
    ``synthetic``) from ``root`` for ``split``.

    ``ds[i] -> (image, label, i)``: an RGB ``PIL.Image`` (or ``transform(image)``), the label in
    the data set's own order (``ds.classes``), and the sample index. ``num_classes`` selects
    AffectNet / FERPlus 7 or 8 classes and is checked against the others. Extra keyword arguments
    go to the data set class (``cache``, ``crop_face``, ``classes`` for ``folder``, ...).
    """
    if not isinstance(name, str) or name.lower() not in DATASETS:
        raise ValueError(f"name must be one of {sorted(DATASETS)}, got {name!r}")
    name = name.lower()
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
        raise TypeError(f"num_classes must be an int or None, got {type(num_classes).__name__}")
    cls = DATASETS[name]
    if name in _FIXED_CLASSES:
        if num_classes not in (None, _FIXED_CLASSES[name]):
            raise ValueError(f"num_classes must be {_FIXED_CLASSES[name]} (or None) for {name}, got {num_classes}")
    elif name in ("affectnet", "ferplus") and num_classes is not None:
        kwargs["num_classes"] = num_classes
    ds = cls(root, split, transform=transform, skip_bad=skip_bad, **kwargs)
    if name == "folder" and num_classes not in (None, len(ds.classes)):
        raise ValueError(f"num_classes={num_classes} does not match the {len(ds.classes)} classes given")
    return ds
