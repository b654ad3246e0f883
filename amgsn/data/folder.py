"""An image folder ``root/<split>/<class name>/*.jpg`` with an explicit class list (docs/method.md §5).

The label of a folder is its position in the *given* class list, never the folder sort order.
A sub-folder that is not in the list, a stray file and a file that is not an image are bad items
(an error, or skipped and counted with ``skip_bad=True``). Hidden entries (``.DS_Store``, ...)
are ignored. Classes without a folder simply have no samples (see ``class_counts``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from .base import FERDataset, _Builder, require_dir
from .classes import CLASS_NAMES

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def resolve_classes(classes: Sequence[str] | str | None) -> tuple[str, ...]:
    """A class list, or the name of a known data set whose list to use (e.g. ``"rafdb"``)."""
    if classes is None:
        raise ValueError("folder data sets need an explicit class list (classes=[...] or a data set name "
                         f"from {sorted(CLASS_NAMES)}); the folder sort order is never used")
    if isinstance(classes, str):
        if classes.lower() not in CLASS_NAMES:
            raise ValueError(f"classes must be a list of names or one of {sorted(CLASS_NAMES)}, got {classes!r}")
        return CLASS_NAMES[classes.lower()]
    names = tuple(classes)
    if not names or not all(isinstance(c, str) and c for c in names):
        raise ValueError(f"classes must be a non-empty list of non-empty strings, got {classes!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"classes has duplicate names: {names}")
    return names


class ImageFolderFER(FERDataset):
    """Images sorted into one folder per class.

    Args:
        root: folder holding ``<split>/<class name>/`` folders.
        split: the sub-folder to read (any name, e.g. ``"train"``, ``"val"``, ``"test"``).
        classes: the class names in label order, or a data set name (``"rafdb"``, ``"fer2013"``...).
        transform, skip_bad, cache, verify_images: as in :class:`~amgsn.data.rafdb.RafDB`.
    """

    name = "folder"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        classes: Sequence[str] | str | None = None,
        transform: Callable | None = None,
        skip_bad: bool = False,
        cache: bool = False,
        verify_images: bool | None = None,
    ):
        names = resolve_classes(classes)
        if not isinstance(split, str) or not split or os.sep in split:
            raise ValueError(f"split must be the name of a sub-folder of root, got {split!r}")
        root = os.fspath(root)
        require_dir(root, f"{self.name} root")
        split_dir = os.path.join(root, split)
        require_dir(split_dir, f"{self.name} split folder")
        b = _Builder(skip_bad, len(names), skip_bad if verify_images is None else verify_images)
        label_of = {n: i for i, n in enumerate(names)}
        for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                b.bad(entry.path, f"stray file in the split folder (expected only class folders {list(names)})")
                continue
            if entry.name not in label_of:
                b.bad(entry.path, f"folder {entry.name!r} is not in the class list {list(names)}")
                continue
            for f in sorted(os.scandir(entry.path), key=lambda e: e.name):
                if f.name.startswith("."):
                    continue
                if not f.is_file() or not f.name.lower().endswith(IMAGE_EXTENSIONS):
                    b.bad(f.path, f"not an image file (expected one of {IMAGE_EXTENSIONS})")
                    continue
                b.add(f.path, label_of[entry.name], f.path)
        super().__init__(names, b, transform, cache)
