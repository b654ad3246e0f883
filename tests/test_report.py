"""amgsn.viz plots and the self-contained HTML report built by amgsn.report from a fake run folder."""

from __future__ import annotations

import base64
import io
import json
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import BarContainer
from PIL import Image

from amgsn import viz
from amgsn.metrics import aggregate_runs, classification_metrics, confusion_matrix
from amgsn.report import build_report

HEADINGS = [
    "Configuration",
    "Metrics",
    "Confusion matrix",
    "Per-class accuracy",
    "Mask gallery",
    "MRUS ratio histograms",
    "Loss curves",
]
# A class name and a config value that would break the page (or run script) if not escaped.
EVIL = '<b>Fear</b> & "co"'
CLASSES = ["Surprise", EVIL, "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Collects what the tests check: h2 texts, img sources, tags, links and note paragraphs."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.h2: list[str] = []
        self.imgs: list[str] = []
        self.urls: list[str] = []
        self.notes = 0
        self.text: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "h2":
            self._in_h2 = True
            self.h2.append("")
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for key in ("href", "src"):
            if key in a and tag != "img":
                self.urls.append(a[key])
        if tag == "p" and "note" in (a.get("class") or ""):
            self.notes += 1

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.h2[-1] += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _decode_png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    data = base64.b64decode(src[len(prefix) :], validate=True)
    assert data.startswith(PNG_MAGIC)
    Image.open(io.BytesIO(data)).verify()  # checks the PNG's chunks and CRCs
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# --------------------------------------------------------------------------- fake run folder


def _log_records(rng: np.random.Generator, pre_epochs: int = 4, fine_epochs: int = 3) -> list[dict]:
    recs = []
    for e in range(pre_epochs):
        ratios = np.clip(rng.normal(0.75, 0.03 * (e + 1), 64), 0.5, 0.9)
        counts, edges = np.histogram(ratios, bins=10, range=(0.5, 0.9))
        recs.append(
            {
                "stage": "pretrain",
                "epoch": e,
                "loss": float(1.0 / (e + 1)),
                "lr": 1e-3,
                "ratio_mean": float(ratios.mean()),
                "ratio_min": float(ratios.min()),
                "ratio_max": float(ratios.max()),
                "ratio_hist": {"edges": edges.tolist(), "counts": counts.tolist()},
                "images_per_s": 100.0,
                "skipped_steps": 0,
            }
        )
    for e in range(fine_epochs):
        recs.append(
            {
                "stage": "finetune",
                "epoch": e,
                "loss": 3.0 - e,
                "loss_ce": 2.0 - 0.5 * e,
                "loss_center": 50.0 / (e + 1),
                "loss_supcon": 4.0 - e,
                "lr": 1e-3,
                "val_accuracy": 0.3 + 0.1 * e,
                "val_mean_class_accuracy": 0.25 + 0.1 * e,
                "images_per_s": 80.0,
            }
        )
    return recs


def _gallery(rng: np.random.Generator, n: int = 9, size: int = 32, patch: int = 8) -> dict[str, np.ndarray]:
    num_patches = (size // patch) ** 2
    return {
        "images": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "labels": rng.integers(0, len(CLASSES), n),
        "abmg_mask": rng.random((n, num_patches)) < 0.75,
        "random_mask": rng.random((n, num_patches)) < 0.75,
        "patch_size": np.array(patch),
        "classes": np.array(CLASSES),
    }


def _metrics(rng: np.random.Generator) -> dict:
    y = rng.integers(0, len(CLASSES), 120)
    p = np.where(rng.random(120) < 0.7, y, rng.integers(0, len(CLASSES), 120))
    return classification_metrics(confusion_matrix(y, p, len(CLASSES)), CLASSES)


def _write_run(root: Path, rng: np.random.Generator) -> dict:
    for sub in ("pretrain/mask_gallery", "finetune", "eval"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    recs = _log_records(rng)
    (root / "pretrain" / "config.json").write_text(json.dumps({"epochs": 4, "note": EVIL, "ratios": [0.5, 0.9]}))
    (root / "finetune" / "config.json").write_text(json.dumps({"epochs": 3, "lambda_center": 0.003}))
    (root / "pretrain" / "log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in recs if r["stage"] == "pretrain")
    )
    (root / "finetune" / "log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in recs if r["stage"] == "finetune")
    )
    metrics = _metrics(rng)
    (root / "eval" / "metrics.json").write_text(json.dumps(metrics))
    for moment in ("start", "end"):
        np.savez(root / "pretrain" / "mask_gallery" / f"{moment}.npz", **_gallery(rng))
    return metrics


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, dict, _Page]:
    # Built once for the module: a full report renders seven figures (a few seconds on 2 cores).
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    metrics = _write_run(root, rng)
    path = build_report(root)
    return path, metrics, _parse(path)


# --------------------------------------------------------------------------- the report


def test_full_report_sections_and_images(full_run):
    path, metrics, page = full_run
    assert path == path.parent / "report.html" and path.is_file()
    assert page.h2 == HEADINGS
    # confusion matrix, per-class bars, gallery start + end, ratio histograms, loss curves
    assert len(page.imgs) == 6
    for src in page.imgs:
        img = _decode_png(src)
        assert img.width > 200 and img.height > 150
    assert page.notes == 0  # every section had its data


def test_full_report_is_self_contained_and_escaped(full_run):
    path, metrics, page = full_run
    raw = path.read_text(encoding="utf-8")
    # No external requests: no scripts, stylesheets or frames; links are in-page anchors only.
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert all(u.startswith("#") for u in page.urls), page.urls
    assert "http://" not in raw and "https://" not in raw
    assert "url(" not in raw  # no CSS-loaded resources
    # The evil class name / config value shows up as text, never as markup.
    assert "b" not in page.tags
    text = "".join(page.text)
    assert EVIL in text
    assert raw.count(EVIL) == 0


def test_full_report_metrics_table(full_run):
    path, metrics, page = full_run
    text = "".join(page.text)
    for name in CLASSES:
        if name in metrics["per_class_accuracy"]:
            assert f"{metrics['per_class_accuracy'][name]:.4f}" in text
    for key in ("accuracy", "mean_class_accuracy", "macro_f1", "std_per_class_ddof0", "std_per_class_ddof1"):
        assert f"{metrics[key]:.4f}" in text
    assert str(metrics["num_samples"]) in text
    # both stages' configs are shown under their stage names
    assert "pretrain" in text and "finetune" in text and "lambda_center" in text


def test_report_with_only_metrics(tmp_path, seed):
    rng = np.random.default_rng(seed)
    (tmp_path / "metrics.json").write_text(json.dumps(_metrics(rng)))
    out = tmp_path / "elsewhere" / "r.html"
    path = build_report(tmp_path, out=out)
    assert path == out and out.is_file() and not (tmp_path / "report.html").exists()
    page = _parse(path)
    assert page.h2 == HEADINGS
    assert len(page.imgs) == 2  # confusion matrix and per-class bars
    for src in page.imgs:
        _decode_png(src)
    # config, 2 gallery moments, ratio histograms, loss curves: each says why it is missing
    assert page.notes == 5


def test_report_empty_folder_and_out_dir(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    path = build_report(run, out=out_dir)
    assert path == out_dir / "report.html"
    page = _parse(path)
    assert page.h2 == HEADINGS and page.imgs == []
    assert page.notes == 8  # config, metrics x3, gallery x2, ratio histograms, loss curves


def test_report_survives_malformed_files(tmp_path, seed):
    rng = np.random.default_rng(seed)
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "metrics.json").write_text(json.dumps({"classes": ["a", "b"], "confusion_matrix": [[1, -2], [0, 1]]}))
    good = [r for r in _log_records(rng) if r["stage"] == "finetune"]
    lines = [
        json.dumps(good[0]),
        "garbage",
        "[1, 2]",
        json.dumps({"stage": "pretrain", "epoch": 0, "ratio_hist": 3}),
    ]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "mask_gallery").mkdir()
    (tmp_path / "mask_gallery" / "start.npz").write_bytes(b"not a zip file")
    bad = _gallery(rng)
    bad["abmg_mask"] = bad["abmg_mask"][:, :-1]  # wrong number of patches
    np.savez(tmp_path / "mask_gallery" / "end.npz", **bad)

    page = _parse(build_report(tmp_path))
    assert page.h2 == HEADINGS
    text = "".join(page.text)
    assert "log.jsonl: skipped 2 line(s) that are not JSON objects (line 2, 3)" in text
    assert "config.json could not be read" in text
    assert "non-negative" in text  # the confusion matrix's own error, shown as a note
    assert "npz['abmg_mask'] must be (9, 16) bool" in text
    assert "No MRUS ratio histogram to plot" in text
    # the loss curves (one fine-tuning epoch) still render
    assert len(page.imgs) == 1
    _decode_png(page.imgs[0])


def test_report_bad_run_dir(tmp_path):
    with pytest.raises(ValueError, match="run_dir .* is not an existing folder"):
        build_report(tmp_path / "missing")


# --------------------------------------------------------------------------- viz


def test_plots_return_png_and_write_it(tmp_path, seed):
    rng = np.random.default_rng(seed)
    m = _metrics(rng)
    out = tmp_path / "sub" / "cm.png"
    png = viz.plot_confusion_matrix(m["confusion_matrix"], m["classes"], out)
    assert png.startswith(PNG_MAGIC) and out.read_bytes() == png
    bars = viz.plot_per_class_accuracy(m)
    assert Image.open(io.BytesIO(bars)).size[0] > 300


def test_runs_per_class_plot_draws_each_recipes_means(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c", "d"]
    runs = {name: [classification_metrics(rng.integers(0, 9, (4, 4)), classes) for _ in range(k)]
            for name, k in (("one seed", 1), ("three seeds", 3))}
    summaries = {name: aggregate_runs(r) for name, r in runs.items()}
    png = viz.plot_runs_per_class(summaries)
    assert png.startswith(PNG_MAGIC)
    figures = []
    monkeypatch.setattr(viz, "_finish", lambda fig, out: figures.append(fig) or b"")
    viz.plot_runs_per_class(summaries)
    (ax,) = figures[0].axes
    heights = [p.get_height() for p in ax.patches]
    expected = [float(np.mean([r["per_class_accuracy"][c] for r in runs[name]])) for name in runs for c in classes]
    np.testing.assert_allclose(heights, expected)
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [c.errorbar is not None for c in bars] == [False, True]  # the seeds' std: with 3 seeds only
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0].startswith("one seed: mean class acc.") and "(3 seeds)" in legend[1]
    with pytest.raises(viz.NothingToPlot):
        viz.plot_runs_per_class({})
    other = aggregate_runs([classification_metrics(rng.integers(0, 9, (2, 2)), ["a", "b"])])
    with pytest.raises(ValueError, match="other classes"):
        viz.plot_runs_per_class({**summaries, "other": other})


def test_confusion_plot_with_class_without_samples():
    png = viz.plot_confusion_matrix([[2, 1, 0], [0, 0, 0], [1, 0, 4]], ["a", "b", "c"])
    Image.open(io.BytesIO(png)).verify()
    m = classification_metrics([[2, 1, 0], [0, 0, 0], [1, 0, 4]], ["a", "b", "c"])
    Image.open(io.BytesIO(viz.plot_per_class_accuracy(m))).verify()


def test_log_plots_tolerate_missing_keys(seed):
    rng = np.random.default_rng(seed)
    recs = _log_records(rng, pre_epochs=3, fine_epochs=0)
    for r in recs:
        del r["ratio_hist"]
    # losses still plot; no histogram anywhere -> NothingToPlot (a ValueError)
    Image.open(io.BytesIO(viz.plot_loss_curves(recs))).verify()
    with pytest.raises(viz.NothingToPlot, match="ratio_hist"):
        viz.plot_ratio_histograms(recs)
    with pytest.raises(viz.NothingToPlot, match="no log record has a loss"):
        viz.plot_loss_curves([{"stage": "finetune", "epoch": 0, "lr": 0.1}, {"other": 1}])
    with pytest.raises(TypeError, match="log_records must be a list of dicts"):
        viz.plot_loss_curves({"stage": "pretrain"})


def test_apply_mask_marks_row_major_patches(seed):
    # The masks index patches in row-major order (patch k = row k // (W/p), column k % (W/p)):
    # check the darkened pixels against an explicit per-pixel loop on a non-square image.
    rng = np.random.default_rng(seed)
    h, w, p = 12, 20, 4
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = rng.random((h // p) * (w // p)) < 0.5
    shaded = viz._apply_mask(img, mask, p)
    for y in range(h):
        for x in range(w):
            masked = mask[(y // p) * (w // p) + x // p]
            if masked:
                expected = (0.28 * img[y, x].astype(np.float32) + 0.72 * viz._MASK_TINT).astype(np.uint8)
                assert (shaded[y, x] == expected).all()
            else:
                assert (shaded[y, x] == img[y, x]).all()


def test_mask_gallery_inputs(tmp_path, seed):
    rng = np.random.default_rng(seed)
    g = _gallery(rng, n=5, size=24, patch=8)
    png = viz.mask_gallery(g, tmp_path / "g.png", title="start")
    assert (tmp_path / "g.png").read_bytes() == png
    np.savez(tmp_path / "g.npz", **g)
    Image.open(io.BytesIO(viz.mask_gallery(tmp_path / "g.npz", max_per_class=None))).verify()
    with pytest.raises(ValueError, match="does not tile the 24x24 images"):
        viz.mask_gallery({**g, "patch_size": np.array(7)})
    with pytest.raises(ValueError, match=r"npz\['random_mask'\] must be \(5, 9\) bool"):
        viz.mask_gallery({**g, "random_mask": g["random_mask"].astype(np.int64)})
    with pytest.raises(ValueError, match="missing arrays \\['classes'\\]"):
        viz.mask_gallery({k: v for k, v in g.items() if k != "classes"})
    with pytest.raises(ValueError, match=r"npz\['labels'\] must lie in \[0, 7\)"):
        viz.mask_gallery({**g, "labels": np.full(5, 7)})
    with pytest.raises(ValueError, match="does not exist"):
        viz.mask_gallery(tmp_path / "missing.npz")
