"""Balanced classification metrics (docs/method.md §7), computed from the full confusion matrix.

Everything here is pure NumPy over integer counts, so the numbers never depend on batch size or
on how the evaluation loop was split: the loop accumulates (or concatenates) labels and
predictions, :func:`confusion_matrix` counts them once, :func:`classification_metrics` derives
every reported figure from that one matrix, and :func:`aggregate_runs` summarises several runs
(seeds) as mean and std.

Conventions (all fractions in [0, 1]):

* rows of the confusion matrix are the true class, columns the predicted class;
* per-class accuracy is the recall of the class, ``C[i, i] / C[i, :].sum()``;
* a class with no test samples has no defined recall: it is left out of ``per_class_accuracy``,
  of the mean class accuracy, of both stds and of macro-F1, and listed in
  ``classes_without_samples`` (predictions *into* such a class still count as errors for the
  samples' true classes);
* a class that has samples but is never predicted has precision 0/0; its F1 is defined as 0
  (``2·TP / (2·TP + FP + FN)`` with TP = 0 and FN > 0 is already 0, no division by zero).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SCALAR_METRICS: tuple[str, ...] = (
    "accuracy",
    "mean_class_accuracy",
    "macro_f1",
    "std_per_class_ddof0",
    "std_per_class_ddof1",
)
"""The scalar keys of :func:`classification_metrics` that :func:`aggregate_runs` summarises."""


def _as_label_array(name: str, value: Any) -> np.ndarray:
    """A 1-D integer NumPy array from a list, NumPy array or (CPU or CUDA) torch tensor."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor; no torch import needed
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per sample), got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)  # np.asarray([]) is float64; an empty label list is still valid
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """Count (true, predicted) pairs.

    Args:
        y_true: (n,) integer true labels in ``[0, num_classes)``.
        y_pred: (n,) integer predicted labels in ``[0, num_classes)``.
        num_classes: C, the number of classes (> 0).

    Returns:
        (C, C) int64 array, ``out[t, p]`` = number of samples of true class t predicted as p
        (rows = true class).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    t = _as_label_array("y_true", y_true)
    p = _as_label_array("y_pred", y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.shape[0]} and {p.shape[0]}")
    for name, arr in (("y_true", t), ("y_pred", p)):
        bad = (arr < 0) | (arr >= num_classes)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{name} has label {int(arr[i])} at position {i}, outside [0, {num_classes}) "
                f"({int(bad.sum())} out-of-range labels in all)"
            )
    # One bincount over the flattened (t, p) index is exact and O(n).
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def _check_confusion(confusion: Any, classes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    if hasattr(confusion, "detach") and hasattr(confusion, "cpu"):
        confusion = confusion.detach().cpu().numpy()
    cm = np.asarray(confusion)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion must be a square (C, C) matrix, got shape {cm.shape}")
    if cm.size and not (np.issubdtype(cm.dtype, np.integer) or np.issubdtype(cm.dtype, np.floating)):
        raise TypeError(f"confusion must hold counts, got dtype {cm.dtype}")
    if np.issubdtype(cm.dtype, np.floating):
        # Counts read back from JSON may arrive as floats; anything non-integral is not a count.
        if not np.all(np.isfinite(cm)) or not np.all(cm == np.round(cm)):
            raise ValueError("confusion must hold whole-number counts (got non-integer values)")
    if (cm < 0).any():
        raise ValueError("confusion must hold non-negative counts (got a negative entry)")
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (Sequence, np.ndarray)):
        raise TypeError(f"classes must be a sequence of class names, got {type(classes).__name__}")
    names = [str(c) for c in classes]
    if len(names) != cm.shape[0]:
        raise ValueError(f"classes has {len(names)} names but confusion is {cm.shape[0]}x{cm.shape[1]}")
    if len(set(names)) != len(names):
        raise ValueError(f"classes must be distinct, got {names}")
    return cm.astype(np.int64), names


def classification_metrics(confusion: Any, classes: Sequence[str]) -> dict[str, Any]:
    """All §7 metrics from one confusion matrix.

    Args:
        confusion: (C, C) non-negative counts, rows = true class (as from :func:`confusion_matrix`).
        classes: C class names, in label order.

    Returns:
        A JSON-serialisable dict with keys ``classes`` (list of names), ``accuracy``,
        ``per_class_accuracy`` (name -> recall, only classes with samples), ``mean_class_accuracy``
        (balanced accuracy), ``macro_f1``, ``std_per_class_ddof0`` (population std of the per-class
        accuracies, the paper's figure), ``std_per_class_ddof1`` (sample std; ``None`` when fewer
        than two classes have samples), ``confusion_matrix`` (list of lists of int, rows = true),
        ``num_samples`` and ``classes_without_samples`` (names excluded from the per-class stats).
    """
    cm, names = _check_confusion(confusion, classes)
    total = int(cm.sum())
    if total == 0:
        raise ValueError("confusion holds no samples: metrics are undefined for an empty test set")
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)  # true samples per class
    predicted = cm.sum(axis=0)  # predictions per class
    has_samples = support > 0

    recall = tp[has_samples] / support[has_samples]
    fp = predicted - np.diag(cm)
    fn = support - np.diag(cm)
    # 2TP + FP + FN >= support > 0 for every class with samples, so no 0/0 here; a never-predicted
    # class gets TP = 0 and therefore F1 = 0.
    f1 = 2.0 * tp[has_samples] / (2.0 * tp[has_samples] + fp[has_samples] + fn[has_samples])

    return {
        "classes": names,
        "accuracy": float(tp.sum() / total),
        "per_class_accuracy": {n: float(r) for n, r in zip([n for n, h in zip(names, has_samples) if h], recall)},
        "mean_class_accuracy": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "std_per_class_ddof0": float(recall.std(ddof=0)),
        "std_per_class_ddof1": float(recall.std(ddof=1)) if recall.size > 1 else None,
        "confusion_matrix": cm.tolist(),
        "num_samples": total,
        "classes_without_samples": [n for n, h in zip(names, has_samples) if not h],
    }


def predicted_classes(metrics: Mapping[str, Any]) -> list[str]:
    """The classes a :func:`classification_metrics` dict's model predicted at least once (the
    non-empty columns of its confusion matrix). One name means it predicted that class for every sample."""
    columns = [sum(col) for col in zip(*metrics["confusion_matrix"])]
    return [name for name, n in zip(metrics["classes"], columns) if n > 0]


def _summary(values: list[float]) -> dict[str, Any]:
    """Mean and sample std (ddof = 1, the usual "± std over seeds"; ``None`` for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "values": []}
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else None,
        "values": [float(v) for v in arr],
    }


