"""Balanced evaluation (docs/method.md §7) of a fine-tuned classifier on a full data-set split.

``evaluate(checkpoint, dataset, data_dir, split)`` predicts every sample exactly once (split over
ranks under torch.distributed, then gathered), builds one confusion matrix and writes, into
``out``: ``metrics.json`` (:func:`amgsn.metrics.classification_metrics` plus where the numbers
came from), ``confusion_matrix.png``, ``per_class_accuracy.png``, ``predictions.csv`` and
``config.json``. :func:`summarize_runs` aggregates several runs' ``metrics.json`` (one per seed)
into mean ± std (``summary.json``).

Class names, not label numbers, tie a data set to a checkpoint: a data set with the same names in
another order is re-mapped by name; one with other names needs ``class_map`` (data-set name ->
checkpoint name), else a ValueError lists the difference.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from amgsn.engine import distributed
from amgsn.engine.checkpoint import write_text_atomic
from amgsn.engine.common import resolve_device
from amgsn.engine.inference import load_classifier, predict_dataset, resolve_checkpoint
from amgsn.metrics import aggregate_runs, classification_metrics, confusion_matrix


def label_mapping(
    dataset_classes: Sequence[str], model_classes: Sequence[str], class_map: Mapping[str, str] | None = None
) -> list[int]:
    """For each data-set class index, the model's class index (matched by name).

    ``class_map`` renames data-set classes to model classes first (several may map to one).
    ValueError naming the unmatched classes when a data-set class has no model class.
    """
    class_map = dict(class_map or {})
    unknown_keys = sorted(set(class_map) - set(dataset_classes))
    if unknown_keys:
        raise ValueError(f"class_map names {unknown_keys}, which are not classes of the data set "
                         f"({list(dataset_classes)})")
    index = {name: i for i, name in enumerate(model_classes)}
    mapping, unmatched = [], []
    for name in dataset_classes:
        target = class_map.get(name, name)
        if target not in index:
            unmatched.append(name if target == name else f"{name} -> {target}")
            mapping.append(-1)
        else:
            mapping.append(index[target])
    if unmatched:
        raise ValueError(
            f"the data set's classes {list(dataset_classes)} differ from the checkpoint's {list(model_classes)}: "
            f"no checkpoint class for {unmatched}. Pass a class map (--class-map 'DatasetName=CheckpointName,...')"
        )
    return mapping


def parse_class_map(text: str | None) -> dict[str, str] | None:
    """``"Angry=Anger,Happy=Happiness"`` (or a path to a JSON object file) -> dict; None stays None."""
    if text is None:
        return None
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            obj = json.load(f)
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
            raise ValueError(f"--class-map file {text} must hold a JSON object of name -> name")
        return obj
    out: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if part.count("=") != 1:
            raise ValueError(f"--class-map entries must look like 'DatasetName=CheckpointName', got {part!r}")
        k, v = (s.strip() for s in part.split("="))
        if not k or not v:
            raise ValueError(f"--class-map entry {part!r} has an empty name")
        out[k] = v
    return out


def default_out(checkpoint: str | os.PathLike, split: str) -> Path:
    """``<checkpoint folder>/eval`` for the test split (where ``amgsn report`` looks), else
    ``<checkpoint folder>/eval-<split>``."""
    folder = resolve_checkpoint(checkpoint).parent
    return folder / ("eval" if split == "test" else f"eval-{split}")


def evaluate(
    checkpoint: str | os.PathLike,
    dataset: str,
    data_dir: str | os.PathLike,
    split: str = "test",
    out: str | os.PathLike | None = None,
    class_map: Mapping[str, str] | None = None,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
    skip_bad: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a fine-tuned classifier on the full ``split`` of a data set.

    Args:
        checkpoint: a ``finetune`` checkpoint, a fine-tuning run folder (its best checkpoint) or an
            ``amgsn export`` ``.safetensors`` file.
        dataset, data_dir, split: the data (``build_dataset``'s name, root, split).
        out: output folder (default :func:`default_out`).
        class_map: data-set class name -> checkpoint class name, for data sets named differently.
        num_classes: AffectNet / FERPlus 7 or 8. classes: a ``folder`` data set's class list or a
            known data set's name (default: the checkpoint's classes).

    Returns:
        The metrics dict written to ``metrics.json`` (classes are the checkpoint's, in its order).
    """
    from amgsn.data import build_dataset, build_eval_transform

    device = resolve_device(device)
    dist = distributed.init(device)
    if device == "cuda" and dist.enabled:
        device = f"cuda:{dist.local_rank}"
    loaded = load_classifier(checkpoint, device)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "skip_bad": skip_bad}
    if dataset == "folder":
        # A str names a known data set's list (see ``amgsn.data.folder.resolve_classes``).
        kwargs["classes"] = (classes if isinstance(classes, str) else list(classes)) if classes else loaded.classes
    data = build_dataset(dataset, data_dir, split, transform=build_eval_transform(loaded.img_size), **kwargs)
    if len(data) == 0:
        raise ValueError(f"the {split!r} split of {dataset} at {data_dir} has no samples")
    mapping = torch.tensor(label_mapping(data.classes, loaded.classes, class_map), dtype=torch.int64)
    pred = predict_dataset(loaded.model, data, device=device, batch_size=batch_size, workers=workers,
                           progress=progress, desc=f"evaluate {split}")
    true = mapping[pred.labels]
    metrics = classification_metrics(confusion_matrix(true, pred.preds, len(loaded.classes)), loaded.classes)
    metrics.update({
        "checkpoint": loaded.source, "checkpoint_epoch": loaded.info.get("epoch"), "dataset": dataset,
        "data_dir": str(data_dir), "split": split, "dataset_classes": list(data.classes),
        "class_map": dict(class_map) if class_map else None, "skipped_items": len(data.skipped),
    })
    out_dir = Path(out) if out is not None else default_out(checkpoint, split)
    if dist.is_main:
        _write_outputs(out_dir, metrics, data, true, pred, loaded.classes)
    distributed.barrier()
    metrics["out"] = str(out_dir)
    return metrics


