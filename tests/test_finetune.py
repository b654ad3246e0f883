"""Fine-tuning -> evaluation -> export -> prediction, end to end on the tiny synthetic set.

One 2-epoch fine-tuning run (CE + debiased center + SupCon, RandAugment, random erasing) is shared
by the module; each test checks one behaviour against an independent computation: exact resume
(bit-equal weights), metrics recomputed by a plain loop, timm logits of the export, prediction
probabilities, class mapping by name, wrong-kind / wrong-size errors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amgsn.cli import main
from amgsn.engine.checkpoint import load_checkpoint
from amgsn.engine.evaluate import evaluate, label_mapping, parse_class_map, summarize_runs
from amgsn.engine.export import export
from amgsn.engine.finetune import FinetuneConfig, _build_splits, build_model, finetune, stratified_split
from amgsn.engine.inference import load_classifier
from amgsn.engine.predict import crop_largest_face, predict

TINY = dict(model="vit_tiny", img_size=32, patch_size=8, depth=2, batch_size=16, workers=0, device="cpu",
            progress=False, val_fraction=0.2, warmup_epochs=0.5)
RAFDB = ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]
METRIC_KEYS = {"classes", "accuracy", "per_class_accuracy", "mean_class_accuracy", "macro_f1",
               "std_per_class_ddof0", "std_per_class_ddof1", "confusion_matrix"}


def _cfg(data, out, **kw) -> FinetuneConfig:
    return FinetuneConfig(data_dir=str(data), out=str(out), **{**TINY, **kw})


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only cost (and on a loaded 2-core machine OpenMP's spinning
    threads made this module 5x slower); restored afterwards for the other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tiny_synthetic, tmp_path_factory):
    """A 2-epoch run with every loss term on; RandAugment + random erasing on."""
    out = tmp_path_factory.mktemp("ft") / "run"
    summary = finetune(_cfg(tiny_synthetic, out, epochs=2, seed=5, lambda_center=0.01, lambda_supcon=0.1))
    return out, summary


# --------------------------------------------------------------------------- fine-tuning


def test_run_writes_logs_and_checkpoints(run):
    out, summary = run
    for name in ("config.json", "log.jsonl", "checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth",
                 "checkpoint-best.pth"):
        assert (out / name).is_file(), name
    records = _records(out)
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert r["stage"] == "finetune"
        for key in ("loss", "loss_ce", "loss_center", "loss_supcon", "lr", "images_per_s"):
            assert np.isfinite(r[key]) and r[key] >= 0, key
        # every term is on, and the total is their λ-weighted sum (per-sample averages)
        assert r["loss_center"] > 0 and r["loss_supcon"] > 0
        assert r["loss"] == pytest.approx(r["loss_ce"] + 0.01 * r["loss_center"] + 0.1 * r["loss_supcon"], rel=1e-5)
        assert 0.0 <= r["val_accuracy"] <= 1.0 and 0.0 <= r["val_mean_class_accuracy"] <= 1.0
    # model selection: the first epoch with the highest validation mean class accuracy
    scores = [r["val_mean_class_accuracy"] for r in records]
    best_epoch = int(np.argmax(scores))
    assert summary["best_epoch"] == best_epoch and summary["best_metric"] == scores[best_epoch]
    best = load_checkpoint(out / "checkpoint-best.pth", kind="finetune")
    last = load_checkpoint(out / "checkpoint-last.pth", kind="finetune")
    assert best["epoch"] == best_epoch and last["epoch"] == 1
    assert last["classes"] == RAFDB
    assert last["model_config"] == {"model": "vit_tiny", "img_size": 32, "patch_size": 8, "depth": 2, "in_chans": 3,
                                    "global_pool": "avg", "num_classes": 7, "proj_dim": 128}
    assert {"optimizer", "center_loss", "rng", "global_step", "args", "best_metric"} <= set(last)
    config = json.loads((out / "config.json").read_text())
    assert last["global_step"] == summary["step"] == 2 * (config["num_train"] // 16)
    assert config["num_train"] + config["num_val"] == 64
    assert sum(config["train_class_counts"]) == config["num_train"]


def test_resume_is_bit_exact(run, tiny_synthetic, tmp_path):
    out, _ = run
    resumed = tmp_path / "resumed"
    finetune(_cfg(tiny_synthetic, resumed, epochs=2, seed=5, lambda_center=0.01, lambda_supcon=0.1,
                  resume=str(out / "checkpoint-0.pth")))
    a = load_checkpoint(out / "checkpoint-last.pth")
    b = load_checkpoint(resumed / "checkpoint-last.pth")
    assert a["global_step"] == b["global_step"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["center_loss"].items():
        assert torch.equal(value, b["center_loss"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    ra, rb = _records(out)[1], _records(resumed)[0]
    for key in ("epoch", "loss", "loss_ce", "loss_center", "loss_supcon", "val_accuracy", "lr"):
        assert ra[key] == rb[key], key


def test_resume_rejects_a_changed_configuration(run, tiny_synthetic, tmp_path):
    out, _ = run
    with pytest.raises(ValueError, match="val_fraction"):
        finetune(_cfg(tiny_synthetic, tmp_path / "x", epochs=3, seed=5, val_fraction=0.3,
                      resume=str(out / "checkpoint-0.pth")))
    with pytest.raises(ValueError, match="patch_size"):
        finetune(_cfg(tiny_synthetic, tmp_path / "x", epochs=3, seed=5, patch_size=4,
                      resume=str(out / "checkpoint-0.pth")))


def test_stratified_split_is_deterministic_and_proportional(seed):
    rng = np.random.default_rng(seed)
    targets = rng.choice(5, size=203, p=[0.5, 0.25, 0.15, 0.09, 0.01]).tolist() + [4, 4]
    train, val = stratified_split(targets, 0.1, seed)
    assert (train, val) == stratified_split(targets, 0.1, seed)
    assert sorted(train + val) == list(range(len(targets))) and not set(train) & set(val)
    t = np.asarray(targets)
    for c in range(5):
        n = int((t == c).sum())
        k = int((t[val] == c).sum())
        expected = 0 if n < 2 else min(max(1, round(0.1 * n)), n - 1)
        assert k == expected, (c, n, k)
    assert stratified_split(targets, 0.0, seed) == (list(range(len(targets))), [])
    other = stratified_split(targets, 0.1, seed + 1)[1]
    assert other != val  # a different seed draws another split (205 samples: a tie is ~impossible)
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(targets, 1.0, seed)


def test_second_view_only_with_supcon(tiny_synthetic, tmp_path):
    from amgsn.data import build_dataset

    base = build_dataset("synthetic", tiny_synthetic, "train")
    two, _ = _build_splits(_cfg(tiny_synthetic, tmp_path, lambda_supcon=0.1), base, 32)
    one, _ = _build_splits(_cfg(tiny_synthetic, tmp_path, lambda_supcon=0.0), base, 32)
    views = two[0][0]
    assert isinstance(views, tuple) and len(views) == 2 and views[0].shape == (3, 32, 32)
    assert isinstance(one[0][0], torch.Tensor) and one[0][0].shape == (3, 32, 32)


def test_init_from_pretrain_and_timm_weights_and_errors(run, tiny_synthetic, tmp_path):
    from amgsn.models import MaskedAutoencoderViT

    mae = MaskedAutoencoderViT("vit_tiny", img_size=32, patch_size=8, depth=2, decoder_depth=1)
    pre = tmp_path / "pre.pth"
    torch.save({"kind": "pretrain", "args": {"model": "vit_tiny", "img_size": 32, "patch_size": 8},
                "model_config": mae.config, "model": mae.state_dict()}, pre)
    model = build_model(_cfg(tiny_synthetic, tmp_path, init=str(pre), model=None, img_size=None, patch_size=None,
                             depth=None), 7)
    assert (model.img_size, model.patch_size, model.depth) == (32, 8, 2)
    assert torch.equal(model.vit.blocks[1].attn.qkv.weight, mae.state_dict()["blocks.1.attn.qkv.weight"])
    # another patch size is fitted (the patch embedding resampled); another width cannot be
    model = build_model(_cfg(tiny_synthetic, tmp_path, init=str(pre), patch_size=4, img_size=None), 7)
    assert (model.img_size, model.patch_size) == (32, 4) and "patch_embed.proj.weight" in model.init_report.resampled
    with pytest.raises(ValueError, match=r"--model vit_small needs cls_token \(1, 1, 384\)"):
        build_model(_cfg(tiny_synthetic, tmp_path, init=str(pre), model="vit_small"), 7)
    # a fine-tuning checkpoint is not an --init
    out, _ = run
    with pytest.raises(ValueError, match="'finetune' checkpoint.*--resume"):
        build_model(_cfg(tiny_synthetic, tmp_path, init=str(out / "checkpoint-last.pth")), 7)
    # timm weights (our own export): every tensor lands, the head too (7 classes)
    exported = export(out / "checkpoint-last.pth", tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    model = build_model(_cfg(tiny_synthetic, tmp_path, init=str(exported)), 7)
    for key, value in load_file(str(exported)).items():
        assert torch.equal(model.vit.state_dict()[key], value), key


# --------------------------------------------------------------------------- evaluation


def _reference_predictions(checkpoint: Path, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels and argmax predictions of the test split, one image at a time (no DataLoader)."""
    from amgsn.data import build_dataset, build_eval_transform

    loaded = load_classifier(checkpoint)
    ds = build_dataset("synthetic", data, "test")
    tf = build_eval_transform(32)
    labels, preds = [], []
    with torch.no_grad():
        for i in range(len(ds)):
            img, label, _ = ds[i]
            preds.append(int(loaded.model(tf(img)[None]).argmax()))
            labels.append(label)
    return np.asarray(labels), np.asarray(preds)


