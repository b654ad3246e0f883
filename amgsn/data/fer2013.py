"""FER2013 and FERPlus (docs/method.md §5). Both keep the 48x48 grey pixels in memory (no image files).

* FER2013: ``fer2013.csv`` with columns ``emotion, pixels, Usage``; pixels are 2304 grey values
  separated by spaces; emotion 0 Angry, 1 Disgust, 2 Fear, 3 Happy, 4 Sad, 5 Surprise, 6 Neutral;
  Usage ``Training`` / ``PublicTest`` / ``PrivateTest``.
* FERPlus: ``fer2013new.csv`` (``Usage, Image name, neutral, happiness, surprise, sadness, anger,
  disgust, fear, contempt, unknown, NF`` vote counts) joined row by row with ``fer2013.csv``. The
  label is the official FERPlus "majority" rule: votes of 1 are dropped as outliers, then a class
  needs more than half of the remaining votes; rows without a majority, with an unknown / no-face
  majority, or without an image name are excluded (counted in ``dataset.excluded``).
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable, Iterator

import numpy as np

from .base import FERDataset, _Builder, check_split, label_from_text, require_file, where
from .classes import FER2013_CLASSES, FERPLUS_CLASSES

PIXELS = 48 * 48
_SPLITS = {"train": "Training", "training": "Training", "val": "PublicTest", "publictest": "PublicTest",
           "test": "PrivateTest", "privatetest": "PrivateTest"}
_USAGES = ("Training", "PublicTest", "PrivateTest")
FERPLUS_VOTES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
                 "unknown", "NF")


def _csv_path(root: str | os.PathLike, name: str) -> str:
    root = os.fspath(root)
    if os.path.isfile(root) and root.lower().endswith(".csv") and name == "fer2013.csv":
        return root  # the CSV itself may be passed as root
    return os.path.join(root, name)


def _rows(path: str, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str] | None, list[str]]]:
    """Yield (line, column map, row) for each data row; the header (if any) names the columns,
    otherwise ``required`` is the column order."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        cols = {c.lower(): i for i, c in enumerate(required)}
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if reader.line_num == 1 and row[0].strip().lower() in {c.lower() for c in required}:
                names = [c.strip().lower() for c in row]
                missing = [c for c in required if c.lower() not in names]
                if missing:
                    raise ValueError(f"{path}:1: header lacks the column(s) {missing} (found {row})")
                cols = {n: names.index(n) for n in (c.lower() for c in required)}
                continue
            yield reader.line_num, cols, row


def _pixels(text: str, w: str, b: _Builder) -> np.ndarray | None:
    try:
        with warnings.catch_warnings():
            # numpy warns (and will raise) on trailing non-numeric text; either is a bad row.
            warnings.simplefilter("error", DeprecationWarning)
            arr = np.fromstring(text, dtype=np.int32, sep=" ")
    except (ValueError, DeprecationWarning):
        arr = None
    if arr is None or arr.size != PIXELS:
        n = len(text.split())
        b.bad(w, f"malformed pixels: {n} value(s) or a non-integer, expected {PIXELS} integers (48x48)")
        return None
    if arr.min() < 0 or arr.max() > 255:
        b.bad(w, f"pixel values out of range 0..255 (min {arr.min()}, max {arr.max()})")
        return None
    return arr.astype(np.uint8).reshape(48, 48)


def _usage(text: str, w: str, b: _Builder) -> str | None:
    u = text.strip()
    if u not in _USAGES:
        b.bad(w, f"unknown Usage {u!r} (expected one of {_USAGES})")
        return None
    return u


class FER2013(FERDataset):
    """FER2013 (7 classes, FER2013 order).

    Args:
        root: folder holding ``fer2013.csv`` (or the CSV file itself).
        split: ``"train"`` (Training), ``"val"`` (PublicTest) or ``"test"`` (PrivateTest).
        transform, skip_bad: as in :class:`~amgsn.data.rafdb.RafDB`. The pixels always live in
        memory, so there is no separate cache.
    """

    name = "fer2013"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        transform: Callable | None = None,
        skip_bad: bool = False,
        cache: bool = False,
    ):
        usage = check_split(split, _SPLITS, self.name)
        path = _csv_path(root, "fer2013.csv")
        require_file(path, f"{self.name} label file")
        b = _Builder(skip_bad, len(FER2013_CLASSES), False)
        images: list[np.ndarray] = []
        for line, cols, row in _rows(path, ("emotion", "pixels", "Usage")):
            w = where(path, line)
            if len(row) <= max(cols.values()):
                b.bad(w, f"malformed line: {len(row)} field(s), expected 3 (emotion, pixels, Usage)")
                continue
            u = _usage(row[cols["usage"]], w, b)
            if u != usage:
                continue
            label = label_from_text(row[cols["emotion"]], w, b, what="emotion")
            if label is None:
                continue
            if not 0 <= label < len(FER2013_CLASSES):
                b.bad(w, f"emotion {label} out of range 0..6")
                continue
            px = _pixels(row[cols["pixels"]], w, b)
            if px is None:
                continue
            b.add(len(images), label, w)
            images.append(px)
        pixels = np.stack(images) if images else np.zeros((0, 48, 48), np.uint8)
        super().__init__(FER2013_CLASSES, b, transform, pixels=pixels)


