"""amgsn.metrics against hand-computed values and against straightforward loops (no sklearn)."""

from __future__ import annotations

import json
import math
import statistics
from fractions import Fraction

import numpy as np
import pytest
import torch

from amgsn.metrics import (
    SCALAR_METRICS,
    aggregate_runs,
    classification_metrics,
    confusion_matrix,
    predicted_classes,
)

KEYS = {
    "classes",
    "accuracy",
    "per_class_accuracy",
    "mean_class_accuracy",
    "macro_f1",
    "std_per_class_ddof0",
    "std_per_class_ddof1",
    "confusion_matrix",
    "num_samples",
    "classes_without_samples",
}


# --------------------------------------------------------------------------- confusion_matrix


def test_confusion_matrix_by_hand():
    cm = confusion_matrix([0, 1, 2, 2, 1, 0], [0, 2, 2, 1, 1, 1], 4)
    expected = [[1, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert cm.dtype == np.int64 and cm.shape == (4, 4)
    assert cm.tolist() == expected


def test_confusion_matrix_random_vs_loop(seed):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(1, 12))
    n = int(rng.integers(0, 400))
    t = rng.integers(0, c, n)
    p = rng.integers(0, c, n)
    expected = [[0] * c for _ in range(c)]
    for a, b in zip(t.tolist(), p.tolist()):
        expected[a][b] += 1
    assert confusion_matrix(t, p, c).tolist() == expected
    # torch tensors (any integer dtype) and lists give the same counts
    assert confusion_matrix(torch.from_numpy(t).int(), torch.from_numpy(p), c).tolist() == expected
    assert confusion_matrix(t.tolist(), p.tolist(), c).tolist() == expected


def test_confusion_matrix_bad_input():
    with pytest.raises(ValueError, match=r"y_pred has label 3 at position 1, outside \[0, 3\)"):
        confusion_matrix([0, 1], [0, 3], 3)
    with pytest.raises(ValueError, match="y_true has label -1"):
        confusion_matrix([-1, 1], [0, 1], 3)
    with pytest.raises(ValueError, match="same length, got 2 and 3"):
        confusion_matrix([0, 1], [0, 1, 1], 3)
    with pytest.raises(TypeError, match="y_true must hold integer class indices"):
        confusion_matrix([0.0, 1.0], [0, 1], 3)
    with pytest.raises(ValueError, match="y_pred must be 1-D"):
        confusion_matrix([0, 1], [[0, 1]], 3)
    with pytest.raises(ValueError, match="num_classes must be positive"):
        confusion_matrix([], [], 0)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        confusion_matrix([0], [0], 2.0)


# --------------------------------------------------------------------------- classification_metrics


def test_metrics_by_hand():
    # rows = true class; support 4, 4, 2; TP 3, 2, 1
    cm = [[3, 1, 0], [0, 2, 2], [1, 0, 1]]
    m = classification_metrics(np.array(cm), ["a", "b", "c"])
    assert set(m) == KEYS
    assert m["classes"] == ["a", "b", "c"]
    assert m["num_samples"] == 10
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["per_class_accuracy"] == pytest.approx({"a": 3 / 4, "b": 2 / 4, "c": 1 / 2})
    assert m["mean_class_accuracy"] == pytest.approx(7 / 12)
    # deviations from 7/12: 1/6, -1/12, -1/12 -> sum of squares 1/24
    assert m["std_per_class_ddof0"] == pytest.approx(math.sqrt(1 / 24 / 3))
    assert m["std_per_class_ddof1"] == pytest.approx(math.sqrt(1 / 24 / 2))
    # F1 = 2TP / (2TP + FP + FN): a: 6/8, b: 4/7, c: 2/5
    assert m["macro_f1"] == pytest.approx((6 / 8 + 4 / 7 + 2 / 5) / 3)
    assert m["confusion_matrix"] == cm
    assert m["classes_without_samples"] == []


def test_metrics_class_without_samples_and_never_predicted():
    # "D" has no samples (but is predicted once); "B" has samples but is never predicted.
    cm = [[2, 0, 0, 1], [1, 0, 1, 0], [0, 0, 3, 0], [0, 0, 0, 0]]
    m = classification_metrics(cm, ["A", "B", "C", "D"])
    assert m["classes_without_samples"] == ["D"]
    assert set(m["per_class_accuracy"]) == {"A", "B", "C"}
    assert m["per_class_accuracy"] == pytest.approx({"A": 2 / 3, "B": 0.0, "C": 1.0})
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["mean_class_accuracy"] == pytest.approx(5 / 9)
    # F1: A = 4/6, B = 0 (never predicted), C = 6/7; D is excluded
    assert m["macro_f1"] == pytest.approx((4 / 6 + 0 + 6 / 7) / 3)
    assert m["std_per_class_ddof0"] == pytest.approx(statistics.pstdev([2 / 3, 0, 1]))
    assert m["std_per_class_ddof1"] == pytest.approx(statistics.stdev([2 / 3, 0, 1]))


def test_metrics_single_class_with_samples():
    m = classification_metrics([[0, 0], [1, 3]], ["x", "y"])
    assert m["per_class_accuracy"] == {"y": 0.75}
    assert m["mean_class_accuracy"] == 0.75
    assert m["std_per_class_ddof0"] == 0.0
    assert m["std_per_class_ddof1"] is None  # undefined for one value, never NaN in JSON
    assert m["macro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 0 + 1))


def test_metrics_perfect_and_all_wrong():
    perfect = classification_metrics(np.diag([5, 1, 7]), ["a", "b", "c"])
    assert perfect["accuracy"] == perfect["mean_class_accuracy"] == perfect["macro_f1"] == 1.0
    assert perfect["std_per_class_ddof0"] == perfect["std_per_class_ddof1"] == 0.0
    wrong = classification_metrics([[0, 4], [2, 0]], ["a", "b"])
    assert wrong["accuracy"] == wrong["mean_class_accuracy"] == wrong["macro_f1"] == 0.0


def _loop_metrics(y_true: list[int], y_pred: list[int], c: int) -> dict:
    """The §7 metrics the long way, with exact fractions, for comparison."""
    support = [sum(1 for t in y_true if t == k) for k in range(c)]
    tp = [sum(1 for t, p in zip(y_true, y_pred) if t == p == k) for k in range(c)]
    fp = [sum(1 for t, p in zip(y_true, y_pred) if p == k and t != k) for k in range(c)]
    fn = [support[k] - tp[k] for k in range(c)]
    present = [k for k in range(c) if support[k] > 0]
    recall = {k: Fraction(tp[k], support[k]) for k in present}
    f1 = {k: Fraction(2 * tp[k], 2 * tp[k] + fp[k] + fn[k]) for k in present}
    rec = [float(recall[k]) for k in present]
    return {
        "accuracy": Fraction(sum(tp), len(y_true)),
        "recall": recall,
        "mean": sum(recall.values()) / len(present),
        "macro_f1": sum(f1.values()) / len(present),
        "std0": statistics.pstdev(rec),
        "std1": statistics.stdev(rec) if len(rec) > 1 else None,
        "absent": [k for k in range(c) if support[k] == 0],
    }


def test_metrics_random_vs_loops(seed):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(2, 10))
    n = int(rng.integers(1, 300))
    # Skewed class frequencies (some classes may get no samples) and a noisy "classifier".
    y_true = rng.choice(c, size=n, p=rng.dirichlet(np.full(c, 0.6)))
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, c, n))
    names = [f"class{k}" for k in range(c)]
    m = classification_metrics(confusion_matrix(y_true, y_pred, c), names)
    ref = _loop_metrics(y_true.tolist(), y_pred.tolist(), c)
    assert m["num_samples"] == n
    assert m["accuracy"] == pytest.approx(float(ref["accuracy"]))
    assert m["per_class_accuracy"] == pytest.approx({names[k]: float(v) for k, v in ref["recall"].items()})
    assert m["mean_class_accuracy"] == pytest.approx(float(ref["mean"]))
    assert m["macro_f1"] == pytest.approx(float(ref["macro_f1"]))
    assert m["std_per_class_ddof0"] == pytest.approx(ref["std0"], abs=1e-12)
    if ref["std1"] is None:
        assert m["std_per_class_ddof1"] is None
    else:
        assert m["std_per_class_ddof1"] == pytest.approx(ref["std1"], abs=1e-12)
    assert m["classes_without_samples"] == [names[k] for k in ref["absent"]]
    for key in ("accuracy", "mean_class_accuracy", "macro_f1", "std_per_class_ddof0"):
        assert 0.0 <= m[key] <= 1.0
    # Strict JSON (no NaN) and a round trip through it gives the same metrics.
    text = json.dumps(m, allow_nan=False)
    again = json.loads(text)
    assert classification_metrics(again["confusion_matrix"], again["classes"]) == m