@pytest.fixture(scope="module")
def evaluated(run, tiny_synthetic):
    """The last checkpoint evaluated on the test split into the default folder (run/eval)."""
    out, _ = run
    return evaluate(out / "checkpoint-last.pth", "synthetic", tiny_synthetic, "test", device="cpu", workers=0,
                    batch_size=5, progress=False)


def test_evaluate_matches_a_plain_loop(run, evaluated, tiny_synthetic):
    out, _ = run
    assert Path(evaluated["out"]) == out / "eval"  # where `amgsn report RUN_DIR` looks
    saved = json.loads((out / "eval" / "metrics.json").read_text())
    assert METRIC_KEYS <= set(saved)
    labels, preds = _reference_predictions(out / "checkpoint-last.pth", tiny_synthetic)
    cm = np.zeros((7, 7), dtype=int)
    np.add.at(cm, (labels, preds), 1)
    assert saved["confusion_matrix"] == cm.tolist()
    assert saved["accuracy"] == pytest.approx((labels == preds).mean())
    recalls = [cm[c, c] / cm[c].sum() for c in range(7) if cm[c].sum()]
    assert saved["mean_class_accuracy"] == pytest.approx(np.mean(recalls))
    assert saved["std_per_class_ddof0"] == pytest.approx(np.std(recalls))
    assert saved["std_per_class_ddof1"] == pytest.approx(np.std(recalls, ddof=1))
    assert set(saved["per_class_accuracy"]) <= set(RAFDB) and saved["classes"] == RAFDB
    for key in ("accuracy", "mean_class_accuracy", "macro_f1", "std_per_class_ddof0"):
        assert 0.0 <= saved[key] <= 1.0
    assert evaluated["accuracy"] == saved["accuracy"] and saved["checkpoint_epoch"] == 1
    for png in ("confusion_matrix.png", "per_class_accuracy.png"):
        with Image.open(out / "eval" / png) as im:
            im.load()
            assert im.format == "PNG" and min(im.size) > 100
    rows = (out / "eval" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 28


def test_evaluate_maps_classes_by_name_or_refuses(run, evaluated, tiny_synthetic, tmp_path):
    """The same test images in an image folder under FER2013's class names (another order, three
    names different): refused without a class map, identical metrics with one."""
    from amgsn.data import build_dataset
    from amgsn.data.classes import FER2013_CLASSES

    out, _ = run
    rename = {"Anger": "Angry", "Happiness": "Happy", "Sadness": "Sad"}
    ds = build_dataset("synthetic", tiny_synthetic, "test")
    for i in range(len(ds)):
        img, label, _ = ds[i]
        folder = tmp_path / "folder" / "test" / rename.get(RAFDB[label], RAFDB[label])
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:03d}.png")
    kw = dict(device="cpu", workers=0, progress=False, classes="fer2013")
    ckpt = out / "checkpoint-last.pth"
    with pytest.raises(ValueError, match="Angry.*class map"):
        evaluate(ckpt, "folder", tmp_path / "folder", "test", tmp_path / "e1", **kw)
    class_map = {v: k for k, v in rename.items()}
    m = evaluate(ckpt, "folder", tmp_path / "folder", "test", tmp_path / "e2", class_map=class_map, **kw)
    assert m["confusion_matrix"] == evaluated["confusion_matrix"]
    assert m["classes"] == RAFDB and m["dataset_classes"] == list(FER2013_CLASSES)


