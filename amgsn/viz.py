"""Plots for evaluation and the run report: each function returns PNG bytes and, given ``out``,
also writes them to that path.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly instead of
``pyplot``: no display is ever needed, the user's global backend is left alone, and no figure
is kept alive in pyplot's registry (which would leak memory in a long training run).

A function whose input holds nothing it can draw (e.g. a log with no loss values) raises
:class:`NothingToPlot`, a ``ValueError``, so a caller such as :mod:`amgsn.report` can skip that
plot and say why.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from amgsn.metrics import _check_confusion

__all__ = [
    "NothingToPlot",
    "mask_gallery",
    "plot_confusion_matrix",
    "plot_loss_curves",
    "plot_per_class_accuracy",
    "plot_ratio_histograms",
    "plot_runs_per_class",
    "plot_saliency_agreement",
]

DPI = 110
_BLUE = "#3b6ea8"
_ORANGE = "#d9822b"
_GREY = "#8a8f98"
# Fine-tuning loss components, in legend order, with fixed colours so every report reads the same.
_FINETUNE_SERIES = (
    ("loss", "total", "#222222"),
    ("loss_ce", "cross-entropy", _BLUE),
    ("loss_center", "debiased center", _ORANGE),
    ("loss_supcon", "SupCon", "#4c9a5b"),
)
_MASK_TINT = np.array([18.0, 24.0, 48.0])  # dark navy: masked patches stay faintly visible beneath it


class NothingToPlot(ValueError):
    """The input holds no data for this plot (a missing key, an empty log, ...)."""


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, out: str | Path | None) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    data = buf.getvalue()
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data


def _style(ax: Any) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None for anything else (missing, NaN, text, bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------- evaluation plots


def plot_confusion_matrix(
    confusion: Any,
    classes: Sequence[str],
    out: str | Path | None = None,
    *,
    title: str = "Confusion matrix (row-normalised)",
) -> bytes:
    """Heat map of the row-normalised confusion matrix.

    Args:
        confusion: (C, C) counts, rows = true class.
        classes: C class names in label order (shown on both axes; rows also show the sample count).
        out: optional path to write the PNG to.
        title: figure title.

    Returns:
        The PNG bytes. Each cell shows the fraction of the true class (and its count when C <= 12);
        a class without samples is drawn as an empty grey row.
    """
    cm, names = _check_confusion(confusion, classes)
    c = cm.shape[0]
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(support[:, None] > 0, cm / np.maximum(support[:, None], 1), np.nan)

    side = max(4.8, 0.72 * c + 2.6)
    fig = _new_figure(side + 0.9, side)
    ax = fig.add_subplot()
    cmap = _cmap("Blues").with_extremes(bad="#f1f2f4")
    im = ax.imshow(np.ma.masked_invalid(norm), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label("fraction of the true class")

    show_counts = c <= 12
    font = 9 if c <= 8 else (7 if c <= 15 else 5)
    for i in range(c):
        for j in range(c):
            if not np.isfinite(norm[i, j]):
                if j == 0:
                    ax.text((c - 1) / 2, i, "no samples", ha="center", va="center", color=_GREY, fontsize=font)
                continue
            text = f"{norm[i, j]:.2f}" + (f"\n({cm[i, j]})" if show_counts else "")
            colour = "white" if norm[i, j] > 0.55 else "#1f2937"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=font, linespacing=1.1)

    ax.set_xticks(range(c), names, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(c), [f"{n} ({s})" for n, s in zip(names, support)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (samples)")
    ax.set_title(title)
    ax.tick_params(length=0)
    # White separators between cells make single cells easy to read at a glance.
    ax.set_xticks(np.arange(c + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(c + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return _finish(fig, out)


def plot_per_class_accuracy(metrics: Mapping[str, Any], out: str | Path | None = None) -> bytes:
    """Bar chart of per-class accuracy with the mean class accuracy (and overall accuracy) as lines.

    Args:
        metrics: a dict from :func:`amgsn.metrics.classification_metrics` (needs ``classes``,
            ``per_class_accuracy`` and ``mean_class_accuracy``; ``accuracy``, ``confusion_matrix``
            and ``std_per_class_ddof0`` are used when present).
        out: optional path to write the PNG to.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict of metrics, got {type(metrics).__name__}")
    missing = [k for k in ("classes", "per_class_accuracy", "mean_class_accuracy") if k not in metrics]
    if missing:
        raise NothingToPlot(f"metrics is missing {missing}")
    names = [str(n) for n in metrics["classes"]]
    per_class = metrics["per_class_accuracy"]
    if not isinstance(per_class, Mapping):
        raise ValueError(f"metrics['per_class_accuracy'] must map class name -> accuracy, got {per_class!r}")
    mean_acc = _number(metrics["mean_class_accuracy"])
    support = None
    cm = metrics.get("confusion_matrix")
    if cm is not None:
        arr = np.asarray(cm)
        if arr.shape == (len(names), len(names)):
            support = arr.sum(axis=1).astype(int)

    values = [_number(per_class.get(n)) for n in names]
    if all(v is None for v in values):
        raise NothingToPlot("metrics['per_class_accuracy'] has no numeric value for any class")
    fig = _new_figure(max(5.5, 0.85 * len(names) + 2.2), 4.2)
    ax = fig.add_subplot()
    _style(ax)
    ax.grid(False, axis="x")
    x = np.arange(len(names))
    heights = [v if v is not None else 0.0 for v in values]
    # Bars under the mean class accuracy are the classes the balance claim is about: colour them.
    colours = [_ORANGE if (v is not None and mean_acc is not None and v < mean_acc) else _BLUE for v in values]
    ax.bar(x, heights, color=colours, width=0.68, zorder=2)
    for xi, v in zip(x, values):
        label = f"{v:.2f}" if v is not None else "no samples"
        # White box + high zorder: the label stays readable where a reference line crosses it.
        ax.text(
            xi,
            (v or 0.0) + 0.015,
            label,
            ha="center",
            va="bottom",
            fontsize=8.5,
            zorder=4,
            color="#1f2937" if v is not None else _GREY,
            bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.85},
        )
    if mean_acc is not None:
        ax.axhline(mean_acc, color="#222222", linewidth=1.4, zorder=3, label=f"mean class accuracy {mean_acc:.3f}")
    overall = _number(metrics.get("accuracy"))
    if overall is not None:
        ax.axhline(
            overall,
            color=_GREY,
            linewidth=1.2,
            linestyle="--",
            zorder=3,
            label=f"overall accuracy {overall:.3f}",
        )
    ticks = names if support is None else [f"{n}\nn={s}" for n, s in zip(names, support)]
    ax.set_xticks(x, ticks, fontsize=9)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("accuracy (recall)")
    ax.set_yticks(np.linspace(0, 1, 6))
    std0 = _number(metrics.get("std_per_class_ddof0"))
    ax.set_title("Per-class accuracy" + (f"  (std {std0:.4f}, ddof 0)" if std0 is not None else ""))
    if mean_acc is not None or overall is not None:
        ax.legend(loc="upper center", ncol=2, fontsize=8.5, framealpha=0.95)
    return _finish(fig, out)


