"""Shared machinery of the FER data sets: the item list, error reporting, skipping, the cache.

A data set is built by a format reader (``rafdb.py``, ``affectnet.py``, ...) that walks its label
file and hands each item to :class:`FERDataset` through an :class:`_Builder`, which either raises
a :class:`DataError` naming the file and line or, with ``skip_bad=True``, records a
:class:`SkippedItem`. Items left out *by the data set's definition* (AffectNet's "None" class,
FERPlus's "unknown" majority, ...) are not errors; they are counted in ``dataset.excluded``.
Nothing is dropped silently: both counts are logged once, at construction.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("amgsn.data")


class DataError(ValueError):
    """A problem with one item or line of a data set; ``where`` is ``"file:line"`` or a path."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


@dataclass(frozen=True)
class SkippedItem:
    """One item left out by ``skip_bad=True``: where it came from and why."""

    where: str
    reason: str


@dataclass(frozen=True)
class Item:
    """One sample: ``source`` is an image path (or an index into in-memory pixels), ``box`` an
    optional crop (left, top, right, bottom), ``where`` its origin for error messages."""

    source: Any
    label: int
    where: str
    box: tuple[int, int, int, int] | None = None


def where(path: str | os.PathLike, line: int | None = None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def require_file(path: str | os.PathLike, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")


def require_dir(path: str | os.PathLike, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found (or not a directory): {path}")


def check_split(split: str, allowed: dict[str, str], dataset: str) -> str:
    """Map a user split name (case-insensitive, with aliases) to the data set's own name."""
    if not isinstance(split, str):
        raise TypeError(f"split must be a str, got {type(split).__name__}")
    key = split.lower()
    if key not in allowed:
        raise ValueError(f"split must be one of {sorted(allowed)} for {dataset}, got {split!r}")
    return allowed[key]


class _Builder:
    """Collects items while a reader walks a label file; raises or records bad items."""

    def __init__(self, skip_bad: bool, num_classes: int, verify_images: bool):
        self.skip_bad = skip_bad
        self.num_classes = num_classes
        self.verify_images = verify_images
        self.items: list[Item] = []
        self.skipped: list[SkippedItem] = []
        self.excluded: Counter[str] = Counter()

    def bad(self, where_: str, reason: str) -> None:
        if not self.skip_bad:
            raise DataError(where_, reason)
        self.skipped.append(SkippedItem(where_, reason))

    def exclude(self, reason: str) -> None:
        self.excluded[reason] += 1

    def add(self, source: Any, label: int, where_: str, box: tuple[int, int, int, int] | None = None) -> None:
        if not 0 <= label < self.num_classes:
            self.bad(where_, f"label {label} out of range [0, {self.num_classes})")
            return
        if isinstance(source, (str, os.PathLike)):
            if not os.path.isfile(source):
                self.bad(where_, f"image not found: {source}")
                return
            if self.verify_images:
                try:  # header only: cheap, catches non-images and truncated headers
                    with Image.open(source) as im:
                        im.size  # noqa: B018
                except Exception as e:  # PIL raises several types for bad files
                    self.bad(where_, f"unreadable image {source}: {e}")
                    return
        self.items.append(Item(source, label, where_, box))


def label_from_text(text: str, where_: str, b: _Builder, offset: int = 0, what: str = "label") -> int | None:
    """Parse an integer (``offset`` is subtracted); ``None`` after reporting a malformed one."""
    try:
        return int(text.strip()) - offset
    except ValueError:
        b.bad(where_, f"malformed {what} {text.strip()!r} (expected an integer)")
        return None


class FERDataset(torch.utils.data.Dataset):
    """Base of every FER data set: ``ds[i] -> (image, label, i)``.

    ``image`` is an RGB ``PIL.Image`` when ``transform`` is None, else ``transform(image)``.
    ``i`` is the sample index (MRUS keeps a mask ratio per index).

    Attributes:
        classes: class names in the data set's own label order.
        targets: list of int labels, one per sample.
        class_counts: list of int, samples per class (length ``len(classes)``).
        skipped: list of :class:`SkippedItem` left out by ``skip_bad=True``.
        excluded: ``{reason: count}`` of items left out by the data set's definition.
    """

    name = "fer"

    def __init__(
        self,
        classes: Sequence[str],
        builder: _Builder,
        transform: Callable | None = None,
        cache: bool = False,
        pixels: np.ndarray | None = None,
    ):
        self.classes = list(classes)
        self.transform = transform
        self._items = builder.items
        self._pixels = pixels  # in-memory images (FER2013); items then hold indices into it
        self.skipped = builder.skipped
        self.excluded = dict(builder.excluded)
        self.targets = [it.label for it in self._items]
        counts = np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=len(self.classes))
        self.class_counts = [int(c) for c in counts[: len(self.classes)]]
        self._cache: np.ndarray | list[np.ndarray] | None = None
        if cache:
            self._fill_cache(builder)
        self._report()

    # -- loading ---------------------------------------------------------------------------------
    def _decode(self, item: Item) -> Image.Image:
        if self._pixels is not None:
            return Image.fromarray(self._pixels[item.source]).convert("RGB")
        try:
            with Image.open(item.source) as im:
                img = im.convert("RGB")
        except Exception as e:
            raise DataError(item.where, f"cannot read image {item.source}: {e}") from e
        if item.box is not None:
            l, t, r, btm = item.box
            l, t = max(0, l), max(0, t)
            r, btm = min(img.width, r), min(img.height, btm)
            if r - l < 2 or btm - t < 2:
                raise DataError(item.where, f"face box {item.box} lies outside the {img.size} image {item.source}")
            img = img.crop((l, t, r, btm))
        return img

    def _fill_cache(self, builder: _Builder) -> None:
        """Decode every image once (in the main process, so DataLoader workers share the pages)."""
        arrays, keep = [], []
        for item in self._items:
            try:
                arrays.append(np.asarray(self._decode(item)))
                keep.append(item)
            except DataError as e:
                if not builder.skip_bad:
                    raise
                self.skipped.append(SkippedItem(e.where, str(e)))
        if len(keep) != len(self._items):
            self._items = keep
            self.targets = [it.label for it in keep]
            counts = np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=len(self.classes))
            self.class_counts = [int(c) for c in counts[: len(self.classes)]]
        shapes = {a.shape for a in arrays}
        # One contiguous block when all images share a size (the synthetic set, FER2013).
        self._cache = np.stack(arrays) if len(shapes) == 1 else arrays

    def load_image(self, index: int) -> Image.Image:
        """The untransformed RGB image of sample ``index``."""
        if self._cache is not None:
            return Image.fromarray(self._cache[index])
        return self._decode(self._items[index])

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} with {len(self)} samples")
        index = index % len(self)
        img = self.load_image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self._items[index].label, index

    def where(self, index: int) -> str:
        """The file and line sample ``index`` came from."""
        return self._items[index].where

    def source(self, index: int) -> Any:
        """The image path of sample ``index`` (a row index into the in-memory pixels for FER2013)."""
        return self._items[index].source

    # -- reporting -------------------------------------------------------------------------------
    def _report(self) -> None:
        if self.skipped:
            first = self.skipped[0]
            log.warning("%s: skipped %d bad item(s) (skip_bad=True); first: %s: %s; see dataset.skipped",
                        self.name, len(self.skipped), first.where, first.reason)
        if self.excluded:
            listed = ", ".join(f"{n} {r}" for r, n in sorted(self.excluded.items()))
            log.info("%s: excluded by the data set's definition: %s", self.name, listed)

    def __repr__(self) -> str:
        counts = ", ".join(f"{c}={n}" for c, n in zip(self.classes, self.class_counts))
        return f"{type(self).__name__}({len(self)} samples: {counts}; skipped={len(self.skipped)})"