def aggregate_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Summarise several runs' :func:`classification_metrics` dicts (e.g. one per seed).

    Args:
        runs: R >= 1 metrics dicts over the same class list.

    Returns:
        ``{"num_runs": R, "classes": [...], "std_ddof": 1, <metric>: {"mean", "std", "values"} for
        each of :data:`SCALAR_METRICS`, "per_class_accuracy": {name: {"mean", "std", "values"}}}``.
        ``std`` is the sample std over runs (ddof = 1), ``None`` for a single run. A metric that is
        ``None`` in a run (``std_per_class_ddof1`` with one class) and a class without samples in a
        run are left out of that metric's ``values``.
    """
    if isinstance(runs, Mapping) or not isinstance(runs, Sequence):
        raise TypeError(f"runs must be a sequence of metrics dicts, got {type(runs).__name__}")
    if len(runs) == 0:
        raise ValueError("runs is empty: nothing to aggregate")
    classes: list[str] | None = None
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping):
            raise TypeError(f"runs[{i}] must be a metrics dict, got {type(run).__name__}")
        missing = [k for k in ("classes", "per_class_accuracy", *SCALAR_METRICS) if k not in run]
        if missing:
            raise ValueError(f"runs[{i}] is missing metric keys {missing}")
        if classes is None:
            classes = list(run["classes"])
        elif list(run["classes"]) != classes:
            raise ValueError(
                f"runs[{i}] has classes {list(run['classes'])}, but runs[0] has {classes}: "
                "runs over different class lists cannot be aggregated"
            )
    assert classes is not None

    def values_of(key: str) -> list[float]:
        out = []
        for run in runs:
            v = run[key]
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                out.append(float(v))
        return out

    result: dict[str, Any] = {"num_runs": len(runs), "classes": classes, "std_ddof": 1}
    for key in SCALAR_METRICS:
        result[key] = _summary(values_of(key))
    per_class = [run["per_class_accuracy"] for run in runs]
    result["per_class_accuracy"] = {
        name: _summary([float(pc[name]) for pc in per_class if name in pc]) for name in classes
    }
    return result