def plot_runs_per_class(summaries: Mapping[str, Mapping[str, Any]], out: str | Path | None = None) -> bytes:
    """Grouped bars: per-class accuracy of several recipes side by side, mean over seeds with the
    seeds' std as error bars (none for a single seed) — the figure a balance claim is read from.

    Args:
        summaries: recipe name -> :func:`amgsn.metrics.aggregate_runs` of its runs (same classes).
        out: optional path to write the PNG to.
    """
    if not isinstance(summaries, Mapping):
        raise TypeError(f"summaries must map recipe name -> aggregate_runs(...), got {type(summaries).__name__}")
    if not summaries:
        raise NothingToPlot("no recipe to plot")
    names = None
    for recipe, summary in summaries.items():
        missing = [k for k in ("classes", "per_class_accuracy", "mean_class_accuracy") if k not in summary]
        if missing:
            raise NothingToPlot(f"summaries[{recipe!r}] is missing {missing}")
        if names is None:
            names = [str(c) for c in summary["classes"]]
        elif [str(c) for c in summary["classes"]] != names:
            raise ValueError(f"summaries[{recipe!r}] has other classes than the first recipe: {summary['classes']}")
    assert names is not None
    fig = _new_figure(max(6.5, 1.1 * len(names) + 2.5), 4.4)
    ax = fig.add_subplot()
    _style(ax)
    ax.grid(False, axis="x")
    x = np.arange(len(names))
    width = 0.8 / len(summaries)
    for k, (recipe, summary) in enumerate(summaries.items()):
        cells = [summary["per_class_accuracy"].get(n) or {} for n in names]
        means = [_number(c.get("mean")) for c in cells]
        stds = [_number(c.get("std")) for c in cells]
        mca = summary["mean_class_accuracy"]
        runs = summary.get("num_runs")
        label = f"{recipe}: mean class acc. {mca['mean']:.3f}" + (
            f" ± {mca['std']:.3f} ({runs} seeds)" if mca.get("std") is not None else f" ({runs or 1} seed)")
        ax.bar(x + (k - (len(summaries) - 1) / 2) * width, [m or 0.0 for m in means], width=width * 0.92,
               yerr=[s or 0.0 for s in stds] if any(s is not None for s in stds) else None,
               capsize=2.5, label=label, zorder=2)
    ax.set_xticks(x, names, fontsize=9)
    ax.set_ylim(0, 1.3)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("accuracy (recall)")
    ax.set_title("Per-class accuracy by recipe (test split)")
    ax.legend(loc="upper center", fontsize=8, framealpha=0.95)
    return _finish(fig, out)


