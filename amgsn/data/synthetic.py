"""The synthetic FER generator (docs/method.md §6): rendered faces written to disk in the RAF-DB layout.

``generate(out_dir, num_train, num_test, image_size, seed)`` writes::

    out_dir/EmoLabel/list_patition_label.txt      "train_00001.jpg 5" lines, labels 1..7 (RAF-DB order)
    out_dir/Image/aligned/train_00001_aligned.jpg ...
    out_dir/synthetic_meta.csv                    per image: identity, intensity, pose, occluder, AUs
    out_dir/synthetic.json                        generator version and parameters (written last)

so the default run goes through the real RAF-DB loader. Class proportions follow RAF-DB's
train / test counts. Determinism: each image's random stream is seeded from (seed, split, index)
and each identity's from (seed, split, identity), never from worker order, and JPEGs are written
with fixed settings, so the same arguments give byte-identical files whatever ``workers`` is.
Test identities are drawn from a different stream than train identities (subject-independent
split). The default sizes (2 500 / 700 images at 112 px) are the demo's.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing as mp
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._face_model import AUS, RAFDB_CLASSES, sample_expression, sample_identity, sample_nuisance
from ._face_render import render_face

GENERATOR_VERSION = 1
RAFDB_TRAIN_COUNTS = (1290, 281, 717, 4772, 1982, 705, 2524)
RAFDB_TEST_COUNTS = (329, 74, 160, 1185, 478, 162, 680)
DEFAULT_NUM_TRAIN = 2500
DEFAULT_NUM_TEST = 700
DEFAULT_IMAGE_SIZE = 112
JPEG_QUALITY = 92
IMAGES_PER_IDENTITY = 4  # on average; identities recur with different expressions, as in real sets
_SPLIT_CODE = {"train": 0, "test": 1}
LABEL_FILE = os.path.join("EmoLabel", "list_patition_label.txt")
IMAGE_DIR = os.path.join("Image", "aligned")
META_FILE = "synthetic_meta.csv"
INFO_FILE = "synthetic.json"


def class_counts(total: int, reference: Sequence[int] = RAFDB_TRAIN_COUNTS) -> list[int]:
    """Split ``total`` images over the classes in proportion to ``reference`` (largest remainder).

    Every class gets at least one image when ``total >= len(reference)``, so the rarest class is
    never silently absent from a small set.
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    ref = np.asarray(reference, dtype=np.float64)
    exact = total * ref / ref.sum()
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    if total >= len(ref):
        for k in np.flatnonzero(counts == 0):
            # Take from the class furthest above its exact share that can spare an image.
            surplus = np.where(counts > 1, counts - exact, -np.inf)
            counts[np.argmax(surplus)] -= 1
            counts[k] += 1
    return counts.tolist()


def _plan(split: str, n: int, seed: int) -> list[tuple[int, int, int]]:
    """(index, label, identity) per image of one split, deterministic in (seed, split)."""
    ref = RAFDB_TRAIN_COUNTS if split == "train" else RAFDB_TEST_COUNTS
    labels = np.repeat(np.arange(len(RAFDB_CLASSES)), class_counts(n, ref))
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], 0])
    rng.shuffle(labels)
    n_ids = max(1, math.ceil(n / IMAGES_PER_IDENTITY))
    ids = np.arange(n) % n_ids
    rng.shuffle(ids)
    return [(i, int(labels[i]), int(ids[i])) for i in range(n)]


def _name(split: str, index: int, width: int) -> str:
    return f"{split}_{index + 1:0{width}d}"


def _render_task(task: tuple) -> list[str]:
    """Render and write one image; return its metadata row (runs in a worker process)."""
    out_dir, size, seed, split, index, label, identity, width = task
    code = _SPLIT_CODE[split]
    ident = sample_identity(np.random.default_rng([seed, code, 1, identity]), f"{split}-id{identity:05d}")
    rng = np.random.default_rng([seed, code, 2, index])
    cls = RAFDB_CLASSES[label]
    ex = sample_expression(rng, cls, ident)
    nz = sample_nuisance(rng)
    img = render_face(ident, ex, nz, size, rng)
    name = _name(split, index, width)
    buf = io.BytesIO()
    # Fixed encoder settings: identical pixels give identical bytes.
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    with open(os.path.join(out_dir, IMAGE_DIR, f"{name}_aligned.jpg"), "wb") as f:
        f.write(buf.getvalue())
    deg = 180.0 / math.pi
    return [f"{name}.jpg", split, str(label + 1), cls, ident.name, f"{ex.intensity:.4f}",
            f"{nz.yaw * deg:.2f}", f"{nz.pitch * deg:.2f}", f"{nz.roll * deg:.2f}", nz.occluder or "-",
            ident.glasses or "-", *(f"{ex.aus[a]:.4f}" for a in AUS)]