def test_metrics_bad_input():
    with pytest.raises(ValueError, match="square"):
        classification_metrics([[1, 2, 3]], ["a"])
    with pytest.raises(ValueError, match="classes has 3 names but confusion is 2x2"):
        classification_metrics([[1, 0], [0, 1]], ["a", "b", "c"])
    with pytest.raises(ValueError, match="non-negative"):
        classification_metrics([[1, -1], [0, 1]], ["a", "b"])
    with pytest.raises(ValueError, match="whole-number"):
        classification_metrics([[1.5, 0], [0, 1]], ["a", "b"])
    with pytest.raises(ValueError, match="no samples"):
        classification_metrics([[0, 0], [0, 0]], ["a", "b"])
    with pytest.raises(ValueError, match="distinct"):
        classification_metrics([[1, 0], [0, 1]], ["a", "a"])
    with pytest.raises(TypeError, match="classes must be a sequence"):
        classification_metrics([[1, 0], [0, 1]], "ab")


# --------------------------------------------------------------------------- aggregate_runs


def test_aggregate_runs_by_hand():
    names = ["a", "b", "c"]
    r1 = classification_metrics([[3, 1, 0], [0, 2, 2], [1, 0, 1]], names)
    r2 = classification_metrics([[4, 0, 0], [1, 3, 0], [0, 0, 0]], names)  # "c" without samples
    r3 = classification_metrics([[2, 2, 0], [0, 4, 0], [0, 1, 1]], names)
    agg = aggregate_runs([r1, r2, r3])
    assert agg["num_runs"] == 3 and agg["classes"] == names and agg["std_ddof"] == 1
    for key in SCALAR_METRICS:
        vals = [r[key] for r in (r1, r2, r3)]
        assert agg[key]["values"] == pytest.approx(vals)
        assert agg[key]["mean"] == pytest.approx(statistics.fmean(vals))
        assert agg[key]["std"] == pytest.approx(statistics.stdev(vals))
    # accuracy: 6/10, 7/8, 7/10
    assert agg["accuracy"]["mean"] == pytest.approx((0.6 + 0.875 + 0.7) / 3)
    assert agg["per_class_accuracy"]["a"]["values"] == pytest.approx([0.75, 1.0, 0.5])
    assert agg["per_class_accuracy"]["b"]["mean"] == pytest.approx((0.5 + 0.75 + 1.0) / 3)
    # "c" had no samples in r2: only r1 and r3 count
    assert agg["per_class_accuracy"]["c"]["values"] == pytest.approx([0.5, 0.5])
    assert agg["per_class_accuracy"]["c"]["std"] == pytest.approx(0.0)
    json.dumps(agg, allow_nan=False)


