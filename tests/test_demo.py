"""`amgsn demo --quick` end to end: every stage's output, the report with real data in every
section (no "missing" notes), and the one-screen summary."""

from __future__ import annotations

import base64
import io
import json
import math
from html.parser import HTMLParser

import pytest
from PIL import Image

from amgsn.cli import main


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.headings, self._in_h2, self.text = [], [], False, []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.headings.append(data.strip())
            self._in_h2 = False


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    for line in ("accuracy", "mean class accuracy", "std per class (ddof0)", "report.html"):
        assert line in printed
    for path in ("data/EmoLabel/list_patition_label.txt", "pretrain/checkpoint-last.pth",
                 "pretrain/mask_gallery/start.npz", "pretrain/mask_gallery/end.npz", "finetune/checkpoint-best.pth",
                 "eval/metrics.json", "eval/confusion_matrix.png", "model.safetensors", "report.html"):
        assert (out / path).exists(), path
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["num_samples"] == 70 and 0.0 <= metrics["mean_class_accuracy"] <= 1.0

    parser = _Collect()
    parser.feed((out / "report.html").read_text())
    from amgsn.report import SECTIONS

    assert [h for h in parser.headings if h in SECTIONS] == list(SECTIONS)
    # confusion matrix, per-class bars, 2 galleries, ratio histograms, loss curves
    assert len(parser.images) >= 6
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()


def _summary(confusion):
    classes = ["A", "B", "C"]
    metrics = {"classes": classes, "confusion_matrix": confusion, "accuracy": 0.5, "mean_class_accuracy": 0.3,
               "macro_f1": 0.2, "std_per_class_ddof0": 0.4, "per_class_accuracy": dict.fromkeys(classes, 0.3)}
    return {"metrics": metrics, "report": "r.html", "model": "m.safetensors", "seconds": {"data": 1.0},
            "preset": "quick"}


def test_summary_says_when_one_class_is_predicted_for_everything():
    from amgsn.engine.demo import format_summary

    collapsed = format_summary(_summary([[0, 4, 0], [0, 9, 0], [0, 2, 0]]))
    assert "every test image was predicted 'B'" in collapsed
    spread = format_summary(_summary([[3, 1, 0], [0, 9, 0], [0, 2, 1]]))
    assert "every test image" not in spread and "mean class accuracy" in spread


def test_demo_and_report_bad_arguments(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--device", "tpu", "--no-progress"]) == 2
    assert "amgsn demo: error: --device must be auto, cpu or cuda, got 'tpu'" in capsys.readouterr().err
    assert not (out / "data").exists()  # checked before any data is generated
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "amgsn report: error: run_dir" in capsys.readouterr().err


@pytest.mark.cuda
def test_demo_quick_end_to_end_cuda(tmp_path, capsys, recwarn):
    # The whole pipeline on the GPU (bf16 autocast, Triton masking kernels, the CUDA center loss, varlen
    # attention): the CPU suite cannot reach these paths, and the first GPU run found two of them broken.
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--device", "cuda", "--no-progress", "--workers", "0"]) == 0
    assert "mean class accuracy" in capsys.readouterr().out
    for path in ("pretrain/checkpoint-last.pth", "finetune/checkpoint-best.pth", "eval/metrics.json",
                 "model.safetensors", "report.html"):
        assert (out / path).exists(), path
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["num_samples"] == 70 and 0.0 <= metrics["mean_class_accuracy"] <= 1.0
    logs = [json.loads(line) for line in (out / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert logs and all(math.isfinite(entry["loss"]) for entry in logs)
    assert not [w for w in recwarn if "varlen attention" in str(w.message)]  # no padded-SDPA fallback
