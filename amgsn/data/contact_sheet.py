"""A contact sheet of a generated synthetic set: one labelled row per class (RAF-DB order), the
samples of each row ordered from subtle to full intensity (for the README and a quick look)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .rafdb import SyntheticFER
from .synthetic import read_meta


def contact_sheet(root: str | os.PathLike, out_png: str | os.PathLike, *, per_class: int = 10,
                  split: str = "train", cell: int | None = None) -> Path:
    """Write a PNG grid of ``per_class`` samples per class of the set at ``root``; return its path.

    Samples are picked at evenly spaced intensity quantiles so one row spans subtle → full.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    ds = SyntheticFER(root, split)
    if len(ds) == 0:
        raise ValueError(f"the {split} split of {root} has no images")
    meta = {r["name"]: r for r in read_meta(root) if r["split"] == split}
    # The meta file is keyed by the label-file name ("train_00001.jpg"); recover it from the path.
    names = [Path(ds.source(i)).name.replace("_aligned", "") for i in range(len(ds))]
    cell = cell or ds.load_image(0).width
    try:
        font = ImageFont.load_default(size=max(12, cell // 7))
    except TypeError:  # Pillow without FreeType
        font = ImageFont.load_default()
    label_w, head_h = int(cell * 1.1), max(18, cell // 5)
    sheet = Image.new("RGB", (label_w + per_class * cell, head_h + len(ds.classes) * cell), "white")
    d = ImageDraw.Draw(sheet)
    d.text((label_w, 2), "intensity: subtle  ->  full", fill="black", font=font)
    for c, cls in enumerate(ds.classes):
        idx = [i for i, t in enumerate(ds.targets) if t == c]
        idx.sort(key=lambda i: float(meta[names[i]]["intensity"]))
        y = head_h + c * cell
        d.text((6, y + cell // 2 - cell // 12), cls, fill="black", font=font)
        if not idx:
            continue
        picks = [idx[int(round(q))] for q in np.linspace(0, len(idx) - 1, min(per_class, len(idx)))]
        for k, i in enumerate(picks):
            img = ds.load_image(i)
            if img.width != cell:
                img = img.resize((cell, cell), Image.BICUBIC)
            sheet.paste(img, (label_w + k * cell, y))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    return out