# --------------------------------------------------------------------------- training-log plots


def _stage_records(log_records: Iterable[Mapping[str, Any]], stage: str) -> list[Mapping[str, Any]]:
    """The records of one stage, one per epoch (the last one wins: a resumed run re-logs epochs),
    sorted by epoch. Records without an integer epoch are numbered by their position."""
    by_epoch: dict[float, Mapping[str, Any]] = {}
    position = 0
    for rec in log_records:
        if not isinstance(rec, Mapping) or rec.get("stage") != stage:
            continue
        position += 1
        epoch = _number(rec.get("epoch"))
        by_epoch[epoch if epoch is not None else float(position)] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    pts = [(_number(r.get("epoch")), _number(r.get(key))) for r in records]
    xs = [e if e is not None else float(i + 1) for i, (e, _) in enumerate(pts)]
    ys = [v if v is not None else np.nan for _, v in pts]
    if all(np.isnan(ys)):
        return None
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def _check_records(log_records: Any) -> list[Mapping[str, Any]]:
    if isinstance(log_records, (str, bytes, Mapping)) or not isinstance(log_records, Iterable):
        raise TypeError(f"log_records must be a list of dicts (one per epoch), got {type(log_records).__name__}")
    return list(log_records)


def plot_loss_curves(log_records: Iterable[Mapping[str, Any]], out: str | Path | None = None) -> bytes:
    """Loss curves per epoch: one panel for pre-training, one for fine-tuning (total loss and its
    CE / debiased-center / SupCon components), and one for validation accuracy when logged.

    Args:
        log_records: the ``log.jsonl`` objects (``stage`` is ``"pretrain"`` or ``"finetune"``);
            records of other stages and missing keys are ignored.
        out: optional path to write the PNG to.

    Raises:
        NothingToPlot: no record holds a loss value.
    """
    records = _check_records(log_records)
    pre = _stage_records(records, "pretrain")
    fine = _stage_records(records, "finetune")
    panels: list[tuple[str, list[tuple[str, str, str]], list[Mapping[str, Any]], str]] = []
    if _series(pre, "loss") is not None:
        panels.append(("Pre-training (reconstruction)", [("loss", "norm-pix MSE", _BLUE)], pre, "loss"))
    fine_series = [s for s in _FINETUNE_SERIES if _series(fine, s[0]) is not None]
    if fine_series:
        panels.append(("Fine-tuning", fine_series, fine, "loss"))
    val_series = [
        (k, label, colour)
        for k, label, colour in (
            ("val_accuracy", "accuracy", _BLUE),
            ("val_mean_class_accuracy", "mean class accuracy", _ORANGE),
        )
        if _series(fine, k) is not None
    ]
    if val_series and fine_series:
        panels.append(("Fine-tuning validation", val_series, fine, "fraction"))
    if not panels:
        raise NothingToPlot("no log record has a loss value")

    fig = _new_figure(4.4 * len(panels) + 0.4, 3.7)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, series, recs, ylabel) in zip(axes, panels):
        _style(ax)
        positives = []
        for key, label, colour in series:
            xs, ys = _series(recs, key)  # type: ignore[misc]  # filtered above: never None here
            marker = "o" if len(xs) <= 30 else None
            ax.plot(xs, ys, label=label, color=colour, marker=marker, markersize=3.5, linewidth=1.6)
            positives.append(ys[np.isfinite(ys)])
        vals = np.concatenate(positives)
        # Loss components can differ by orders of magnitude (center loss vs CE): log scale then.
        if ylabel == "loss" and vals.size and vals.min() > 0 and vals.max() / vals.min() > 30:
            ax.set_yscale("log")
        if ylabel == "fraction":
            ax.set_ylim(0, 1.02)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if len(series) > 1:
            ax.legend(fontsize=8.5, framealpha=0.95)
    return _finish(fig, out)