def _params(num_train: int, num_test: int, image_size: int, seed: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "num_train": num_train, "num_test": num_test,
            "image_size": image_size, "seed": seed, "layout": "rafdb",
            "classes": list(RAFDB_CLASSES),
            "train_counts": class_counts(num_train, RAFDB_TRAIN_COUNTS),
            "test_counts": class_counts(num_test, RAFDB_TEST_COUNTS)}


def _check_args(num_train: int, num_test: int, image_size: int, seed: int) -> None:
    for name, v in (("num_train", num_train), ("num_test", num_test), ("image_size", image_size), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if num_train < 0 or num_test < 0 or num_train + num_test == 0:
        raise ValueError(f"num_train and num_test must be >= 0 and not both 0, got {num_train}, {num_test}")
    if not 32 <= image_size <= 512:
        raise ValueError(f"image_size must be in [32, 512], got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir exists and is not a directory: {out}")
    if out.exists() and any(out.iterdir()):
        if not (out / INFO_FILE).exists() and not (out / LABEL_FILE).exists():
            raise FileExistsError(f"out_dir {out} is not empty and holds no synthetic set; refusing to write there")
        if not overwrite:
            raise FileExistsError(f"out_dir {out} already holds a data set; pass overwrite=True (--overwrite)")
        # Only our own outputs are removed (a smaller new set must not leave stale images behind).
        for p in (out / INFO_FILE, out / META_FILE, out / LABEL_FILE):
            p.unlink(missing_ok=True)
        shutil.rmtree(out / IMAGE_DIR, ignore_errors=True)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    (out / LABEL_FILE).parent.mkdir(parents=True, exist_ok=True)


def generate(
    out_dir: str | os.PathLike,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_test: int = DEFAULT_NUM_TEST,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    *,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a synthetic FER set in the RAF-DB layout under ``out_dir``; return its path.

    Args:
        out_dir: target directory (created; must be empty or an earlier synthetic set).
        num_train, num_test: images per split; classes follow RAF-DB's proportions.
        image_size: side of the square images in pixels (32..512).
        seed: same seed and sizes give byte-identical files.
        workers: processes to render with (default ``min(2, cpu_count)``; 0 renders in-process).
        overwrite: replace an earlier synthetic set in ``out_dir``.
        progress: show a tqdm progress bar.
    """
    _check_args(num_train, num_test, image_size, seed)
    out = Path(out_dir)
    _prepare_dir(out, overwrite)
    n_max = max(num_train, num_test)
    width = max(5, len(str(n_max)))
    tasks = [(str(out), image_size, seed, split, i, label, ident, width)
             for split, n in (("train", num_train), ("test", num_test))
             for i, label, ident in _plan(split, n, seed)]
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="synthetic FER", unit="img", disable=not progress)
    rows: list[list[str]] = []
    if workers <= 1 or len(tasks) < 64:
        for t in tasks:
            rows.append(_render_task(t))
            bar.update()
    else:
        # fork: the children only need numpy and PIL, and start instantly.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            for row in pool.imap(_render_task, tasks, chunksize=16):
                rows.append(row)
                bar.update()
    bar.close()
    with open(out / LABEL_FILE, "w", newline="\n") as f:
        f.writelines(f"{r[0]} {r[2]}\n" for r in rows)
    with open(out / META_FILE, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["name", "split", "label", "class", "identity", "intensity", "yaw", "pitch", "roll",
                    "occluder", "glasses", *AUS])
        w.writerows(rows)
    # Written last: its presence marks a complete set.
    (out / INFO_FILE).write_text(json.dumps(_params(num_train, num_test, image_size, seed), indent=2) + "\n")
    return out


def ensure_synthetic(
    out_dir: str | os.PathLike,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_test: int = DEFAULT_NUM_TEST,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    **kwargs,
) -> Path:
    """Return ``out_dir`` holding the requested synthetic set, generating it only when missing or
    generated with other parameters (the demo calls this so a second run reuses the images)."""
    _check_args(num_train, num_test, image_size, seed)
    out = Path(out_dir)
    info = out / INFO_FILE
    if info.exists():
        try:
            same = json.loads(info.read_text()) == _params(num_train, num_test, image_size, seed)
        except (OSError, ValueError):
            same = False
        if same and (out / LABEL_FILE).exists():
            return out
    return generate(out, num_train, num_test, image_size, seed, overwrite=True, **kwargs)


def read_meta(root: str | os.PathLike) -> list[dict[str, str]]:
    """The per-image metadata rows of a generated set (for analysis, e.g. accuracy vs intensity)."""
    with open(Path(root) / META_FILE, newline="") as f:
        return list(csv.DictReader(f))
