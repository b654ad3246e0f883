"""RAF-DB (basic emotions) and the synthetic set, which is written in RAF-DB's layout (docs/method.md §5).

Layout::

    root/EmoLabel/list_patition_label.txt   lines "train_00001.jpg 5" (labels 1..7)
    root/Image/aligned/train_00001_aligned.jpg
    root/Image/original/train_00001.jpg      (used with aligned=False)

Labels 1..7 = Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral (stored 0-based).
The split is the file-name prefix ``train_`` / ``test_``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .base import FERDataset, _Builder, check_split, label_from_text, require_dir, require_file, where
from .classes import RAFDB_CLASSES

LABEL_FILE = os.path.join("EmoLabel", "list_patition_label.txt")
_SPLITS = {"train": "train", "test": "test"}


class RafDB(FERDataset):
    """RAF-DB basic expressions (7 classes, RAF-DB label order).

    Args:
        root: folder holding ``EmoLabel/`` and ``Image/``.
        split: ``"train"`` or ``"test"``.
        transform: applied to the RGB ``PIL.Image``.
        skip_bad: skip (and count in ``.skipped``) bad lines / missing or unreadable images
            instead of raising :class:`~amgsn.data.base.DataError`.
        aligned: read ``Image/aligned/<name>_aligned.jpg`` (default) or ``Image/original/<name>``.
        cache: decode every image once at construction and serve from memory.
        verify_images: open each image header at construction (default: when ``skip_bad``).
    """

    name = "rafdb"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        transform: Callable | None = None,
        skip_bad: bool = False,
        aligned: bool = True,
        cache: bool = False,
        verify_images: bool | None = None,
    ):
        split = check_split(split, _SPLITS, self.name)
        root = os.fspath(root)
        require_dir(root, f"{self.name} root")
        label_file = os.path.join(root, LABEL_FILE)
        require_file(label_file, f"{self.name} label file")
        image_dir = os.path.join(root, "Image", "aligned" if aligned else "original")
        b = _Builder(skip_bad, len(RAFDB_CLASSES), skip_bad if verify_images is None else verify_images)
        seen: dict[str, int] = {}
        # Universal newlines: CRLF files and a missing final newline read the same.
        with open(label_file, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue  # blank lines (e.g. a trailing one) carry no item
                w = where(label_file, lineno)
                if len(fields) != 2:
                    b.bad(w, f"malformed line {line.rstrip()!r} (expected '<name>.jpg <label 1..7>')")
                    continue
                name, lab = fields
                prefix = name.split("_", 1)[0]
                if prefix not in _SPLITS:
                    b.bad(w, f"image name {name!r} does not start with 'train_' or 'test_'")
                    continue
                if name in seen:
                    b.bad(w, f"duplicate image {name!r} (first on line {seen[name]})")
                    continue
                seen[name] = lineno
                if prefix != split:
                    continue
                label = label_from_text(lab, w, b, offset=1)
                if label is None:
                    continue
                if not 0 <= label < len(RAFDB_CLASSES):
                    b.bad(w, f"label {label + 1} out of range 1..{len(RAFDB_CLASSES)}")
                    continue
                stem, ext = os.path.splitext(name)
                path = os.path.join(image_dir, f"{stem}_aligned{ext}" if aligned else name)
                b.add(path, label, w)
        super().__init__(RAFDB_CLASSES, b, transform, cache)


class SyntheticFER(RafDB):
    """The generated synthetic FER set (:mod:`amgsn.data.synthetic`): RAF-DB layout and classes."""

    name = "synthetic"
