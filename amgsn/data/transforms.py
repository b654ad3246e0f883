"""Transform builders for pre-training, fine-tuning and evaluation (timm's ``create_transform``),
and the two-view wrapper the supervised contrastive loss needs.

All builders take an RGB ``PIL.Image`` (what every data set yields) and return a float tensor
``(3, image_size, image_size)`` normalised with ``mean`` / ``std``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as tv_transforms
from torchvision.transforms import functional as tv_functional


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")


def _check_scale(scale: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(s) for s in scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    return lo, hi


def build_pretrain_transform(
    image_size: int,
    *,
    scale: Sequence[float] = (0.35, 1.0),
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    record_view: bool = False,
) -> Callable:
    """MAE pre-training: random resized crop + flip only (MAE found colour jitter unhelpful).

    The crop scale is milder than MAE's (0.2, 1): FER images are tight face crops, and a 20 %
    crop of a face often holds no expression at all.

    ``record_view=True`` (the saliency bank, docs/method.md §4.4) returns ``(tensor, view, whole)``
    instead (:class:`ViewRecordingTransform`): the same tensor, drawn from the same random numbers, its
    (5,) crop box and flip, and the whole image resized to the same size (for the teacher's refreshes).
    """
    _check_size(image_size)
    tf = create_transform(image_size, is_training=True, scale=_check_scale(scale), hflip=hflip,
                          color_jitter=None, interpolation="bicubic", mean=tuple(mean), std=tuple(std))
    return ViewRecordingTransform(tf) if record_view else tf


class ViewRecordingTransform:
    """timm's pre-training transform (RandomResizedCrop, RandomHorizontalFlip, the rest) that also
    returns the view it made and the whole image: ``img -> (tensor, view, whole)``. ``view`` = float32
    ``(top, left, height, width, flipped)`` — the crop box in fractions of the original image's height /
    width, and 1.0 if the crop was flipped horizontally; ``whole`` = the whole image resized (same
    interpolation) to the crop's output size, unflipped, through the same final steps (the view
    ``(0, 0, 1, 1, 0)``).

    It draws exactly the random numbers the wrapped ``Compose`` draws, in the same order (the crop's
    ``get_params`` from Python's ``random``, the flip's ``torch.rand(1)``; ``whole`` draws none), so
    ``tensor`` equals ``transform(img)`` under the same seeds.
    """

    def __init__(self, transform: Any) -> None:
        steps = list(getattr(transform, "transforms", []))
        if (len(steps) < 2 or not isinstance(steps[0], RandomResizedCropAndInterpolation)
                or not isinstance(steps[1], tv_transforms.RandomHorizontalFlip)):
            raise TypeError("transform must be a Compose starting with timm's RandomResizedCropAndInterpolation "
                            f"and RandomHorizontalFlip (build_pretrain_transform), got {transform!r}")
        self.transform = transform
        self.crop, self.flip, self.rest = steps[0], steps[1], steps[2:]

    def __call__(self, img: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width, height = tv_functional.get_image_size(img)
        crop = self.crop
        i, j, h, w = crop.get_params(img, crop.scale, crop.ratio)
        interpolation = crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        whole = tv_functional.resize(img, list(crop.size), interpolation)
        img = tv_functional.resized_crop(img, i, j, h, w, list(crop.size), interpolation)
        flipped = bool(torch.rand(1) < self.flip.p)
        if flipped:
            img = tv_functional.hflip(img)
        for t in self.rest:
            img, whole = t(img), t(whole)
        view = torch.tensor([i / height, j / width, h / height, w / width, float(flipped)], dtype=torch.float32)
        return img, view, whole

    def __repr__(self) -> str:
        return f"ViewRecordingTransform({self.transform!r})"


def build_finetune_transform(
    image_size: int,
    *,
    scale: Sequence[float] = (0.8, 1.0),
    hflip: float = 0.5,
    color_jitter: float | None = 0.2,
    auto_augment: str | None = None,
    re_prob: float = 0.25,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Callable:
    """Fine-tuning: crop (0.8..1 of the face), flip, colour jitter, random erasing (a cheap
    occlusion model, standard in FER); ``auto_augment`` takes a timm policy string such as
    ``"rand-m9-mstd0.5-inc1"`` (off by default: it dominates a CPU step's loading time)."""
    _check_size(image_size)
    if not 0.0 <= re_prob <= 1.0:
        raise ValueError(f"re_prob must be in [0, 1], got {re_prob}")
    return create_transform(image_size, is_training=True, scale=_check_scale(scale), hflip=hflip,
                            color_jitter=color_jitter, auto_augment=auto_augment, re_prob=re_prob,
                            interpolation="bicubic", mean=tuple(mean), std=tuple(std))


def build_eval_transform(
    image_size: int,
    *,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Callable:
    """Evaluation: resize the shorter side to ``image_size``, centre crop (a no-op for square
    face crops), normalise."""
    _check_size(image_size)
    return create_transform(image_size, is_training=False, crop_pct=1.0, interpolation="bicubic",
                            mean=tuple(mean), std=tuple(std))


def build_transform(kind: str, image_size: int, **kwargs: Any) -> Callable:
    """``kind`` in ``"pretrain"``, ``"finetune"``, ``"eval"``; keyword arguments go to the builder."""
    builders = {"pretrain": build_pretrain_transform, "finetune": build_finetune_transform,
                "eval": build_eval_transform}
    if kind not in builders:
        raise ValueError(f"kind must be one of {sorted(builders)}, got {kind!r}")
    return builders[kind](image_size, **kwargs)


class TwoViewTransform:
    """Apply a random transform twice to one image: ``(view1, view2)`` for the contrastive loss.

    With a DataLoader the batch's image entry becomes a list of two ``(B, 3, H, W)`` tensors;
    ``torch.cat`` them to get the ``2B`` views SupCon expects (labels repeated twice).
    """

    def __init__(self, transform: Callable, second: Callable | None = None):
        if not callable(transform) or (second is not None and not callable(second)):
            raise TypeError("transform (and second, if given) must be callable")
        self.first = transform
        self.second = transform if second is None else second

    def __call__(self, img: Any) -> tuple[Any, Any]:
        return self.first(img), self.second(img)

    def __repr__(self) -> str:
        return f"TwoViewTransform(first={self.first!r}, second={self.second!r})"
