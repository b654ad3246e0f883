"""The synthetic FER generator (docs/method.md §6): layout, proportions, determinism, identities, the
expression model, the command line and the contact sheet. Sets are tiny and small (48 px)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amgsn.cli import main as cli_main
from amgsn.data import RAFDB_CLASSES, build_dataset
from amgsn.data._face_model import AUS, PROTOTYPES, sample_expression, sample_identity, sample_nuisance
from amgsn.data._face_render import render_face
from amgsn.data.synthetic import (
    RAFDB_TEST_COUNTS,
    RAFDB_TRAIN_COUNTS,
    class_counts,
    ensure_synthetic,
    generate,
    read_meta,
)


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> hex)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    # 70 images: enough for the worker pool path (>= 64 tasks) and every class in both splits.
    root = tmp_path_factory.mktemp("syn") / "set"
    generate(root, 56, 14, image_size=48, seed=3, workers=2, progress=False)
    return root


def test_class_counts_follow_rafdb(seed):
    rng = np.random.default_rng(seed)
    for total in [0, 1, 6, 7, 8, *rng.integers(9, 20000, 20).tolist()]:
        for ref in (RAFDB_TRAIN_COUNTS, RAFDB_TEST_COUNTS):
            counts = class_counts(total, ref)
            exact = total * np.asarray(ref) / sum(ref)
            assert sum(counts) == total and len(counts) == 7
            if total >= 7:
                assert min(counts) >= 1
            if (exact >= 1).all():
                # Largest remainder: within one image of the exact share.
                assert np.abs(np.asarray(counts) - exact).max() < 1
            elif total >= 7:
                # Tiny sets: rare classes are lifted to one image, taken from the largest class.
                assert np.argmax(counts) == np.argmax(ref) or max(counts) == 1
    assert class_counts(12271, RAFDB_TRAIN_COUNTS) == list(RAFDB_TRAIN_COUNTS)
    assert class_counts(3068, RAFDB_TEST_COUNTS) == list(RAFDB_TEST_COUNTS)


def test_layout_labels_and_loader(small_set):
    lines = (small_set / "EmoLabel" / "list_patition_label.txt").read_text().splitlines()
    assert len(lines) == 70
    for i, line in enumerate(lines[:56]):
        name, label = line.split(" ")
        assert name == f"train_{i + 1:05d}.jpg" and 1 <= int(label) <= 7
        assert (small_set / "Image" / "aligned" / f"train_{i + 1:05d}_aligned.jpg").is_file()
    assert lines[56].startswith("test_00001.jpg ")
    train, test = build_dataset("synthetic", small_set, "train"), build_dataset("synthetic", small_set, "test")
    assert train.classes == list(RAFDB_CLASSES)
    assert train.class_counts == class_counts(56, RAFDB_TRAIN_COUNTS)
    assert test.class_counts == class_counts(14, RAFDB_TEST_COUNTS)
    img, label, idx = train[5]
    assert img.size == (48, 48) and img.mode == "RGB" and idx == 5
    assert label == int(lines[5].split()[1]) - 1
    meta = read_meta(small_set)
    assert [m["label"] for m in meta] == [ln.split()[1] for ln in lines]
    assert all(RAFDB_CLASSES[int(m["label"]) - 1] == m["class"] for m in meta)
    info = json.loads((small_set / "synthetic.json").read_text())
    assert info["classes"] == list(RAFDB_CLASSES) and info["seed"] == 3


def test_test_identities_disjoint_from_train(small_set):
    meta = read_meta(small_set)
    ids = {s: {m["identity"] for m in meta if m["split"] == s} for s in ("train", "test")}
    assert ids["train"] and ids["test"] and not ids["train"] & ids["test"]
    # Not just different names: the identity parameters themselves differ.
    train_faces = {(round(i.face_w, 6), round(i.eye_dx, 6))
                   for i in (sample_identity(np.random.default_rng([3, 0, 1, k]), "") for k in range(14))}
    test_faces = {(round(i.face_w, 6), round(i.eye_dx, 6))
                  for i in (sample_identity(np.random.default_rng([3, 1, 1, k]), "") for k in range(4))}
    assert not train_faces & test_faces
    # Identities recur within a split (several images per person, as in real sets).
    train_ids = [m["identity"] for m in meta if m["split"] == "train"]
    assert len(set(train_ids)) < len(train_ids)


def test_same_seed_same_bytes(small_set, tmp_path):
    # In-process rendering must give exactly the bytes the 2-worker pool wrote.
    generate(tmp_path / "again", 56, 14, image_size=48, seed=3, workers=0, progress=False)
    assert digest(tmp_path / "again") == digest(small_set)
    generate(tmp_path / "other", 56, 14, image_size=48, seed=4, workers=0, progress=False)
    a, b = digest(small_set), digest(tmp_path / "other")
    differing = [k for k in a if k.endswith(".jpg") and a[k] != b[k]]
    assert len(differing) == 70


def test_overwrite_rules(tmp_path):
    out = tmp_path / "s"
    generate(out, 9, 2, image_size=32, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate(out, 9, 2, image_size=32, progress=False)
    generate(out, 7, 0, image_size=32, overwrite=True, progress=False)
    assert len(list((out / "Image" / "aligned").iterdir())) == 7  # no stale images left behind
    other = tmp_path / "user"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError, match="holds no synthetic set"):
        generate(other, 7, 0, image_size=32, overwrite=True, progress=False)
    assert (other / "precious.txt").exists()
    with pytest.raises(ValueError, match="image_size"):
        generate(tmp_path / "t", 7, 0, image_size=16)
    with pytest.raises(ValueError, match="not both 0"):
        generate(tmp_path / "t", 0, 0)
    with pytest.raises(TypeError, match="num_train must be an int"):
        generate(tmp_path / "t", 7.5, 0)


def test_ensure_synthetic_reuses_and_regenerates(tmp_path):
    out = tmp_path / "s"
    ensure_synthetic(out, 8, 1, image_size=32, progress=False)
    stamp = (out / "synthetic.json").stat().st_mtime_ns
    ensure_synthetic(out, 8, 1, image_size=32, progress=False)
    assert (out / "synthetic.json").stat().st_mtime_ns == stamp
    ensure_synthetic(out, 8, 1, image_size=40, progress=False)
    assert Image.open(out / "Image" / "aligned" / "train_00001_aligned.jpg").size == (40, 40)


def test_expression_model_follows_prototypes(seed):
    """Core action units of each class are active, and far more than in neutral faces."""
    rng = np.random.default_rng(seed)
    n = 150
    means = {}
    for cls in RAFDB_CLASSES:
        acts = []
        for _ in range(n):
            ident = sample_identity(rng, "x")
            ex = sample_expression(rng, cls, ident)
            assert all(0.0 <= v <= 1.0 for v in ex.aus.values()) and set(ex.aus) == set(AUS)
            assert (ex.intensity == 0.0) == (cls == "Neutral") and 0.0 <= ex.intensity <= 1.0
            acts.append([ex.aus[a] for a in AUS])
        means[cls] = dict(zip(AUS, np.mean(acts, 0)))
    for cls, proto in PROTOTYPES.items():
        for au, (w, keep) in proto.items():
            if w * keep >= 0.6:  # units that define the class
                assert means[cls][au] > means["Neutral"][au] + 0.2, (cls, au)
    assert max(means["Neutral"].values()) < 0.15
    # The confusable pairs share units (docs/method.md §6).
    assert means["Fear"]["AU1"] > 0.3 and means["Surprise"]["AU1"] > 0.3
    assert means["Anger"]["AU4"] > 0.3 and means["Disgust"]["AU4"] > 0.15


def test_intensity_spans_subtle_to_full(seed):
    rng = np.random.default_rng(seed)
    ident = sample_identity(rng, "x")
    vals = np.array([sample_expression(rng, "Happiness", ident).intensity for _ in range(400)])
    assert vals.min() < 0.25 and vals.max() > 0.9


def test_render_is_a_pure_function_of_its_inputs(seed):
    def draw(label: str, s: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 0])
        ident = sample_identity(rng, "x")
        ex = sample_expression(np.random.default_rng([seed, 1]), label, ident)
        for au, (w, _) in PROTOTYPES[label].items():  # the full prototype, not a subtle draw
            ex.aus[au] = w
        nz = sample_nuisance(np.random.default_rng([seed, 2]))
        nz.occluder, nz.noise, nz.blur = "", 0.0, 0.0
        return np.asarray(render_face(ident, ex, nz, s, np.random.default_rng([seed, 3])), dtype=np.int16)

    a = draw("Surprise", 64)
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, draw("Surprise", 64))
    # Same person, pose and light: another expression changes the face, not the whole image.
    diff = np.abs(a - draw("Neutral", 64)).sum(2) > 30
    assert 0.003 < diff.mean() < 0.5


def test_cli_make_synthetic_and_contact_sheet(tmp_path, capsys):
    out = tmp_path / "cli"
    sheet = tmp_path / "sheet.png"
    rc = cli_main(["make-synthetic", str(out), "--num-train", "14", "--num-test", "7", "--image-size", "40",
                   "--seed", "5", "--workers", "0", "--no-progress", "--contact-sheet", str(sheet)])
    assert rc == 0
    assert "wrote 14 + 7 images" in capsys.readouterr().out
    assert len(list((out / "Image" / "aligned").iterdir())) == 21
    img = Image.open(sheet)
    # One labelled row per class (7 rows of 40 px plus a header), up to 10 columns.
    assert img.height > 7 * 40 and img.width > 2 * 40
    assert cli_main(["make-synthetic", str(out), "--num-train", "14", "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_python_dash_m_help():
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "amgsn", "make-synthetic", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "--num-train" in r.stdout and "--image-size" in r.stdout
