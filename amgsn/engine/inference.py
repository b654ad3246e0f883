"""Loading a trained classifier for inference, and predicting a whole data set exactly once.

Shared by ``evaluate``, ``predict`` and the fine-tuning loop's validation pass. A classifier comes
from an ``amgsn finetune`` checkpoint or from an ``amgsn export`` safetensors file (a plain timm
model plus metadata), so a user can evaluate or predict with either.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from amgsn.engine import distributed
from amgsn.engine.common import autocast

CHECKPOINT_NAMES = ("checkpoint-best.pth", "checkpoint-last.pth")
"""What a run folder given instead of a checkpoint resolves to, in order of preference."""


@dataclass
class LoadedClassifier:
    """A classifier ready for inference.

    Attributes:
        model: ``x (B, 3, img_size, img_size) -> logits (B, len(classes))``, in eval mode.
        classes: class names in the model's output order.
        img_size: input side in pixels.
        source: the file it came from.
        info: what else is known (``kind``, ``epoch``, ``model_config`` or ``timm_model``...).
    """

    model: nn.Module
    classes: list[str]
    img_size: int
    source: str
    info: dict[str, Any] = field(default_factory=dict)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder -> its ``checkpoint-best.pth`` (else ``-last``)."""
    p = Path(path)
    if p.is_dir():
        for name in CHECKPOINT_NAMES:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p} is a folder without {' or '.join(CHECKPOINT_NAMES)}")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    return p


def build_classifier_from_state(state: dict[str, Any], *, drop_path_rate: float = 0.0):
    """The :class:`~amgsn.models.ViTClassifier` described by a fine-tuning checkpoint's
    ``model_config`` (weights not loaded)."""
    from amgsn.models import ViTClassifier

    cfg = dict(state["model_config"])
    return ViTClassifier(cfg["model"], cfg["num_classes"], img_size=cfg["img_size"], patch_size=cfg["patch_size"],
                         depth=cfg["depth"], in_chans=cfg.get("in_chans", 3), global_pool=cfg["global_pool"],
                         proj_dim=cfg.get("proj_dim", 128), drop_path_rate=drop_path_rate)


def load_classifier(path: str | os.PathLike, device: str = "cpu") -> LoadedClassifier:
    """Load a fine-tuned classifier from a ``finetune`` checkpoint (or run folder) or an exported
    ``.safetensors`` file. ValueError naming the file when it is neither."""
    p = resolve_checkpoint(path)
    if p.suffix == ".safetensors":
        return _load_exported(p, device)
    from amgsn.engine.checkpoint import load_checkpoint

    state = load_checkpoint(p)
    if state["kind"] != "finetune":
        raise ValueError(f"{p} is a {state['kind']!r} checkpoint; a fine-tuned classifier ('finetune' "
                         "checkpoint from `amgsn finetune`, or an `amgsn export` .safetensors file) is needed")
    for key in ("model_config", "classes"):
        if key not in state:
            raise ValueError(f"{p} is a 'finetune' checkpoint without '{key}'")
    model = build_classifier_from_state(state)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return LoadedClassifier(model, list(state["classes"]), int(state["model_config"]["img_size"]), str(p),
                            {"kind": "finetune", "epoch": state.get("epoch"), "model_config": state["model_config"]})


def _load_exported(path: Path, device: str) -> LoadedClassifier:
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    missing = [k for k in ("timm_model", "timm_kwargs", "classes") if k not in meta]
    if missing:
        raise ValueError(f"{path} has no {missing} metadata: not an `amgsn export` file")
    try:
        kwargs = json.loads(meta["timm_kwargs"])
        classes = json.loads(meta["classes"])
    except ValueError as exc:
        raise ValueError(f"{path}: malformed timm_kwargs/classes metadata ({exc})") from exc
    model = timm.create_model(meta["timm_model"], pretrained=False, num_classes=len(classes), **kwargs)
    model.load_state_dict(load_file(str(path)), strict=True)
    model.to(device).eval()
    img_size = kwargs.get("img_size", model.default_cfg.get("input_size", (3, 224, 224))[-1])
    return LoadedClassifier(model, list(classes), int(img_size), str(path),
                            {"kind": "export", "timm_model": meta["timm_model"], "timm_kwargs": kwargs})


@dataclass
class Predictions:
    """Per-sample results over a data set, in data-set order (index i = sample i)."""

    labels: torch.Tensor  # (n,) int64, the data set's labels
    preds: torch.Tensor  # (n,) int64, argmax of the logits
    probs: torch.Tensor  # (n, C) float32 softmax probabilities


def prediction_loader(
    dataset: Dataset, *, device: str, batch_size: int = 64, workers: int = 0, persistent: bool = False
) -> DataLoader:
    """This rank's share of ``dataset`` in order: samples ``rank, rank + W, ...`` (no padding, so no
    sample is seen twice). ``persistent`` keeps the worker processes for repeated passes (validation
    after every epoch) instead of starting them anew each time."""
    dist = distributed.info()
    mine = list(range(dist.rank, len(dataset), dist.world_size))  # type: ignore[arg-type]
    return DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.startswith("cuda"), persistent_workers=persistent and workers > 0)


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: str,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = False,
    desc: str = "predict",
    loader: DataLoader | None = None,
) -> Predictions:
    """Run ``model`` over every sample of ``dataset`` (items ``(image, label, index)``) once.

    Under torch.distributed each rank takes its share (:func:`prediction_loader`) and the results
    are gathered on every rank and put back in data-set order by index. ``loader``: a
    :func:`prediction_loader` of ``dataset`` to reuse (default: a new one). ``model`` is put in eval
    mode and restored afterwards.
    """
    from tqdm.auto import tqdm

    dist = distributed.info()
    n = len(dataset)  # type: ignore[arg-type]
    if loader is None:
        loader = prediction_loader(dataset, device=device, batch_size=batch_size, workers=workers)
    was_training = model.training
    model.eval()
    idx_parts, label_parts, prob_parts = [], [], []
    for imgs, labels, indices in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                                      disable=not (progress and dist.is_main)):
        with autocast(device):
            logits = model(imgs.to(device, non_blocking=True))
        prob_parts.append(torch.softmax(logits.float(), dim=-1))
        label_parts.append(torch.as_tensor(labels, dtype=torch.int64).to(device))
        idx_parts.append(torch.as_tensor(indices, dtype=torch.int64).to(device))
    model.train(was_training)
    num_classes = _num_outputs(model)
    if prob_parts:
        idx, labels, probs = torch.cat(idx_parts), torch.cat(label_parts), torch.cat(prob_parts)
    else:  # a rank with no samples (tiny set, many ranks) still joins the gather
        idx = torch.zeros(0, dtype=torch.int64, device=device)
        labels = torch.zeros(0, dtype=torch.int64, device=device)
        probs = torch.zeros(0, num_classes, device=device)
    idx = distributed.all_gather_cat(idx).cpu()
    labels = distributed.all_gather_cat(labels).cpu()
    probs = distributed.all_gather_cat(probs).cpu()
    order = torch.argsort(idx)
    if not torch.equal(idx[order], torch.arange(n)):
        raise RuntimeError(f"predictions cover {idx.numel()} samples, expected each of {n} exactly once")
    probs = probs[order]
    return Predictions(labels[order], probs.argmax(dim=-1), probs)


def _num_outputs(model: nn.Module) -> int:
    inner = getattr(model, "vit", model)
    return int(inner.num_classes)
