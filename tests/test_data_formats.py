"""Every data-set loader on small fixtures written in its real format (docs/method.md §5): labels, class
order, splits, awkward files (CRLF, no final newline, header / no header), errors naming the file
and line, and ``skip_bad``. Each image is a solid colour derived from its name, so a wrong
image-to-label mapping shows up as a wrong colour."""

from __future__ import annotations

import logging
import os
import random
import zlib

import numpy as np
import pytest
from PIL import Image

from amgsn.data import (
    AFFECTNET_CLASSES,
    FER2013_CLASSES,
    FERPLUS_CLASSES,
    RAFDB_CLASSES,
    DataError,
    build_dataset,
)
from amgsn.data.fer2013 import ferplus_majority

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def colour_of(key: str) -> tuple[int, int, int]:
    """A colour that identifies ``key`` (far apart in RGB so JPEG noise cannot confuse two)."""
    h = zlib.crc32(key.encode()) % (6**3)
    return (h % 6) * 50 + 2, (h // 6 % 6) * 50 + 2, (h // 36) * 50 + 2


def write_image(path: str, key: str, size: tuple[int, int] = (11, 9)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.new("RGB", size, colour_of(key))
    fmt = "PNG" if path.endswith(".png") else "JPEG"
    img.save(path, format=fmt, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))


def assert_colour(img: Image.Image, key: str) -> None:
    got = np.asarray(img, dtype=np.int32).reshape(-1, 3).mean(0)
    np.testing.assert_allclose(got, colour_of(key), atol=6, err_msg=f"image of {key} has the wrong content")


def write_text(path: str, lines: list[str], newline: str = "\n", final_newline: bool = True) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = newline.join(lines) + (newline if final_newline else "")
    with open(path, "w", newline="") as f:
        f.write(text)


STYLES = [("\n", True), ("\r\n", True), ("\n", False), ("\r\n", False)]

# ---------------------------------------------------------------------------------------------
# RAF-DB
# ---------------------------------------------------------------------------------------------


def make_rafdb(root, rng: random.Random, n_train: int, n_test: int, newline="\n", final_newline=True,
               blank_lines=False):
    names = [f"train_{i:05d}.jpg" for i in range(1, n_train + 1)] + [f"test_{i:04d}.jpg" for i in range(1, n_test + 1)]
    rng.shuffle(names)
    labels = {n: rng.randint(1, 7) for n in names}
    lines = [f"{n} {labels[n]}" for n in names]
    if blank_lines:
        lines.insert(len(lines) // 2, "")
        lines.append("   ")
    write_text(os.path.join(root, "EmoLabel", "list_patition_label.txt"), lines, newline, final_newline)
    for n in names:
        write_image(os.path.join(root, "Image", "aligned", n.replace(".jpg", "_aligned.jpg")), n)
        write_image(os.path.join(root, "Image", "original", n), "orig-" + n)
    return names, labels


@pytest.mark.parametrize("newline,final_newline", STYLES)
def test_rafdb_labels_order_and_images(tmp_path, seed, newline, final_newline):
    rng = random.Random(seed)
    names, labels = make_rafdb(tmp_path, rng, rng.randint(9, 23), rng.randint(3, 11), newline, final_newline,
                               blank_lines=True)
    for split in ("train", "test"):
        ds = build_dataset("rafdb", tmp_path, split)
        expected = [n for n in names if n.startswith(split + "_")]
        assert ds.classes == list(RAFDB_CLASSES)
        assert ds.targets == [labels[n] - 1 for n in expected]
        assert ds.class_counts == np.bincount(ds.targets, minlength=7).tolist()
        assert len(ds) == len(expected) and ds.skipped == [] and ds.excluded == {}
        for i in rng.sample(range(len(ds)), min(5, len(ds))):
            img, label, idx = ds[i]
            assert isinstance(img, Image.Image) and img.mode == "RGB" and idx == i
            assert label == labels[expected[i]] - 1
            assert_colour(img, expected[i])
            assert ds.where(i).startswith(os.path.join(str(tmp_path), "EmoLabel", "list_patition_label.txt:"))


def test_rafdb_label_meaning(tmp_path):
    # RAF-DB label 1 is Surprise and 7 is Neutral (not the FER2013 / AffectNet orders).
    write_text(tmp_path / "EmoLabel" / "list_patition_label.txt", ["train_00001.jpg 1", "train_00002.jpg 7"])
    for n in ("train_00001", "train_00002"):
        write_image(str(tmp_path / "Image" / "aligned" / f"{n}_aligned.jpg"), n)
    ds = build_dataset("rafdb", tmp_path, "train")
    assert [ds.classes[t] for t in ds.targets] == ["Surprise", "Neutral"]


def test_rafdb_original_images_and_cache(tmp_path, seed):
    rng = random.Random(seed)
    names, labels = make_rafdb(tmp_path, rng, 7, 2)
    train = [n for n in names if n.startswith("train_")]
    ds = build_dataset("rafdb", tmp_path, "train", aligned=False)
    assert_colour(ds[0][0], "orig-" + train[0])
    plain = build_dataset("rafdb", tmp_path, "train")
    cached = build_dataset("rafdb", tmp_path, "train", cache=True)
    for i in range(len(plain)):
        assert np.array_equal(np.asarray(plain[i][0]), np.asarray(cached[i][0]))
        assert plain[i][1:] == cached[i][1:]


def test_rafdb_transform_applied(tmp_path, seed):
    make_rafdb(tmp_path, random.Random(seed), 5, 1)
    ds = build_dataset("rafdb", tmp_path, "train", transform=lambda im: ("T", im.size))
    assert ds[2][0] == ("T", (11, 9))


@pytest.mark.parametrize(
    "line,message",
    [
        ("train_00002.jpg 8", "out of range 1..7"),
        ("train_00002.jpg 0", "out of range 1..7"),
        ("train_00002.jpg five", "malformed label"),
        ("train_00002.jpg", "malformed line"),
        ("train_00002.jpg 3 extra", "malformed line"),
        ("val_00002.jpg 3", "does not start with"),
        ("train_00001.jpg 3", "duplicate image"),
        ("train_00099.jpg 3", "image not found"),
    ],
)
def test_rafdb_bad_lines_name_file_and_line(tmp_path, line, message, caplog):
    lines = ["train_00001.jpg 4", line, "train_00003.jpg 5"]
    write_text(tmp_path / "EmoLabel" / "list_patition_label.txt", lines, "\r\n", False)
    for n in ("train_00001", "train_00002", "train_00003"):
        write_image(str(tmp_path / "Image" / "aligned" / f"{n}_aligned.jpg"), n)
    label_file = os.path.join(str(tmp_path), "EmoLabel", "list_patition_label.txt")
    with pytest.raises(DataError, match=message) as e:
        build_dataset("rafdb", tmp_path, "train")
    assert str(e.value).startswith(f"{label_file}:2: ")
    with caplog.at_level(logging.WARNING, logger="amgsn.data"):
        ds = build_dataset("rafdb", tmp_path, "train", skip_bad=True)
    assert [s.where for s in ds.skipped] == [f"{label_file}:2"] and message in ds.skipped[0].reason
    assert ds.targets == [3, 4]
    assert [r.levelno for r in caplog.records].count(logging.WARNING) == 1  # reported once
    assert "skipped 1 bad item" in caplog.text


def test_rafdb_missing_root_and_label_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="rafdb root"):
        build_dataset("rafdb", tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match="list_patition_label.txt"):
        build_dataset("rafdb", tmp_path, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("rafdb", tmp_path, "validation")


def test_unreadable_image(tmp_path, caplog):
    write_text(tmp_path / "EmoLabel" / "list_patition_label.txt", ["train_00001.jpg 4", "train_00002.jpg 2"])
    write_image(str(tmp_path / "Image" / "aligned" / "train_00001_aligned.jpg"), "a")
    bad = tmp_path / "Image" / "aligned" / "train_00002_aligned.jpg"
    bad.write_bytes(b"not a jpeg at all")
    ds = build_dataset("rafdb", tmp_path, "train")  # cheap construction: no decoding
    with pytest.raises(DataError, match=r"list_patition_label.txt:2: cannot read image .*train_00002_aligned"):
        ds[1]
    skipping = build_dataset("rafdb", tmp_path, "train", skip_bad=True)  # verifies headers
    assert len(skipping) == 1 and "unreadable image" in skipping.skipped[0].reason
    with pytest.raises(DataError, match=r"list_patition_label.txt:2: cannot read image"):
        build_dataset("rafdb", tmp_path, "train", cache=True)
    cached = build_dataset("rafdb", tmp_path, "train", cache=True, skip_bad=True, verify_images=False)
    assert len(cached) == 1 and cached.targets == [3] and len(cached.skipped) == 1


# ---------------------------------------------------------------------------------------------
# AffectNet
# ---------------------------------------------------------------------------------------------

AFFECTNET_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,"
                    "valence,arousal")


def make_affectnet(root, rng: random.Random, n: int, csv_name="training.csv", header=True, newline="\n",
                   final_newline=True):
    rows, truth = [], []
    for i in range(n):
        rel = f"{rng.randint(1, 3)}/img{i:03d}_{csv_name[:3]}.jpg"
        expr = rng.randint(0, 10)
        w, h = rng.randint(15, 25), rng.randint(13, 21)
        x, y = rng.randint(0, 5), rng.randint(0, 5)
        lm = ";".join(f"{rng.uniform(0, 30):.2f}" for _ in range(6))
        rows.append(f"{rel},{x},{y},{w},{h},{lm},{expr},{rng.uniform(-1, 1):.3f},{rng.uniform(-1, 1):.3f}")
        truth.append((rel, expr, (x, y, w, h)))
        write_affectnet_image(os.path.join(root, "Manually_Annotated_Images", rel), rel, (x, y, w, h))
    write_text(os.path.join(root, csv_name), ([AFFECTNET_HEADER] if header else []) + rows, newline, final_newline)
    return truth


def write_affectnet_image(path, key, box, size=(32, 30)):
    """The face box is painted in the key's colour, the rest black: a crop must see only the colour."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.new("RGB", size, (0, 0, 0))
    x, y, w, h = box
    img.paste(Image.new("RGB", (w, h), colour_of(key)), (x, y))
    img.save(path, format="PNG")  # PNG bytes under a .jpg name: PIL reads by content


@pytest.mark.parametrize("header", [True, False])
@pytest.mark.parametrize("newline,final_newline", STYLES[::3])
@pytest.mark.parametrize("num_classes", [7, 8])
def test_affectnet_classes_filtering_and_header(tmp_path, seed, header, newline, final_newline, num_classes):
    rng = random.Random(seed)
    truth = make_affectnet(tmp_path, rng, rng.randint(25, 45), header=header, newline=newline,
                           final_newline=final_newline)
    ds = build_dataset("affectnet", tmp_path, "train", num_classes=num_classes)
    kept = [t for t in truth if t[1] < num_classes]
    assert ds.classes == list(AFFECTNET_CLASSES[:num_classes])
    assert ds.classes[:7] == ["Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger"]
    assert ds.targets == [t[1] for t in kept]
    dropped = [t[1] for t in truth if t[1] >= num_classes]
    assert sum(ds.excluded.values()) == len(dropped)
    names = {7: "Contempt (7)", 8: "None (8)", 9: "Uncertain (9)", 10: "No-Face (10)"}
    assert ds.excluded == {names[e]: dropped.count(e) for e in set(dropped)}
    for i in rng.sample(range(len(ds)), min(4, len(ds))):
        img = ds[i][0]
        assert img.size == (32, 30)  # no crop by default
        x, y, w, h = kept[i][2]
        assert_colour(img.crop((x, y, x + w, y + h)), kept[i][0])


def test_affectnet_crop_face_and_validation_split(tmp_path, seed):
    rng = random.Random(seed)
    make_affectnet(tmp_path, rng, 12)
    truth = make_affectnet(tmp_path, rng, 15, csv_name="validation.csv", header=False)
    kept = [t for t in truth if t[1] < 7]
    for split in ("val", "test", "validation"):
        ds = build_dataset("affectnet", tmp_path, split, crop_face=True)
        assert ds.targets == [t[1] for t in kept]
    for i in range(len(ds)):
        img = ds[i][0]
        x, y, w, h = kept[i][2]
        assert img.size == (w, h)
        assert_colour(img, kept[i][0])  # exactly the face box: no black border


def test_affectnet_crop_box_clamped_to_image(tmp_path):
    write_text(tmp_path / "training.csv", [AFFECTNET_HEADER, "a/x.jpg,20,22,40,40,,1,0,0"])
    write_affectnet_image(str(tmp_path / "Manually_Annotated_Images" / "a" / "x.jpg"), "x", (20, 22, 12, 8))
    img = build_dataset("affectnet", tmp_path, "train", crop_face=True)[0][0]
    assert img.size == (12, 8)
    assert_colour(img, "x")


@pytest.mark.parametrize(
    "row,message",
    [
        ("a/x.jpg,1,1,5,5,,11,0,0", "out of range 0..10"),
        ("a/x.jpg,1,1,5,5,,-1,0,0", "out of range 0..10"),
        ("a/x.jpg,1,1,5,5,,happy,0,0", "malformed expression"),
        ("a/x.jpg,1,1,5,5", "malformed line"),
        ("a/missing.jpg,1,1,5,5,,3,0,0", "image not found"),
        ("a/x.jpg,1,1,0,5,,3,0,0", "empty face box"),
        ("a/x.jpg,1,one,5,5,,3,0,0", "malformed face box"),
    ],
)
def test_affectnet_bad_rows(tmp_path, row, message):
    write_text(tmp_path / "training.csv", [AFFECTNET_HEADER, "a/x.jpg,0,0,5,5,,2,0,0", row], "\r\n")
    write_affectnet_image(str(tmp_path / "Manually_Annotated_Images" / "a" / "x.jpg"), "x", (0, 0, 5, 5))
    with pytest.raises(DataError, match=message) as e:
        build_dataset("affectnet", tmp_path, "train", crop_face=True)
    assert str(e.value).startswith(f"{tmp_path / 'training.csv'}:3: ")
    ds = build_dataset("affectnet", tmp_path, "train", crop_face=True, skip_bad=True)
    assert ds.targets == [2] and len(ds.skipped) == 1


def test_affectnet_box_ignored_without_crop_and_bad_args(tmp_path):
    write_text(tmp_path / "training.csv", ["a/x.jpg,1,one,0,5,,3,0,0"])
    write_affectnet_image(str(tmp_path / "Manually_Annotated_Images" / "a" / "x.jpg"), "x", (0, 0, 5, 5))
    assert build_dataset("affectnet", tmp_path, "train").targets == [3]
    with pytest.raises(ValueError, match="num_classes must be 7 or 8"):
        build_dataset("affectnet", tmp_path, "train", num_classes=6)
    with pytest.raises(FileNotFoundError, match="validation.csv"):
        build_dataset("affectnet", tmp_path, "val")
    write_text(tmp_path / "training.csv", ["subDirectory_filePath,face_x,valence", "a/x.jpg,1,0"])
    with pytest.raises(ValueError, match="training.csv:1: header lacks the column 'expression'"):
        build_dataset("affectnet", tmp_path, "train")


# ---------------------------------------------------------------------------------------------
# FER2013 and FERPlus
# ---------------------------------------------------------------------------------------------

USAGES = ("Training", "PublicTest", "PrivateTest")


def make_fer2013(root, rng: np.random.Generator, n: int, header=True, newline="\n", final_newline=True):
    rows, truth = [], []
    for _ in range(n):
        emotion = int(rng.integers(0, 7))
        usage = USAGES[int(rng.integers(0, 3))]
        px = rng.integers(0, 256, 48 * 48)
        rows.append(f"{emotion},{' '.join(map(str, px))},{usage}")
        truth.append((emotion, usage, px.reshape(48, 48).astype(np.uint8)))
    write_text(os.path.join(root, "fer2013.csv"), (["emotion,pixels,Usage"] if header else []) + rows, newline,
               final_newline)
    return truth


@pytest.mark.parametrize("header", [True, False])
@pytest.mark.parametrize("newline,final_newline", STYLES[1:3])
def test_fer2013_splits_labels_pixels(tmp_path, seed, header, newline, final_newline):
    rng = np.random.default_rng(seed)
    truth = make_fer2013(tmp_path, rng, int(rng.integers(20, 40)), header, newline, final_newline)
    for split, usage in (("train", "Training"), ("val", "PublicTest"), ("test", "PrivateTest"),
                         ("PrivateTest", "PrivateTest")):
        ds = build_dataset("fer2013", tmp_path, split)
        rows = [t for t in truth if t[1] == usage]
        assert ds.classes == ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
        assert ds.classes == list(FER2013_CLASSES)
        assert ds.targets == [t[0] for t in rows]
        for i in range(len(ds)):
            img, label, idx = ds[i]
            assert img.mode == "RGB" and img.size == (48, 48) and idx == i
            arr = np.asarray(img)
            assert np.array_equal(arr[..., 0], rows[i][2]) and np.array_equal(arr[..., 2], rows[i][2])
    # The CSV itself may be passed as root.
    assert build_dataset("fer2013", tmp_path / "fer2013.csv", "train").targets == [t[0] for t in truth
                                                                                   if t[1] == "Training"]


@pytest.mark.parametrize(
    "row,message",
    [
        ("7,{px},Training", "emotion 7 out of range"),
        ("x,{px},Training", "malformed emotion"),
        ("3,{px} 17,Training", "malformed pixels: 2305"),
        ("3,1 2 3,Training", "malformed pixels: 3"),
        ("3,{px} x,Training", "malformed pixels"),
        ("3,{bigpx},Training", "out of range 0..255"),
        ("3,{px},Train", "unknown Usage"),
        ("3,{px}", "malformed line"),
    ],
)
def test_fer2013_bad_rows(tmp_path, row, message):
    px = " ".join(["7"] * 2304)
    bigpx = " ".join(["7"] * 2303 + ["256"])
    write_text(tmp_path / "fer2013.csv", ["emotion,pixels,Usage", f"1,{px},Training",
                                          row.format(px=px, bigpx=bigpx)], "\r\n", False)
    with pytest.raises(DataError, match=message) as e:
        build_dataset("fer2013", tmp_path, "train")
    assert str(e.value).startswith(f"{tmp_path / 'fer2013.csv'}:3: ")
    ds = build_dataset("fer2013", tmp_path, "train", skip_bad=True)
    assert ds.targets == [1] and len(ds.skipped) == 1


def reference_majority(votes: list[int]) -> int | None:
    """FERPlus's published "majority" rule, written out independently: drop single votes, then a
    class needs strictly more than half of the remaining votes."""
    cleaned = [v if v > 1 else 0 for v in votes]
    total = sum(cleaned)
    for k, v in enumerate(cleaned):
        if total > 0 and 2 * v > total:
            return k
    return None


def test_ferplus_majority_matches_reference(seed):
    rng = np.random.default_rng(seed)
    for _ in range(400):
        votes = rng.multinomial(10, rng.dirichlet(np.full(10, 0.4))).tolist()
        assert ferplus_majority(np.array(votes)) == reference_majority(votes), votes
    assert ferplus_majority(np.array([5, 5, 0, 0, 0, 0, 0, 0, 0, 0])) is None  # a tie is no majority
    assert ferplus_majority(np.array([4, 1, 1, 1, 1, 1, 1, 0, 0, 0])) == 0  # single votes are outliers
    assert ferplus_majority(np.array([1] * 10)) is None


@pytest.mark.parametrize("num_classes", [8, 7])
def test_ferplus_join_and_labels(tmp_path, seed, num_classes):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(25, 45))
    truth = make_fer2013(tmp_path, rng, n)
    rows, expected, excluded = [], {u: [] for u in USAGES}, {u: 0 for u in USAGES}
    for i, (_, usage, px) in enumerate(truth):
        votes = rng.multinomial(10, rng.dirichlet(np.full(10, 0.5))).tolist()
        name = "" if rng.random() < 0.1 else f"fer{i:07d}.png"
        rows.append(f"{usage},{name},{','.join(map(str, votes))}")
        label = reference_majority(votes)
        if name and label is not None and label < num_classes:
            expected[usage].append((label, px))
        else:
            excluded[usage] += 1
    write_text(tmp_path / "fer2013new.csv",
               ["Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"] + rows,
               "\r\n")
    for split, usage in (("train", "Training"), ("val", "PublicTest"), ("test", "PrivateTest")):
        ds = build_dataset("ferplus", tmp_path, split, num_classes=num_classes)
        assert ds.classes == list(FERPLUS_CLASSES[:num_classes])
        assert ds.classes[:3] == ["Neutral", "Happiness", "Surprise"]
        assert ds.targets == [e[0] for e in expected[usage]]
        assert sum(ds.excluded.values()) == excluded[usage]
        for i in range(len(ds)):
            assert np.array_equal(np.asarray(ds[i][0])[..., 1], expected[usage][i][1])


def test_ferplus_mismatched_files(tmp_path, seed):
    rng = np.random.default_rng(seed)
    make_fer2013(tmp_path, rng, 3)
    header = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"
    write_text(tmp_path / "fer2013new.csv", [header, "Training,a.png,10,0,0,0,0,0,0,0,0,0"])
    with pytest.raises(ValueError, match="has 1 data rows but .* has 3"):
        build_dataset("ferplus", tmp_path, "train")
    truth = make_fer2013(tmp_path, rng, 2)
    other = "PublicTest" if truth[1][1] != "PublicTest" else "Training"
    write_text(tmp_path / "fer2013new.csv", [header, f"{truth[0][1]},a.png,10,0,0,0,0,0,0,0,0,0",
                                             f"{other},b.png,0,10,0,0,0,0,0,0,0,0"])
    with pytest.raises(DataError, match=r"fer2013new.csv:3: row does not match .*fer2013.csv:3"):
        build_dataset("ferplus", tmp_path, "train")
    write_text(tmp_path / "fer2013new.csv", [header, f"{truth[0][1]},a.png,10,0,0,0,0,0,0,0,0,0",
                                             f"{truth[1][1]},b.png,0,ten,0,0,0,0,0,0,0,0"])
    with pytest.raises(DataError, match=r"fer2013new.csv:3: malformed happiness vote count 'ten'"):
        build_dataset("ferplus", tmp_path, truth[1][1])
    with pytest.raises(FileNotFoundError, match="pixel file not found: .*fer2013.csv"):
        build_dataset("ferplus", tmp_path / "nowhere", "train")
    (tmp_path / "fer2013new.csv").unlink()
    with pytest.raises(FileNotFoundError, match="vote file not found: .*fer2013new.csv"):
        build_dataset("ferplus", tmp_path, "train")


# ---------------------------------------------------------------------------------------------
# Image folder
# ---------------------------------------------------------------------------------------------


def test_folder_uses_the_given_class_order(tmp_path, seed):
    rng = random.Random(seed)
    classes = ["zebra", "Apple", "mango", "Banana"]  # deliberately not in sort order
    truth = []
    for c in sorted(classes):
        for k in range(rng.randint(0 if c == "mango" else 1, 4)):
            name = f"{c}_{k}.{rng.choice(['jpg', 'png', 'JPEG'])}"
            write_image(str(tmp_path / "train" / c / name), name)
            truth.append((c, name))
    (tmp_path / "train" / ".DS_Store").write_text("ignored")
    (tmp_path / "train" / "zebra" / ".hidden").write_text("ignored")
    ds = build_dataset("folder", tmp_path, "train", classes=classes)
    assert ds.classes == classes
    got = sorted((ds.classes[ds[i][1]], os.path.basename(ds.where(i))) for i in range(len(ds)))
    assert got == sorted(truth)
    assert ds.class_counts == [sum(c == k for c, _ in truth) for k in classes]
    for i in range(len(ds)):
        assert_colour(ds[i][0], os.path.basename(ds.where(i)))


def test_folder_errors(tmp_path):
    write_image(str(tmp_path / "train" / "Fear" / "a.jpg"), "a")
    with pytest.raises(ValueError, match="explicit class list"):
        build_dataset("folder", tmp_path, "train")
    ds = build_dataset("folder", tmp_path, "train", classes="rafdb")
    assert ds.classes == list(RAFDB_CLASSES) and ds.targets == [1]
    write_image(str(tmp_path / "train" / "Scared" / "b.jpg"), "b")
    with pytest.raises(DataError, match="'Scared' is not in the class list"):
        build_dataset("folder", tmp_path, "train", classes="rafdb")
    (tmp_path / "train" / "Fear" / "notes.txt").write_text("x")
    ds = build_dataset("folder", tmp_path, "train", classes="rafdb", skip_bad=True)
    assert ds.targets == [1] and sorted(s.reason.split(" ")[0] for s in ds.skipped) == ["folder", "not"]
    with pytest.raises(FileNotFoundError, match="split folder"):
        build_dataset("folder", tmp_path, "val", classes="rafdb")
    with pytest.raises(ValueError, match="duplicate"):
        build_dataset("folder", tmp_path, "train", classes=["a", "a"])
    with pytest.raises(ValueError, match="num_classes=3 does not match"):
        build_dataset("folder", tmp_path, "train", classes="rafdb", skip_bad=True, num_classes=3)


# ---------------------------------------------------------------------------------------------
# build_dataset
# ---------------------------------------------------------------------------------------------


def test_build_dataset_arguments(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        build_dataset("raf", tmp_path, "train")
    with pytest.raises(ValueError, match="num_classes must be 7"):
        build_dataset("rafdb", tmp_path, "train", num_classes=8)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        build_dataset("affectnet", tmp_path, "train", num_classes="7")
    with pytest.raises(TypeError, match="split must be a str"):
        build_dataset("rafdb", tmp_path, 0)


def test_index_out_of_range(tmp_path, seed):
    make_rafdb(tmp_path, random.Random(seed), 4, 1)
    ds = build_dataset("rafdb", tmp_path, "train")
    assert ds[-1][2] == len(ds) - 1
    with pytest.raises(IndexError):
        ds[len(ds)]
