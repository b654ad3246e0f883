"""Class probabilities for single images (``amgsn predict``), optionally on the largest face.

Each path gets one result dict, in the order given; a file that is missing or not an image gets
an ``error`` entry and the others are still processed. With ``detect_face`` the largest face found
by OpenCV's bundled Haar cascade (no download) is cropped, with a margin, before classification;
when no face is found the whole image is used and the result says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from amgsn.engine.common import autocast, resolve_device
from amgsn.engine.inference import load_classifier

FACE_MARGIN = 0.2
"""Fraction of the detected box's side added on each side: Haar boxes are tight around the eyes
and mouth, while FER training crops (RAF-DB aligned, the synthetic set) show the whole head."""

_CASCADE = None


class FaceDetectionUnavailable(RuntimeError):
    """The installed OpenCV has no Haar cascade (OpenCV 5 removed ``CascadeClassifier``)."""


def _cascade():
    global _CASCADE
    if _CASCADE is None:
        import cv2

        if not hasattr(cv2, "CascadeClassifier"):
            raise FaceDetectionUnavailable(
                f"face detection needs OpenCV's Haar cascade, which OpenCV {cv2.__version__} does not have "
                "(OpenCV 5 removed it): pip install 'opencv-python-headless>=4.8,<5'")
        path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        cascade = cv2.CascadeClassifier(path)
        if cascade.empty():
            raise RuntimeError(f"OpenCV could not load its bundled face cascade {path}")
        _CASCADE = cascade
    return _CASCADE


def detect_faces(image: Image.Image) -> list[tuple[int, int, int, int]]:
    """Face boxes ``(x, y, w, h)`` found by the Haar cascade in an RGB image."""
    import cv2

    grey = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    grey = cv2.equalizeHist(grey)  # the cascade is sensitive to exposure
    side = min(grey.shape)
    min_size = max(20, side // 8)
    boxes = _cascade().detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size))
    return [tuple(int(v) for v in b) for b in (boxes if len(boxes) else [])]


def crop_largest_face(
    image: Image.Image, boxes: Sequence[tuple[int, int, int, int]], margin: float = FACE_MARGIN
) -> tuple[Image.Image, list[int]] | None:
    """Crop the largest box (by area; the first on ties), widened by ``margin`` of its side on each
    side and clipped to the image. Returns (crop, [left, top, right, bottom]) or None if no box."""
    if not boxes:
        return None
    x, y, w, h = max(boxes, key=lambda b: b[2] * b[3])
    dx, dy = round(w * margin), round(h * margin)
    box = [max(0, x - dx), max(0, y - dy), min(image.width, x + w + dx), min(image.height, y + h + dy)]
    return image.crop(tuple(box)), box


def _open_image(path: str) -> Image.Image:
    """The RGB image at ``path``; a ValueError with a one-line reason otherwise."""
    if not os.path.exists(path):
        raise ValueError("file not found")
    if os.path.isdir(path):
        raise ValueError("is a directory, not an image file")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError("not an image (PIL cannot identify the file format)") from None
    except OSError as exc:  # truncated or corrupt image data, permission denied
        raise ValueError(f"cannot read the image: {exc}") from None


def predict(
    paths: Sequence[str | os.PathLike],
    checkpoint: str | os.PathLike,
    detect_face: bool = False,
    *,
    device: str = "auto",
    batch_size: int = 32,
    top_k: int | None = None,
) -> list[dict[str, Any]]:
    """Classify each image in ``paths`` with a fine-tuned checkpoint (or exported ``.safetensors``).

    Returns one dict per path, in order: ``{"path", "prediction", "confidence", "probabilities"
    (class -> p, in the model's class order), "face": {"detected", "box"}}`` (``face`` only with
    ``detect_face``), or ``{"path", "error"}`` for a missing / unreadable / non-image file.
    Raises :class:`FaceDetectionUnavailable` when ``detect_face`` is asked of an OpenCV without
    the Haar cascade.
    """
    from amgsn.data import build_eval_transform

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    device = resolve_device(device)
    if detect_face:
        _cascade()  # fail before any work when the detector is not available
    loaded = load_classifier(checkpoint, device)
    tf = build_eval_transform(loaded.img_size)
    results: list[dict[str, Any]] = []
    pending: list[tuple[int, torch.Tensor]] = []
    for p in paths:
        entry: dict[str, Any] = {"path": str(p)}
        results.append(entry)
        try:
            img = _open_image(os.fspath(p))
        except ValueError as exc:
            entry["error"] = str(exc)
            continue
        if detect_face:
            found = crop_largest_face(img, detect_faces(img))
            if found is None:
                entry["face"] = {"detected": False, "box": None,
                                 "note": "no face found: classified the whole image"}
            else:
                img, box = found
                entry["face"] = {"detected": True, "box": box}
        pending.append((len(results) - 1, tf(img)))
    for start in range(0, len(pending), batch_size):
        chunk = pending[start:start + batch_size]
        x = torch.stack([t for _, t in chunk]).to(device)
        with torch.no_grad(), autocast(device):
            probs = torch.softmax(loaded.model(x).float(), dim=-1).cpu()
        for (i, _), row in zip(chunk, probs):
            best = int(row.argmax())
            probabilities = {c: float(v) for c, v in zip(loaded.classes, row)}
            if top_k is not None:
                keep = sorted(probabilities, key=probabilities.get, reverse=True)[:top_k]
                probabilities = {c: probabilities[c] for c in keep}
            results[i].update({"prediction": loaded.classes[best], "confidence": float(row[best]),
                               "probabilities": probabilities})
    return results


def format_results(results: Sequence[dict[str, Any]]) -> str:
    """Human-readable lines: the top class and the distribution per image, or the error."""
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['path']}: ERROR: {r['error']}")
            continue
        face = r.get("face")
        note = "" if face is None else (" [face]" if face["detected"] else " [no face found: whole image]")
        probs = ", ".join(f"{c} {p:.3f}" for c, p in sorted(r["probabilities"].items(), key=lambda kv: -kv[1]))
        lines.append(f"{r['path']}: {r['prediction']} ({r['confidence']:.3f}){note}\n    {probs}")
    return "\n".join(lines)