def test_label_mapping_and_class_map_parsing():
    assert label_mapping(["b", "a"], ["a", "b"]) == [1, 0]
    assert label_mapping(["x", "a"], ["a", "b"], {"x": "b"}) == [1, 0]
    assert label_mapping(["x", "y"], ["a"], {"x": "a", "y": "a"}) == [0, 0]
    with pytest.raises(ValueError, match="no checkpoint class for \\['c'\\]"):
        label_mapping(["a", "c"], ["a", "b"])
    with pytest.raises(ValueError, match="not classes of the data set"):
        label_mapping(["a"], ["a"], {"zzz": "a"})
    assert parse_class_map("Angry=Anger, Happy=Happiness") == {"Angry": "Anger", "Happy": "Happiness"}
    assert parse_class_map(None) is None
    with pytest.raises(ValueError, match="DatasetName=CheckpointName"):
        parse_class_map("Angry")


def test_wrong_kind_checkpoints_are_refused(tiny_synthetic, tmp_path):
    bad = tmp_path / "pre.pth"
    torch.save({"kind": "pretrain", "model": {}}, bad)
    with pytest.raises(ValueError, match="'pretrain' checkpoint"):
        evaluate(bad, "synthetic", tiny_synthetic, device="cpu", progress=False)
    with pytest.raises(ValueError, match="'pretrain' checkpoint"):
        export(bad, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="'pretrain' checkpoint"):
        predict([str(bad)], bad, device="cpu")
    assert not (tmp_path / "x.safetensors").exists()