def _histogram(rec: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(edges (k+1,), counts (k,)) from a record's ``ratio_hist``, or None if absent / malformed."""
    hist = rec.get("ratio_hist")
    if not isinstance(hist, Mapping):
        return None
    try:
        edges = np.asarray(hist.get("edges"), dtype=float)
        counts = np.asarray(hist.get("counts"), dtype=float)
    except (TypeError, ValueError):
        return None
    if edges.ndim != 1 or counts.ndim != 1 or edges.size != counts.size + 1 or counts.size == 0:
        return None
    if not (np.all(np.isfinite(edges)) and np.all(np.diff(edges) > 0) and np.all(counts >= 0)):
        return None
    return edges, counts


def plot_ratio_histograms(log_records: Iterable[Mapping[str, Any]], out: str | Path | None = None) -> bytes:
    """MRUS mask-ratio distribution over pre-training: a heat map (epochs x ratio bins, colour =
    fraction of the training images in the bin) next to the mean ratio with its min-max band.

    Args:
        log_records: the ``log.jsonl`` objects; pre-training records with a ``ratio_hist``
            (``{"edges": k+1 floats, "counts": k ints}``) are drawn, others ignored.
        out: optional path to write the PNG to.

    Raises:
        NothingToPlot: no pre-training record holds a valid ratio histogram.
    """
    records = _stage_records(_check_records(log_records), "pretrain")
    rows = []
    for i, rec in enumerate(records):
        h = _histogram(rec)
        if h is not None:
            epoch = _number(rec.get("epoch"))
            rows.append((epoch if epoch is not None else float(i + 1), *h))
    if not rows:
        raise NothingToPlot("no pre-training log record has a valid ratio_hist")

    fig = _new_figure(10.0, max(3.6, min(7.0, 1.6 + 0.12 * len(rows))))
    ax_map, ax_line = fig.subplots(1, 2, width_ratios=[1.35, 1])
    fractions = [counts / counts.sum() if counts.sum() > 0 else counts for _, _, counts in rows]
    vmax = max(float(f.max()) for f in fractions) or 1.0
    norm = Normalize(vmin=0.0, vmax=vmax)
    cmap = _cmap("viridis")
    epochs = [e for e, _, _ in rows]
    # Row heights follow the spacing between logged epochs (epochs may be logged sparsely); each row
    # is drawn with its own bin edges in case the histogram range changed between epochs.
    gaps = np.diff(epochs) if len(epochs) > 1 else np.array([1.0])
    half = float(np.min(gaps)) / 2 if np.all(gaps > 0) else 0.5
    for (epoch, edges, _), frac in zip(rows, fractions):
        mesh = ax_map.pcolormesh(edges, [epoch - half, epoch + half], frac[None, :], cmap=cmap, norm=norm)
    cbar = fig.colorbar(mesh, ax=ax_map, pad=0.02)
    cbar.set_label("fraction of images")
    ax_map.set_xlabel("mask ratio")
    ax_map.set_ylabel("epoch")
    ax_map.set_title("MRUS ratio histogram per epoch")
    ax_map.yaxis.get_major_locator().set_params(integer=True)

    _style(ax_line)
    mean = _series(records, "ratio_mean")
    lo, hi = _series(records, "ratio_min"), _series(records, "ratio_max")
    if mean is None:
        # No logged mean: derive it from the histogram (bin centres weighted by counts).
        xs = np.asarray(epochs)
        ys = np.asarray([np.average((e[1:] + e[:-1]) / 2, weights=c) if c.sum() else np.nan for _, e, c in rows])
        mean = (xs, ys)
    ax_line.plot(
        *mean,
        color=_BLUE,
        linewidth=1.8,
        marker="o" if len(mean[0]) <= 30 else None,
        markersize=3.5,
        label="mean",
    )
    if lo is not None and hi is not None and len(lo[0]) == len(hi[0]):
        ax_line.fill_between(lo[0], lo[1], hi[1], color=_BLUE, alpha=0.18, linewidth=0, label="min-max")
    ax_line.set_xlabel("epoch")
    ax_line.set_ylabel("mask ratio")
    ax_line.set_title("Mask ratio over pre-training")
    ax_line.xaxis.get_major_locator().set_params(integer=True)
    ax_line.legend(fontsize=8.5, loc="best")
    return _finish(fig, out)


def _cmap(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name]


# --------------------------------------------------------------------------- mask gallery


def _load_gallery(npz: Any) -> dict[str, np.ndarray]:
    if isinstance(npz, (str, Path)):
        path = Path(npz)
        if not path.is_file():
            raise ValueError(f"npz: mask gallery file {path} does not exist")
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if hasattr(npz, "files") or isinstance(npz, Mapping):  # an open NpzFile or a plain dict
        return {k: np.asarray(npz[k]) for k in npz}
    raise TypeError(f"npz must be a path or a mapping of arrays, got {type(npz).__name__}")


def _check_gallery(
    g: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, list[str]]:
    missing = [k for k in ("images", "labels", "abmg_mask", "random_mask", "patch_size", "classes") if k not in g]
    if missing:
        raise ValueError(f"npz: mask gallery is missing arrays {missing}")
    images, labels = g["images"], g["labels"]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"npz['images'] must be (n, H, W, 3) uint8, got {images.shape} {images.dtype}")
    n, h, w = images.shape[:3]
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"npz['labels'] must be ({n},) integers, got {labels.shape} {labels.dtype}")
    if g["patch_size"].size != 1:
        raise ValueError(f"npz['patch_size'] must be a scalar, got shape {g['patch_size'].shape}")
    p = int(g["patch_size"].reshape(()))
    if p <= 0 or h % p or w % p:
        raise ValueError(f"npz['patch_size'] = {p} does not tile the {h}x{w} images")
    num_patches = (h // p) * (w // p)
    for key in ("abmg_mask", "random_mask"):
        m = g[key]
        if m.shape != (n, num_patches) or m.dtype != np.bool_:
            raise ValueError(
                f"npz['{key}'] must be ({n}, {num_patches}) bool ({h}x{w} images, patch {p}), got {m.shape} {m.dtype}"
            )
    if "bank_mask" in g and (g["bank_mask"].shape != (n, num_patches) or g["bank_mask"].dtype != np.bool_):
        raise ValueError(f"npz['bank_mask'] must be ({n}, {num_patches}) bool, got {g['bank_mask'].shape} "
                         f"{g['bank_mask'].dtype}")
    classes = [str(c) for c in np.atleast_1d(g["classes"])]
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(
            f"npz['labels'] must lie in [0, {len(classes)}) (the classes), got {labels.min()}..{labels.max()}"
        )
    return images, labels.astype(np.int64), g["abmg_mask"], g["random_mask"], p, classes


def _apply_mask(image: np.ndarray, mask: np.ndarray, p: int) -> np.ndarray:
    """Darken the masked patches of ``image`` (H, W, 3) uint8; ``mask`` (N,) bool, row-major patches."""
    h, w = image.shape[:2]
    grid = mask.reshape(h // p, w // p)
    pixel_mask = np.kron(grid, np.ones((p, p), dtype=bool))[..., None]
    img = image.astype(np.float32)
    shaded = 0.28 * img + 0.72 * _MASK_TINT
    return np.where(pixel_mask, shaded, img).astype(np.uint8)


def mask_gallery(
    npz: Any,
    out: str | Path | None = None,
    *,
    max_per_class: int | None = 2,
    rows_per_block: int = 7,
    title: str | None = None,
) -> bytes:
    """Grid of sample faces: rows grouped by class (class name on the left), columns = original |
    ABMG-masked | random-masked, masked patches darkened and each masked panel captioned with its
    mask ratio. A gallery written with the saliency bank (docs/method.md §4.4) holds ``bank_mask`` too
    (and ``bank_seen``): then the columns are original | fresh ABMG | bank ABMG | random, the bank's
    panel captioned "not seen" for an image the bank has no map of yet.

    Args:
        npz: path to a ``mask_gallery/*.npz`` file or a mapping with arrays ``images`` (n, H, W, 3)
            uint8, ``labels`` (n,) int, ``abmg_mask`` / ``random_mask`` (n, N) bool (True = masked,
            patches in row-major order), scalar ``patch_size`` and ``classes`` (names).
        out: optional path to write the PNG to.
        max_per_class: at most this many rows per class (None: all).
        rows_per_block: rows per block of three columns; longer galleries wrap into more blocks.
        title: optional figure title (e.g. "start of pre-training").
    """
    if max_per_class is not None and (isinstance(max_per_class, bool) or max_per_class < 1):
        raise ValueError(f"max_per_class must be a positive int or None, got {max_per_class!r}")
    if isinstance(rows_per_block, bool) or not isinstance(rows_per_block, int) or rows_per_block < 1:
        raise ValueError(f"rows_per_block must be a positive int, got {rows_per_block!r}")
    g = _load_gallery(npz)
    images, labels, abmg, rand, p, classes = _check_gallery(g)
    bank = g.get("bank_mask")
    bank_seen = g.get("bank_seen", np.ones(len(labels), dtype=bool)) if bank is not None else None
    cols = 3 if bank is None else 4
    order = np.argsort(labels, kind="stable")
    if max_per_class is not None:
        seen: dict[int, int] = {}
        kept = []
        for i in order:
            seen[labels[i]] = seen.get(labels[i], 0) + 1
            if seen[labels[i]] <= max_per_class:
                kept.append(i)
        order = np.asarray(kept, dtype=np.int64)
    if order.size == 0:
        raise NothingToPlot("the mask gallery holds no images")

    h, w = images.shape[1:3]
    # Long galleries wrap into side-by-side blocks of (original | ABMG | random) columns, so a
    # 7-class gallery stays about as wide as it is tall instead of one very tall strip.
    blocks = max(1, math.ceil(len(order) / rows_per_block))
    rows = math.ceil(len(order) / blocks)
    cell = 1.55
    fig = _new_figure(blocks * (cols * cell * w / h + 1.0), rows * cell + (0.75 if title else 0.45))
    axes = fig.subplots(rows, cols * blocks, squeeze=False)
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    for ax in axes.flat:
        ax.set_axis_off()  # switched back on for the cells that hold an image
    for slot, i in enumerate(order):
        r, block = slot % rows, slot // rows
        img = images[i] if images.shape[-1] == 3 else np.repeat(images[i], 3, axis=-1)
        panels = [
            (img, None),
            (_apply_mask(img, abmg[i], p), abmg[i]),
            (_apply_mask(img, rand[i], p), rand[i]),
        ]
        if bank is not None:
            panels.insert(2, (_apply_mask(img, bank[i], p), bank[i]))
        titles = ("original", "ABMG mask", "random mask") if bank is None else (
            "original", "ABMG (fresh)", "ABMG (bank)", "random mask")
        for c, (shown, mask) in enumerate(panels):
            ax = axes[r, cols * block + c]
            ax.set_axis_on()
            ax.imshow(shown, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if mask is not None:
                # Faint patch grid so neighbouring masked patches still read as separate squares.
                for k in range(1, w // p):
                    ax.axvline(k * p - 0.5, color="white", alpha=0.18, linewidth=0.4)
                for k in range(1, h // p):
                    ax.axhline(k * p - 0.5, color="white", alpha=0.18, linewidth=0.4)
                unseen = bank is not None and c == 2 and not bank_seen[i]
                ax.text(
                    0.03,
                    0.04,
                    "not seen" if unseen else f"{mask.mean():.0%}",
                    transform=ax.transAxes,
                    fontsize=7,
                    color="white",
                    va="bottom",
                    ha="left",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "black", "alpha": 0.55, "lw": 0},
                )
            if r == 0:
                ax.set_title(titles[c], fontsize=9.5)
        axes[r, cols * block].set_ylabel(classes[labels[i]], fontsize=9, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=11)
    return _finish(fig, out)


def plot_saliency_agreement(log_records: Iterable[Mapping[str, Any]], out: str | Path | None = None,
                            target: float | None = 0.7) -> bytes:
    """The saliency bank's quality guard over pre-training (docs/method.md §4.4): per epoch the mean
    Spearman rank correlation between the bank's scores and a fresh teacher pass on a fixed probe batch
    (``saliency_agreement``), with the fraction of images the bank has a map of (``saliency_coverage``)
    and a dotted ``target`` line.

    Raises:
        NothingToPlot: no pre-training record holds a ``saliency_agreement`` value.
    """
    records = _stage_records(_check_records(log_records), "pretrain")
    agreement = _series(records, "saliency_agreement")
    if agreement is None:
        raise NothingToPlot("no pre-training log record has a saliency_agreement value")
    fig = _new_figure(6.2, 3.7)
    ax = fig.subplots()
    _style(ax)
    marker = "o" if len(agreement[0]) <= 30 else None
    ax.plot(*agreement, color=_BLUE, marker=marker, markersize=3.5, linewidth=1.8, label="agreement (Spearman)")
    coverage = _series(records, "saliency_coverage")
    if coverage is not None:
        ax.plot(*coverage, color=_GREY, linestyle="--", linewidth=1.4, label="bank coverage")
    if target is not None:
        ax.axhline(target, color=_ORANGE, linestyle=":", linewidth=1.4, label=f"target {target:g}")
    refresh = next((r.get("saliency_refresh") for r in records if r.get("saliency_refresh") is not None), None)
    ax.set_title("Saliency bank vs a fresh teacher" + (f" (P = {refresh:g})" if refresh is not None else ""))
    ax.set_xlabel("epoch")
    ax.set_ylabel("Spearman ρ / fraction")
    ax.set_ylim(min(0.0, float(np.nanmin(agreement[1])) - 0.05), 1.02)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8.5, loc="lower right", framealpha=0.95)
    return _finish(fig, out)