def ferplus_majority(votes: np.ndarray) -> int | None:
    """The FERPlus "majority" label of one row of 10 vote counts, or None (no majority).

    Single votes are outliers and removed first; a label then needs more than half of the votes.
    Returns an index into the 10 vote columns (8 = unknown, 9 = NF are returned as such).
    """
    v = np.where(votes <= 1, 0, votes)
    total = v.sum()
    if total <= 0:
        return None
    top = int(np.argmax(v))
    return top if v[top] > 0.5 * total else None


class FERPlus(FERDataset):
    """FERPlus: FER2013 images with the FERPlus majority-vote labels (8 classes, or 7 without Contempt).

    Args:
        root: folder holding ``fer2013.csv`` and ``fer2013new.csv``.
        split: as in :class:`FER2013`.
        num_classes: 8 (default) or 7 (rows whose majority is Contempt are excluded).
    """

    name = "ferplus"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        num_classes: int = 8,
        transform: Callable | None = None,
        skip_bad: bool = False,
        cache: bool = False,
    ):
        if num_classes not in (7, 8):
            raise ValueError(f"num_classes must be 7 or 8 for ferplus, got {num_classes}")
        usage = check_split(split, _SPLITS, self.name)
        root = os.fspath(root)
        old, new = os.path.join(root, "fer2013.csv"), os.path.join(root, "fer2013new.csv")
        require_file(old, f"{self.name} pixel file")
        require_file(new, f"{self.name} vote file")
        b = _Builder(skip_bad, num_classes, False)
        images: list[np.ndarray] = []
        old_rows = list(_rows(old, ("emotion", "pixels", "Usage")))
        new_rows = list(_rows(new, ("Usage", "Image name", *FERPLUS_VOTES)))
        if len(old_rows) != len(new_rows):
            raise ValueError(f"{new} has {len(new_rows)} data rows but {old} has {len(old_rows)}; "
                             "FERPlus joins them row by row")
        for (oline, ocols, orow), (nline, ncols, nrow) in zip(old_rows, new_rows):
            w = where(new, nline)
            if len(nrow) <= max(ncols.values()):
                b.bad(w, f"malformed line: {len(nrow)} field(s), expected 12")
                continue
            u = _usage(nrow[ncols["usage"]], w, b)
            if u is None:
                continue
            if len(orow) <= max(ocols.values()) or orow[ocols["usage"]].strip() != u:
                b.bad(w, f"row does not match {where(old, oline)} (Usage differs or that row is malformed)")
                continue
            if u != usage:
                continue
            if not nrow[ncols["image name"]].strip():
                b.exclude("no FERPlus image")
                continue
            votes = []
            for c in FERPLUS_VOTES:
                v = label_from_text(nrow[ncols[c.lower()]], w, b, what=f"{c} vote count")
                if v is None:
                    break
                if v < 0:
                    b.bad(w, f"negative vote count {v} for {c}")
                    v = None
                    break
                votes.append(v)
            if len(votes) != len(FERPLUS_VOTES):
                continue
            label = ferplus_majority(np.asarray(votes))
            if label is None:
                b.exclude("no majority")
                continue
            if label >= num_classes:
                b.exclude(f"majority {FERPLUS_VOTES[label]}")
                continue
            px = _pixels(orow[ocols["pixels"]], where(old, oline), b)
            if px is None:
                continue
            b.add(len(images), label, w)
            images.append(px)
        pixels = np.stack(images) if images else np.zeros((0, 48, 48), np.uint8)
        super().__init__(FERPLUS_CLASSES[:num_classes], b, transform, pixels=pixels)
