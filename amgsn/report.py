"""The self-contained HTML report of a run folder (``amgsn report RUN_DIR``).

:func:`build_report` reads whatever the engines left in a run folder — directly or in its
``pretrain/``, ``finetune/`` and ``eval/`` sub-folders — and writes one ``report.html`` whose
images are embedded as ``data:image/png;base64`` URIs and whose CSS is inline, so the file can be
mailed or opened offline and makes no network request. A section whose data is missing or
malformed is replaced by a short note; building the report never fails because of the run's
content (only a ``run_dir`` that is not a folder is an error).

Every piece of text that comes from the run (config values, class names, file names, error
messages) goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amgsn import __version__, viz

__all__ = ["SECTIONS", "STAGE_FOLDERS", "build_report"]

STAGE_FOLDERS: tuple[str, ...] = ("pretrain", "finetune", "eval")
"""Sub-folders of a run folder that are searched as well as the folder itself."""

SECTIONS: tuple[str, ...] = (
    "Configuration",
    "Metrics",
    "Confusion matrix",
    "Per-class accuracy",
    "Mask gallery",
    "MRUS ratio histograms",
    "Loss curves",
)
"""The report's section headings (``<h2>``), in order; each is always present (with a note when
its data is missing)."""

# What a malformed input file can raise while it is read or plotted. A section catches only these:
# anything else is a bug in this package and should surface.
_DATA_ERRORS = (ValueError, TypeError, KeyError, IndexError, OSError, zipfile.BadZipFile)


@dataclass
class _Run:
    """What was found in a run folder."""

    root: Path
    configs: list[tuple[str, Path]] = field(default_factory=list)  # (stage label, path)
    logs: list[tuple[str, Path]] = field(default_factory=list)
    metrics: Path | None = None
    galleries: dict[str, Path] = field(default_factory=dict)  # "start" / "end" -> npz path


def _discover(root: Path) -> _Run:
    run = _Run(root)
    folders = [("run", root)] + [(name, root / name) for name in STAGE_FOLDERS if (root / name).is_dir()]
    for label, folder in folders:
        if (folder / "config.json").is_file():
            run.configs.append((label, folder / "config.json"))
        if (folder / "log.jsonl").is_file():
            run.logs.append((label, folder / "log.jsonl"))
        for moment in ("start", "end"):
            npz = folder / "mask_gallery" / f"{moment}.npz"
            if moment not in run.galleries and npz.is_file():
                run.galleries[moment] = npz
    # The evaluation's own output wins over a copy elsewhere.
    for folder in (root / "eval", root, root / "finetune"):
        if (folder / "metrics.json").is_file():
            run.metrics = folder / "metrics.json"
            break
    return run


def _rel(run: _Run, path: Path) -> str:
    try:
        return str(path.relative_to(run.root))
    except ValueError:
        return str(path)


def _read_log(label: str, path: Path, notes: list[str], shown: str) -> list[dict[str, Any]]:
    """The JSON objects of a ``log.jsonl``; bad lines are skipped and reported in ``notes``."""
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad.append(lineno)
                continue
            if not isinstance(rec, dict):
                bad.append(lineno)
                continue
            # A stage folder's log may omit "stage": the folder says which stage it is.
            if "stage" not in rec and label in ("pretrain", "finetune"):
                rec["stage"] = label
            records.append(rec)
    if bad:
        listed = ", ".join(str(n) for n in bad[:10]) + (" ..." if len(bad) > 10 else "")
        notes.append(f"{shown}: skipped {len(bad)} line(s) that are not JSON objects (line {listed})")
    return records


# --------------------------------------------------------------------------- HTML pieces

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1f2937; background: #f6f7f9; margin: 0; line-height: 1.5; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; background: #fff;
       box-shadow: 0 0 0 1px #e5e7eb; min-height: 100vh; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.1em; }
h2 { font-size: 1.3em; margin-top: 2em; padding-bottom: 0.25em; border-bottom: 2px solid #e5e7eb; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; color: #374151; }
.sub { color: #6b7280; margin: 0 0 1em; }
nav { margin: 0.8em 0 0; font-size: 0.92em; }
nav a { color: #3b6ea8; text-decoration: none; margin-right: 1.1em; white-space: nowrap; }
nav a:hover { text-decoration: underline; }
table { border-collapse: collapse; margin: 0.4em 0 1em; font-size: 0.92em; }
th, td { padding: 4px 12px; border-bottom: 1px solid #e5e7eb; text-align: left; vertical-align: top; }
th { background: #f3f4f6; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td code { font-size: 0.95em; word-break: break-all; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 0.6em 0 1em; }
.card { border: 1px solid #e5e7eb; border-radius: 8px; padding: 10px 16px; min-width: 150px; }
.card .v { font-size: 1.5em; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .k { color: #6b7280; font-size: 0.85em; }
.configs { display: flex; flex-wrap: wrap; gap: 24px; }
figure { margin: 0.6em 0 1.4em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eef0f3; }
figcaption { color: #6b7280; font-size: 0.88em; margin-top: 0.3em; }
.note { color: #92400e; background: #fffbeb; border-left: 3px solid #f59e0b; padding: 6px 12px;
        margin: 0.6em 0; font-size: 0.92em; }
footer { margin-top: 3em; color: #9ca3af; font-size: 0.85em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _anchor(title: str) -> str:
    return title.lower().replace(" ", "-")


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _img(png: bytes, alt: str, caption: str | None = None) -> str:
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{src}" alt="{_e(alt)}">{cap}</figure>'


def _fraction(value: Any, percent: bool = False) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—"
    return f"{value:.4f}" + (f" ({100 * value:.2f} %)" if percent else "")


def _config_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        text = json.dumps(value, sort_keys=True, default=str)
        return f"<code>{_e(text if len(text) <= 400 else text[:400] + ' …')}</code>"
    return _e(value)


# --------------------------------------------------------------------------- sections


def _section_config(run: _Run) -> str:
    if not run.configs:
        return _note("No config.json in the run folder or its pretrain/, finetune/, eval/ sub-folders.")
    parts = []
    for label, path in run.configs:
        shown = _rel(run, path)
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:
            parts.append(f"<div><h3>{_e(label)}</h3>{_note(f'{shown} could not be read: {err}')}</div>")
            continue
        if not isinstance(cfg, dict):
            parts.append(f"<div><h3>{_e(label)}</h3>{_note(f'{shown} is not a JSON object')}</div>")
            continue
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_config_value(v)}</td></tr>" for k, v in cfg.items())
        # Collapsed by default: the configuration is long and the results come first to the eye.
        body = (f"<details><summary>{len(cfg)} settings</summary><table>{rows}</table></details>"
                if rows else _note(f"{shown} is empty"))
        parts.append(f"<div><h3>{_e(label)} <small>({_e(shown)})</small></h3>{body}</div>")
    return f'<div class="configs">{"".join(parts)}</div>'


def _load_metrics(run: _Run) -> tuple[dict[str, Any] | None, str | None]:
    """(metrics, None) or (None, why not)."""
    if run.metrics is None:
        return None, "No metrics.json in the run folder or its eval/, finetune/ sub-folders."
    shown = _rel(run, run.metrics)
    try:
        metrics = json.loads(run.metrics.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        return None, f"{shown} could not be read: {err}"
    if not isinstance(metrics, dict):
        return None, f"{shown} is not a JSON object"
    return metrics, None


def _section_metrics(metrics: dict[str, Any], shown: str) -> str:
    cards = [
        ("Overall accuracy", metrics.get("accuracy")),
        ("Mean class accuracy", metrics.get("mean_class_accuracy")),
        ("Macro-F1", metrics.get("macro_f1")),
        ("Std per-class acc. (ddof 0)", metrics.get("std_per_class_ddof0")),
    ]
    out = ['<div class="cards">']
    for name, value in cards:
        out.append(f'<div class="card"><div class="v">{_fraction(value)}</div><div class="k">{_e(name)}</div></div>')
    out.append("</div>")
    rows = [
        ("Overall accuracy", _fraction(metrics.get("accuracy"), percent=True)),
        (
            "Mean class accuracy (balanced accuracy)",
            _fraction(metrics.get("mean_class_accuracy"), percent=True),
        ),
        ("Macro-F1", _fraction(metrics.get("macro_f1"))),
        ("Std of per-class accuracy, ddof 0 (population)", _fraction(metrics.get("std_per_class_ddof0"))),
        ("Std of per-class accuracy, ddof 1 (sample)", _fraction(metrics.get("std_per_class_ddof1"))),
        ("Test samples", _e(metrics.get("num_samples", "—"))),
    ]
    out.append("<h3>Overall</h3><table>")
    out += [f'<tr><th>{_e(k)}</th><td class="num">{v}</td></tr>' for k, v in rows]
    out.append("</table>")

    per_class = metrics.get("per_class_accuracy")
    classes = metrics.get("classes")
    if isinstance(per_class, Mapping) and isinstance(classes, Sequence) and not isinstance(classes, str):
        support: list[Any] = ["—"] * len(classes)
        cm = metrics.get("confusion_matrix")
        if isinstance(cm, list) and len(cm) == len(classes) and all(isinstance(r, list) for r in cm):
            try:
                support = [int(sum(r)) for r in cm]
            except (TypeError, ValueError):
                pass
        out.append("<h3>Per class</h3><table><tr><th>class</th><th>test samples</th><th>accuracy</th></tr>")
        for name, n in zip(classes, support):
            acc = per_class.get(str(name))
            shown_acc = _fraction(acc, percent=True) if acc is not None else "no samples"
            out.append(f'<tr><td>{_e(name)}</td><td class="num">{_e(n)}</td><td class="num">{shown_acc}</td></tr>')
        out.append("</table>")
    else:
        out.append(_note(f"{shown} has no per-class accuracy."))
    missing = metrics.get("classes_without_samples")
    if missing:
        out.append(
            _note(
                "Classes without test samples (left out of the per-class statistics): " + ", ".join(map(str, missing))
            )
        )
    out.append(
        f'<p class="sub">From {_e(shown)}; all fractions in [0, 1], computed from the full test confusion matrix.</p>'
    )
    return "".join(out)


def _plot_section(make: Callable[[], bytes], alt: str, caption: str | None, what: str) -> str:
    """Run one plot; on bad data, a note instead of the image."""
    try:
        return _img(make(), alt, caption)
    except viz.NothingToPlot as err:
        return _note(f"No {what} to plot: {err}.")
    except _DATA_ERRORS as err:
        return _note(f"The {what} could not be plotted: {err}")


def _page(title: str, subtitle: str, sections: list[tuple[str, str]], notes: list[str]) -> str:
    nav = "".join(f'<a href="#{_anchor(t)}">{_e(t)}</a>' for t, _ in sections)
    body = "".join(f'<section id="{_anchor(t)}"><h2>{_e(t)}</h2>{content}</section>' for t, content in sections)
    stamp = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        f'<h1>{_e(title)}</h1><p class="sub">{_e(subtitle)}</p><nav>{nav}</nav>'
        # Problems met while reading (bad log lines, unreadable files) go at the top, not hidden.
        + "".join(_note(n) for n in notes)
        + body
        + f"<footer>Generated by amgsn {_e(__version__)} on {_e(stamp)}.</footer>"
        "</main></body></html>\n"
    )


def build_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write the run's self-contained HTML report and return its path.

    Args:
        run_dir: a run folder holding any of ``config.json``, ``log.jsonl``, ``metrics.json``,
            ``mask_gallery/{start,end}.npz`` — directly or under ``pretrain/``, ``finetune/``,
            ``eval/``.
        out: the HTML file to write (an existing folder gets ``report.html`` inside it);
            default ``run_dir/report.html``.

    Returns:
        The path of the written report. Sections without data carry a short note instead.

    Raises:
        ValueError: ``run_dir`` is not an existing folder.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ValueError(f"run_dir {str(root)!r} is not an existing folder")
    target = root / "report.html" if out is None else Path(out)
    if target.is_dir():
        target = target / "report.html"

    run = _discover(root)
    notes: list[str] = []
    records: list[dict[str, Any]] = []
    for label, path in run.logs:
        try:
            records += _read_log(label, path, notes, _rel(run, path))
        except OSError as err:
            notes.append(f"{_rel(run, path)} could not be read: {err}")
    log_names = ", ".join(_rel(run, p) for _, p in run.logs) or "no log.jsonl found"

    metrics, why_not = _load_metrics(run)
    shown_metrics = _rel(run, run.metrics) if run.metrics else ""
    sections: list[tuple[str, str]] = [("Configuration", _section_config(run))]
    if metrics is None:
        sections += [
            ("Metrics", _note(why_not or "")),
            ("Confusion matrix", _note(why_not or "")),
            ("Per-class accuracy", _note(why_not or "")),
        ]
    else:
        sections.append(("Metrics", _section_metrics(metrics, shown_metrics)))
        if "confusion_matrix" in metrics and "classes" in metrics:
            cm_html = _plot_section(
                lambda: viz.plot_confusion_matrix(metrics["confusion_matrix"], metrics["classes"]),
                "confusion matrix",
                "Rows: true class (test samples); each row sums to 1.",
                "confusion matrix",
            )
        else:
            cm_html = _note(f"{shown_metrics} has no confusion_matrix / classes.")
        sections.append(("Confusion matrix", cm_html))
        sections.append(
            (
                "Per-class accuracy",
                _plot_section(
                    lambda: viz.plot_per_class_accuracy(metrics),
                    "per-class accuracy",
                    "Orange: classes below the mean class accuracy.",
                    "per-class accuracy",
                ),
            )
        )

    gallery = []
    for moment, heading in (("start", "Start of pre-training"), ("end", "End of pre-training")):
        gallery.append(f"<h3>{heading}</h3>")
        path = run.galleries.get(moment)
        if path is None:
            gallery.append(_note(f"No mask_gallery/{moment}.npz in the run folder or its pretrain/ sub-folder."))
            continue
        gallery.append(
            _plot_section(
                lambda path=path: viz.mask_gallery(path),
                f"mask gallery, {heading.lower()}",
                f"{_rel(run, path)}: darkened patches are masked; corner label = the image's mask ratio.",
                "mask gallery",
            )
        )
    if any(isinstance(r, dict) and r.get("saliency_agreement") is not None for r in records):
        gallery.append("<h3>Saliency bank agreement</h3>")
        gallery.append(
            _plot_section(
                lambda: viz.plot_saliency_agreement(records),
                "saliency bank agreement",
                f"From {log_names}: Spearman rank correlation between the bank's scores and a fresh teacher "
                "pass on a fixed probe batch (images the bank has seen), per epoch.",
                "saliency agreement curve",
            )
        )
    sections.append(("Mask gallery", "".join(gallery)))

    if records:
        sections.append(
            (
                "MRUS ratio histograms",
                _plot_section(
                    lambda: viz.plot_ratio_histograms(records),
                    "MRUS ratio histograms",
                    f"From {log_names}.",
                    "MRUS ratio histogram",
                ),
            )
        )
        sections.append(
            (
                "Loss curves",
                _plot_section(
                    lambda: viz.plot_loss_curves(records),
                    "loss curves",
                    f"From {log_names}.",
                    "loss curve",
                ),
            )
        )
    else:
        missing_log = "No log.jsonl records in the run folder or its pretrain/, finetune/ sub-folders."
        sections += [("MRUS ratio histograms", _note(missing_log)), ("Loss curves", _note(missing_log))]

    assert [t for t, _ in sections] == list(SECTIONS)

    page = _page(f"AMGSN run report — {root.resolve().name}", f"Run folder: {root.resolve()}", sections, notes)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: a reader (or a crash) never sees a half-written report.
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    return target
