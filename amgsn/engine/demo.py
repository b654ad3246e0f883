"""``amgsn demo`` / ``make demo``: the whole method on the built-in synthetic FER set.

synthetic data (generated once) -> AMGSN pre-training (ABMG + MRUS) -> fine-tuning (CE + debiased
center + SupCon) -> balanced evaluation on the test split -> timm export -> ``report.html``.

Sizes are chosen for a 2-core CPU (the dev/CI machines): the default run stays within 15 minutes,
``--quick`` within 2. See :data:`PRESETS` for the numbers and the reasons.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amgsn.metrics import predicted_classes

# Why these sizes: a ViT-Tiny trunk of 6 blocks at 64 px with 8-px patches (64 tokens) keeps a
# training step at tens of images per second on 2 CPU cores, while 64 px still shows every action
# unit of the synthetic faces. 2 000 training images in RAF-DB's class proportions keep the rare
# classes (fear: ~46 images, disgust: ~117) rare. Measured stage times on the 2-core machine: data
# ~20 s, pre-training ~155 img/s (8 epochs ~2 min), two-view fine-tuning ~35 img/s (8 epochs ~7 min).
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(num_train=2000, num_test=600, image_size=64, patch_size=8, depth=6, decoder_depth=2,
                 pretrain_epochs=8, finetune_epochs=8, batch_size=64, gallery_per_class=2),
    "quick": dict(num_train=140, num_test=70, image_size=32, patch_size=8, depth=2, decoder_depth=1,
                  pretrain_epochs=2, finetune_epochs=2, batch_size=32, gallery_per_class=1),
}


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    quick: bool = False
    data_dir: str | None = None  # default: <out>/data (generated when absent)
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    progress: bool = True
    init: str | None = None  # pre-trained weights for pre-training (any PretrainConfig.init SPEC)


def demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage; returns the evaluation metrics plus the paths of what was written."""
    from amgsn.data.synthetic import ensure_synthetic
    from amgsn.engine.common import resolve_device
    from amgsn.engine.evaluate import evaluate
    from amgsn.engine.export import export
    from amgsn.engine.finetune import FinetuneConfig, finetune
    from amgsn.engine.pretrain import PretrainConfig, pretrain
    from amgsn.report import build_report

    resolve_device(cfg.device)  # a bad --device fails here, before minutes of data generation
    p = PRESETS["quick" if cfg.quick else "full"]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(cfg.data_dir) if cfg.data_dir else out / "data"
    times: dict[str, float] = {}

    t = time.perf_counter()
    _stage("1/5 synthetic FER data", f"{p['num_train']} train / {p['num_test']} test images, {p['image_size']} px")
    ensure_synthetic(data, p["num_train"], p["num_test"], image_size=p["image_size"], seed=cfg.seed,
                     progress=cfg.progress)
    times["data"] = time.perf_counter() - t

    t = time.perf_counter()
    start = f", from {cfg.init}" if cfg.init else ""
    size = "" if cfg.init else "vit_tiny "
    _stage("2/5 pre-training", f"MAE + ABMG + MRUS, {size}x{p['depth']} blocks, {p['pretrain_epochs']} epochs{start}")
    pre = pretrain(PretrainConfig(
        data_dir=str(data), out=str(out / "pretrain"), dataset="synthetic", init=cfg.init,
        model=None if cfg.init else "vit_tiny",
        img_size=p["image_size"], patch_size=p["patch_size"], depth=p["depth"], decoder_depth=p["decoder_depth"],
        mask_mode="abmg_mrus", epochs=p["pretrain_epochs"], batch_size=p["batch_size"], warmup_epochs=1,
        abmg_warmup=1, seed=cfg.seed, workers=cfg.workers, device=cfg.device, progress=cfg.progress,
        gallery_per_class=p["gallery_per_class"]))
    times["pretrain"] = time.perf_counter() - t

    t = time.perf_counter()
    _stage("3/5 fine-tuning", f"CE + debiased center + SupCon, {p['finetune_epochs']} epochs")
    fin = finetune(FinetuneConfig(
        data_dir=str(data), out=str(out / "finetune"), dataset="synthetic", init=pre["checkpoint"],
        epochs=p["finetune_epochs"], batch_size=p["batch_size"], seed=cfg.seed, workers=cfg.workers,
        device=cfg.device, progress=cfg.progress))
    times["finetune"] = time.perf_counter() - t

    t = time.perf_counter()
    _stage("4/5 evaluation + export", "test split, balanced metrics; timm-compatible safetensors")
    metrics = evaluate(fin["checkpoint"], "synthetic", data, split="test", out=out / "eval",
                       device=cfg.device, workers=cfg.workers, progress=cfg.progress)
    model_path = export(fin["checkpoint"], out / "model.safetensors")
    times["evaluate"] = time.perf_counter() - t

    _stage("5/5 report", str(out / "report.html"))
    report = build_report(out)
    summary = {"metrics": metrics, "report": str(report), "model": str(model_path), "seconds": times,
               "preset": "quick" if cfg.quick else "full"}
    print(format_summary(summary))
    return summary


def _stage(title: str, detail: str) -> None:
    print(f"\n== {title}: {detail}", flush=True)


def _collapse_warning(metrics: dict[str, Any]) -> list[str]:
    """A line saying so when the classifier predicts one class for every test image."""
    used = predicted_classes(metrics)
    if len(used) != 1:
        return []
    return [f"  note                  every test image was predicted '{used[0]}': the classifier has not",
            "                        left the class prior (README 'Status'; benchmarks/RESULTS.md)"]


def format_summary(summary: dict[str, Any]) -> str:
    m = summary["metrics"]
    secs = summary["seconds"]
    lines = [
        "",
        "=" * 64,
        f"AMGSN demo ({summary['preset']}) — test split of the synthetic FER set",
        f"  accuracy              {m['accuracy']:.4f}",
        f"  mean class accuracy   {m['mean_class_accuracy']:.4f}",
        f"  macro-F1              {m['macro_f1']:.4f}",
        f"  std per class (ddof0) {m['std_per_class_ddof0']:.4f}",
        "  per class             " + ", ".join(f"{k} {v:.2f}" for k, v in m["per_class_accuracy"].items()),
        "  time                  " + ", ".join(f"{k} {v:.0f}s" for k, v in secs.items())
        + f" (total {sum(secs.values()) / 60:.1f} min)",
        *_collapse_warning(m),
        f"  report                {summary['report']}",
        f"  timm weights          {summary['model']}",
        "=" * 64,
    ]
    return "\n".join(lines)