def test_summarize_runs(tmp_path, seed):
    rng = np.random.default_rng(seed)
    paths, accs = [], []
    for i in range(3):
        cm = rng.integers(0, 20, size=(3, 3)) + np.eye(3, dtype=int)
        from amgsn.metrics import classification_metrics

        m = classification_metrics(cm, ["a", "b", "c"])
        accs.append(m["accuracy"])
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "metrics.json").write_text(json.dumps(m))
        paths.append(tmp_path / f"r{i}" / ("metrics.json" if i else ""))
    s = summarize_runs(paths, tmp_path / "sum")
    assert s["num_runs"] == 3
    assert s["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert s["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert json.loads((tmp_path / "sum" / "summary.json").read_text())["accuracy"] == s["accuracy"]
    with pytest.raises(FileNotFoundError):
        summarize_runs([tmp_path / "nope.json"])


# --------------------------------------------------------------------------- export


def test_export_rebuilds_in_timm_with_the_same_logits(run, tmp_path, seed):
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    out, _ = run
    path = export(out / "checkpoint-last.pth", tmp_path / "model.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    classes = json.loads(meta["classes"])
    assert classes == RAFDB
    model = timm.create_model(meta["timm_model"], num_classes=len(classes), **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(load_file(str(path)), strict=True)
    model.eval()
    ours = load_classifier(out / "checkpoint-last.pth").model
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x), rtol=0, atol=0)
    assert not any(k.startswith("proj_head") for k in load_file(str(path)))


# --------------------------------------------------------------------------- prediction


def test_predict_good_missing_and_non_image(run, tiny_synthetic, tmp_path):
    from amgsn.data import build_eval_transform

    out, _ = run
    good = sorted((Path(tiny_synthetic) / "Image" / "aligned").glob("test_*.jpg"))[:2]
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    paths = [str(good[0]), str(tmp_path / "missing.jpg"), str(text), str(good[1]), str(tmp_path)]
    results = predict(paths, out / "checkpoint-last.pth", device="cpu")
    assert [r["path"] for r in results] == paths
    assert "not found" in results[1]["error"] and "not an image" in results[2]["error"]
    assert "directory" in results[4]["error"]
    loaded = load_classifier(out / "checkpoint-last.pth")
    tf = build_eval_transform(32)
    for r, p in ((results[0], good[0]), (results[3], good[1])):
        assert "error" not in r and list(r["probabilities"]) == RAFDB
        with torch.no_grad():
            ref = torch.softmax(loaded.model(tf(Image.open(p).convert("RGB"))[None]), -1)[0]
        got = torch.tensor([r["probabilities"][c] for c in RAFDB])
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
        assert r["prediction"] == RAFDB[int(ref.argmax())] and r["confidence"] == pytest.approx(float(ref.max()))
    # the exported file predicts the same
    exported = export(out / "checkpoint-last.pth", tmp_path / "m.safetensors")
    again = predict([str(good[0])], exported, device="cpu")[0]
    for c in RAFDB:
        assert again["probabilities"][c] == pytest.approx(results[0]["probabilities"][c], abs=1e-6)


def test_crop_largest_face_widens_and_clips():
    img = Image.new("RGB", (100, 80))
    assert crop_largest_face(img, []) is None
    crop, box = crop_largest_face(img, [(10, 10, 20, 20), (50, 30, 40, 40), (0, 0, 5, 5)], margin=0.25)
    assert box == [40, 20, 100, 80] and crop.size == (60, 60)  # right/bottom clipped to the image


def test_detect_face_on_a_rendered_face(tmp_path):
    """OpenCV 4 (pinned <5: OpenCV 5 dropped the Haar cascades) finds a synthetic face pasted into a
    larger canvas and crops around it; noise has no face. Without the cascade: a clear error."""
    import cv2

    from amgsn.data.synthetic import generate
    from amgsn.engine import predict as predict_mod

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    if not hasattr(cv2, "CascadeClassifier"):
        with pytest.raises(predict_mod.FaceDetectionUnavailable, match="opencv-python-headless"):
            predict_mod.detect_faces(noise)
        return
    assert predict_mod.detect_faces(noise) == []
    data = generate(tmp_path / "faces", 6, 0, image_size=112, workers=0, progress=False)
    found = 0
    for path in sorted((data / "Image" / "aligned").glob("*.jpg")):
        canvas = Image.new("RGB", (320, 240), (128, 128, 128))
        canvas.paste(Image.open(path).convert("RGB"), (170, 70))
        boxes = predict_mod.detect_faces(canvas)
        if not boxes:
            continue
        found += 1
        _, (left, top, right, bottom) = crop_largest_face(canvas, boxes)
        cx, cy = (left + right) / 2, (top + bottom) / 2
        assert 170 <= cx <= 282 and 70 <= cy <= 182  # the crop is centred on the pasted face
    assert found >= 1


def test_predict_detect_face_flags_a_missing_face(run, tmp_path):
    import cv2

    out, _ = run
    from amgsn.engine.predict import FaceDetectionUnavailable

    img = tmp_path / "flat.png"
    Image.new("RGB", (64, 64), (200, 180, 160)).save(img)
    if not hasattr(cv2, "CascadeClassifier"):
        with pytest.raises(FaceDetectionUnavailable, match="opencv-python-headless"):
            predict([str(img)], out / "checkpoint-last.pth", detect_face=True, device="cpu")
        return
    r = predict([str(img)], out / "checkpoint-last.pth", detect_face=True, device="cpu")[0]
    assert r["face"]["detected"] is False and "whole image" in r["face"]["note"]
    assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------- CLI


def test_cli_finetune_one_view_balanced_no_validation(tiny_synthetic, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["finetune", "--data-dir", str(tiny_synthetic), "--out", str(out), "--img-size", "32",
                 "--patch-size", "8", "--depth", "1", "--epochs", "1", "--batch-size", "16", "--workers", "0",
                 "--device", "cpu", "--lambda-supcon", "0", "--lambda-center", "0", "--balanced-sampler",
                 "--val-fraction", "0", "--auto-augment", "none", "--max-steps", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    (rec,) = _records(out)
    assert rec["step"] == 2 and rec["loss_center"] == 0 and rec["loss_supcon"] == 0
    assert rec["loss"] == pytest.approx(rec["loss_ce"])
    assert rec["val_accuracy"] is None
    assert load_checkpoint(out / "checkpoint-best.pth")["epoch"] == 0  # no validation: best = last
    assert "fine-tuning done" in capsys.readouterr().out
    # bad input -> exit status 2 and a message naming the flag / the file
    assert main(["finetune", "--data-dir", str(tiny_synthetic), "--out", str(out), "--val-fraction", "1"]) == 2
    assert "--val-fraction" in capsys.readouterr().err
    assert main(["finetune", "--data-dir", str(tiny_synthetic), "--out", str(out), "--init",
                 str(tmp_path / "none.pth")]) == 2
    assert "none.pth" in capsys.readouterr().err


def test_cli_evaluate_seeds_export_predict(run, evaluated, tiny_synthetic, tmp_path, capsys):
    out, _ = run
    copy = tmp_path / "run2"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoint-[0-9]*.pth", "eval*"))
    # one run already evaluated (its metrics.json is read), one checkpoint evaluated here
    code = main(["evaluate", "--seeds", str(out / "eval"), str(copy / "checkpoint-best.pth"), "--data-dir",
                 str(tiny_synthetic), "--out", str(tmp_path / "seeds"), "--workers", "0", "--device", "cpu",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "seeds" / "summary.json").read_text())
    assert summary["num_runs"] == 2 and "mean_class_accuracy" in capsys.readouterr().out
    runs = [json.loads(Path(p).read_text()) for p in summary["runs"]]
    assert summary["accuracy"]["values"] == [r["accuracy"] for r in runs]

    model = tmp_path / "m.safetensors"
    assert main(["export", str(out / "checkpoint-last.pth"), "--out", str(model)]) == 0 and model.is_file()
    img = sorted((Path(tiny_synthetic) / "Image" / "aligned").glob("test_*.jpg"))[0]
    capsys.readouterr()
    code = main(["predict", str(img), str(tmp_path / "gone.png"), "--checkpoint", str(model), "--json",
                 "--device", "cpu"])
    assert code == 1  # one file failed; the other was still classified
    results = json.loads(capsys.readouterr().out)
    assert results[0]["prediction"] in RAFDB and "not found" in results[1]["error"]
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nothing.pth"), "--data-dir", str(tiny_synthetic)]) == 2
    assert "nothing.pth" in capsys.readouterr().err


# --------------------------------------------------------------------------- distributed evaluation


class _Items(torch.utils.data.Dataset):
    """(x, label, index) items of a fixed random set."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(n)
        self.x, self.y = torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), i


def _dist_worker(rank: int, world: int, init: str, n: int, out: str) -> None:
    import torch.distributed as dist

    from amgsn.engine.inference import predict_dataset

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = torch.nn.Linear(5, 3)
        torch.nn.init.zeros_(model.weight)
        torch.nn.init.zeros_(model.bias)
        with torch.no_grad():
            model.weight[:, :3] = torch.eye(3)  # deterministic on every rank: logits = x[:, :3]
        model.num_classes = 3
        pred = predict_dataset(model, _Items(n), device="cpu", batch_size=2)
        torch.save({"labels": pred.labels, "probs": pred.probs}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_predict_dataset_under_two_ranks_sees_each_sample_once(tmp_path):
    """2 gloo processes (forked: no re-import) on 7 samples: each rank ends up with all 7
    predictions, in data-set order, equal to the single-process result."""
    import torch.multiprocessing as mp

    from amgsn.engine.inference import predict_dataset

    n = 7
    mp.start_processes(_dist_worker, args=(2, f"file://{tmp_path / 'store'}", n, str(tmp_path / "r")), nprocs=2,
                       join=True, start_method="fork")
    items = _Items(n)
    expected = torch.softmax(items.x[:, :3], dim=-1)
    model = torch.nn.Linear(5, 3)
    model.num_classes = 3
    single = predict_dataset(model, items, device="cpu", batch_size=3)
    assert torch.equal(single.labels, items.y)
    for rank in range(2):
        got = torch.load(tmp_path / f"r.{rank}")
        assert torch.equal(got["labels"], items.y)
        torch.testing.assert_close(got["probs"], expected)


def test_predict_dataset_reuses_a_persistent_loader():
    """Validation after every epoch reuses one loader (workers kept): each pass gives the result a
    fresh loader gives, for a model that changes between passes."""
    from amgsn.engine.inference import predict_dataset, prediction_loader

    items = _Items(11)
    loader = prediction_loader(items, device="cpu", batch_size=4, workers=2, persistent=True)
    model = torch.nn.Linear(5, 3)
    model.num_classes = 3
    for step in range(3):
        with torch.no_grad():
            model.weight.add_(0.5 * step)
        reused = predict_dataset(model, items, device="cpu", loader=loader)
        fresh = predict_dataset(model, items, device="cpu", batch_size=3)
        assert torch.equal(reused.labels, items.y)
        torch.testing.assert_close(reused.probs, fresh.probs)
        torch.testing.assert_close(reused.probs, torch.softmax(model(items.x), dim=-1))
    assert loader._iterator is not None  # the workers survived the passes