def _write_outputs(out: Path, metrics: dict[str, Any], data: Any, true: torch.Tensor, pred: Any,
                   classes: list[str]) -> None:
    from amgsn.engine.common import write_config
    from amgsn.viz import plot_confusion_matrix, plot_per_class_accuracy

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(metrics, indent=2) + "\n", out / "metrics.json")
    write_config(out, {"stage": "evaluate", **{k: metrics[k] for k in
                                                ("checkpoint", "dataset", "data_dir", "split", "class_map")}})
    plot_confusion_matrix(metrics["confusion_matrix"], classes, out / "confusion_matrix.png")
    plot_per_class_accuracy(metrics, out / "per_class_accuracy.png")
    where = getattr(data, "where", None)
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["index", "source", "true", "predicted", "confidence"])
        for i in range(len(true)):
            p = int(pred.preds[i])
            w.writerow([i, where(i) if where else "", classes[int(true[i])], classes[p],
                        f"{float(pred.probs[i, p]):.6f}"])


def summarize_runs(metrics_paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Mean ± std (over runs, ddof 1) of every metric of several ``metrics.json`` files.

    A path may also be an evaluation folder holding ``metrics.json``. With ``out`` (a folder),
    writes ``out/summary.json``. Returns :func:`amgsn.metrics.aggregate_runs`'s dict plus
    ``runs`` (the files read).
    """
    if isinstance(metrics_paths, (str, os.PathLike)) or len(metrics_paths) == 0:
        raise ValueError("metrics_paths must be a non-empty list of metrics.json files")
    files, runs = [], []
    for p in metrics_paths:
        path = Path(p)
        if path.is_dir():
            path = path / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"metrics file not found: {path}")
        try:
            runs.append(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc})") from exc
        files.append(str(path))
    try:
        summary = aggregate_runs(runs)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot aggregate {files}: {exc}") from exc
    summary["runs"] = files
    if out is not None:
        write_text_atomic(json.dumps(summary, indent=2) + "\n", Path(out) / "summary.json")
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """A few lines of text: each scalar metric as mean ± std over the runs."""
    from amgsn.metrics import SCALAR_METRICS

    lines = [f"{summary['num_runs']} runs"]
    for key in SCALAR_METRICS:
        s = summary[key]
        if s["mean"] is None:
            continue
        std = "" if s["std"] is None else f" ± {s['std']:.4f}"
        lines.append(f"  {key:<22} {s['mean']:.4f}{std}")
    return "\n".join(lines)