def test_aggregate_single_run_and_missing_ddof1():
    one = classification_metrics([[0, 0], [1, 3]], ["x", "y"])  # std ddof1 is None
    agg = aggregate_runs([one])
    assert agg["num_runs"] == 1
    assert agg["accuracy"] == {"mean": 0.75, "std": None, "values": [0.75]}
    assert agg["std_per_class_ddof1"] == {"mean": None, "std": None, "values": []}
    assert agg["per_class_accuracy"]["x"] == {"mean": None, "std": None, "values": []}


def test_aggregate_bad_input():
    a = classification_metrics([[1, 0], [0, 1]], ["a", "b"])
    b = classification_metrics([[1, 0], [0, 1]], ["a", "c"])
    with pytest.raises(ValueError, match="runs is empty"):
        aggregate_runs([])
    with pytest.raises(ValueError, match=r"runs\[1\] has classes \['a', 'c'\]"):
        aggregate_runs([a, b])
    with pytest.raises(ValueError, match=r"runs\[0\] is missing metric keys \['macro_f1'\]"):
        aggregate_runs([{k: v for k, v in a.items() if k != "macro_f1"}])
    with pytest.raises(TypeError, match=r"runs\[1\] must be a metrics dict"):
        aggregate_runs([a, 3])
    with pytest.raises(TypeError, match="runs must be a sequence"):
        aggregate_runs(a)


def test_predicted_classes_are_the_non_empty_columns():
    classes = ["A", "B", "C"]
    assert predicted_classes({"classes": classes, "confusion_matrix": [[0, 4, 0], [0, 9, 0], [0, 2, 0]]}) == ["B"]
    assert predicted_classes({"classes": classes, "confusion_matrix": [[5, 0, 1], [3, 0, 0], [0, 0, 2]]}) == ["A", "C"]
    # from a real metrics dict: a class never predicted (though it has samples) is not listed
    m = classification_metrics(confusion_matrix([0, 1, 1, 2], [0, 0, 2, 2], 3), classes)
    assert predicted_classes(m) == ["A", "C"]
