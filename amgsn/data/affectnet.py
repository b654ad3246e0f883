"""AffectNet (manually annotated part), 7 or 8 classes (docs/method.md §5).

``root/training.csv`` / ``root/validation.csv`` with columns ``subDirectory_filePath, face_x,
face_y, face_width, face_height, facial_landmarks, expression, valence, arousal`` (the header
row may be present or not); images under ``root/Manually_Annotated_Images/<subDirectory_filePath>``.
``expression``: 0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear, 5 Disgust, 6 Anger, 7 Contempt,
8 None, 9 Uncertain, 10 No-Face. The 7-class set drops 7..10, the 8-class set 8..10; dropped rows
are counted in ``dataset.excluded``. The official validation set (500 per class) is the test split.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable

from .base import FERDataset, _Builder, check_split, label_from_text, require_dir, require_file, where
from .classes import AFFECTNET_CLASSES

COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
           "expression", "valence", "arousal")
_NON_CLASSES = {7: "Contempt", 8: "None", 9: "Uncertain", 10: "No-Face"}
_SPLITS = {"train": "training.csv", "training": "training.csv", "val": "validation.csv",
           "validation": "validation.csv", "test": "validation.csv"}


def _column_index(header: list[str], label_file: str, crop_face: bool) -> dict[str, int]:
    names = [h.strip().lower() for h in header]
    idx = {}
    for col in COLUMNS:
        if col.lower() in names:
            idx[col] = names.index(col.lower())
    needed = COLUMNS[:5] + ("expression",) if crop_face else ("subDirectory_filePath", "expression")
    for col in needed:
        if col not in idx:
            raise ValueError(f"{label_file}:1: header lacks the column {col!r} (found {header})")
    return idx


class AffectNet(FERDataset):
    """AffectNet, manually annotated images.

    Args:
        root: folder with ``training.csv``, ``validation.csv`` and the image folder.
        split: ``"train"`` (training.csv) or ``"val"`` / ``"test"`` (validation.csv).
        num_classes: 7 (drops Contempt) or 8.
        crop_face: crop each image to its face box (face_x, face_y, face_width, face_height).
        image_dir: image folder under ``root``.
        transform, skip_bad, cache, verify_images: as in :class:`~amgsn.data.rafdb.RafDB`.
    """

    name = "affectnet"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        num_classes: int = 7,
        transform: Callable | None = None,
        skip_bad: bool = False,
        crop_face: bool = False,
        image_dir: str = "Manually_Annotated_Images",
        cache: bool = False,
        verify_images: bool | None = None,
    ):
        if num_classes not in (7, 8):
            raise ValueError(f"num_classes must be 7 or 8 for affectnet, got {num_classes}")
        csv_name = check_split(split, _SPLITS, self.name)
        root = os.fspath(root)
        require_dir(root, f"{self.name} root")
        label_file = os.path.join(root, csv_name)
        require_file(label_file, f"{self.name} label file")
        images = os.path.join(root, image_dir)
        b = _Builder(skip_bad, num_classes, skip_bad if verify_images is None else verify_images)
        with open(label_file, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            idx = dict(zip(COLUMNS, range(len(COLUMNS))))
            for row in reader:
                w = where(label_file, reader.line_num)
                if not row or all(not c.strip() for c in row):
                    continue
                if reader.line_num == 1 and any(c.strip().lower() == "subdirectory_filepath" for c in row):
                    idx = _column_index(row, label_file, crop_face)
                    continue
                need = max(idx["subDirectory_filePath"], idx["expression"])
                if crop_face:
                    need = max(need, *(idx[c] for c in COLUMNS[1:5]))
                if len(row) <= need:
                    b.bad(w, f"malformed line: {len(row)} field(s), expected at least {need + 1}")
                    continue
                label = label_from_text(row[idx["expression"]], w, b, what="expression")
                if label is None:
                    continue
                if label in _NON_CLASSES and label >= num_classes:
                    b.exclude(f"{_NON_CLASSES[label]} ({label})")
                    continue
                if not 0 <= label < num_classes:
                    b.bad(w, f"expression {label} out of range 0..10")
                    continue
                box = None
                if crop_face:
                    box = self._box(row, idx, w, b)
                    if box is None:
                        continue
                rel = row[idx["subDirectory_filePath"]].strip()
                if not rel:
                    b.bad(w, "empty subDirectory_filePath")
                    continue
                b.add(os.path.join(images, rel), label, w, box)
        super().__init__(AFFECTNET_CLASSES[:num_classes], b, transform, cache)

    @staticmethod
    def _box(row: list[str], idx: dict[str, int], w: str, b: _Builder) -> tuple[int, int, int, int] | None:
        try:
            x, y, bw, bh = (int(round(float(row[idx[c]]))) for c in COLUMNS[1:5])
        except ValueError:
            b.bad(w, f"malformed face box {[row[idx[c]] for c in COLUMNS[1:5]]}")
            return None
        if bw <= 0 or bh <= 0:
            b.bad(w, f"empty face box (width {bw}, height {bh})")
            return None
        return x, y, x + bw, y + bh
