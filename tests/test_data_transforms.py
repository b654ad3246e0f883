"""Transforms, the two-view wrapper, the class-balanced sampler, and a DataLoader over a data set."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader

from amgsn.data import (
    TwoViewTransform,
    build_balanced_sampler,
    build_dataset,
    build_eval_transform,
    build_finetune_transform,
    build_pretrain_transform,
    build_transform,
    inverse_frequency_weights,
)


def random_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_eval_transform_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(17, 70))
    img = random_image(rng, size, size)
    got = build_eval_transform(size)(img)
    ref = (np.asarray(img, dtype=np.float64) / 255.0 - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
    assert got.shape == (3, size, size) and got.dtype == torch.float32
    np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), ref, atol=1e-5)
    # Non-square input: shorter side resized, centre crop.
    assert build_eval_transform(32)(random_image(rng, 61, 45)).shape == (3, 32, 32)


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_train_transforms_shape_and_randomness(seed, kind):
    rng = np.random.default_rng(seed)
    # Face crops are near-square; a very elongated image makes timm fall back to a fixed centre
    # crop, and then two draws can coincide.
    w = int(rng.integers(40, 120))
    img = random_image(rng, w, int(w * rng.uniform(0.85, 1.15)))
    tf = build_transform(kind, 48)

    def reseed():  # timm's crop draws from Python's random, torchvision's ops from torch
        random.seed(seed)
        torch.manual_seed(seed)

    reseed()
    a = tf(img)
    b = tf(img)
    assert a.shape == b.shape == (3, 48, 48) and a.dtype == torch.float32
    assert not torch.equal(a, b)  # random crops / flips / jitter
    reseed()
    assert torch.equal(tf(img), a)  # reproducible under the seeds (DataLoader workers seed both)


def test_recorded_view_box_on_a_non_square_image():
    # The view's top / height are fractions of the image's height, left / width of its width (issue 22:
    # the view recorder's rows were only ever checked on their x side). An image 60 wide, 90 high whose
    # pixels hold their own y coordinate: the crop's top and bottom edges can be read back from the output.
    H, W = 90, 60
    y = np.tile(np.linspace(0, 255, H, dtype=np.float32)[:, None], (1, W))
    img = Image.fromarray(np.stack([y, y, y], -1).round().astype(np.uint8))
    tf = build_pretrain_transform(32, record_view=True)
    tops = []
    for s in range(12):
        random.seed(s)
        torch.manual_seed(s)
        got, view, _ = tf(img)
        random.seed(s)  # the same draw by hand: the crop's box in pixels
        i, j, h, w = tf.crop.get_params(img, tf.crop.scale, tf.crop.ratio)
        torch.testing.assert_close(view[:4], torch.tensor([i / H, j / W, h / H, w / W]), rtol=0, atol=1e-7)
        top, _, height, _, _ = view.tolist()
        col = got[0, :, 16] * IMAGENET_DEFAULT_STD[0] + IMAGENET_DEFAULT_MEAN[0]  # de-normalised, one column
        assert abs(float(col[0]) - top) < 0.04 and abs(float(col[-1]) - (top + height)) < 0.04, (s, view)
        tops.append(i)
    assert max(tops) > 10  # crops away from the top edge, where i / H and i / W differ


def test_transform_arguments():
    with pytest.raises(ValueError, match="image_size"):
        build_finetune_transform(4)
    with pytest.raises(ValueError, match="scale"):
        build_pretrain_transform(32, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="re_prob"):
        build_finetune_transform(32, re_prob=2.0)
    with pytest.raises(ValueError, match="kind"):
        build_transform("train", 32)
    with pytest.raises(TypeError, match="callable"):
        TwoViewTransform(3)


def test_two_view_transform(seed):
    rng = np.random.default_rng(seed)
    img = random_image(rng, 50, 50)
    v1, v2 = TwoViewTransform(build_finetune_transform(32))(img)
    assert v1.shape == v2.shape == (3, 32, 32) and not torch.equal(v1, v2)
    first, second = TwoViewTransform(lambda im: "a", lambda im: "b")(img)
    assert (first, second) == ("a", "b")


def test_inverse_frequency_weights(seed):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 5, int(rng.integers(20, 200))).tolist()
    w = inverse_frequency_weights(targets, num_classes=6)
    counts = np.bincount(targets, minlength=6)
    np.testing.assert_allclose(w.numpy(), 1.0 / counts[targets])
    # Each present class carries the same total weight.
    totals = np.bincount(targets, weights=w.numpy(), minlength=6)
    np.testing.assert_allclose(totals[counts > 0], 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        inverse_frequency_weights([])
    with pytest.raises(ValueError, match=">= 0"):
        inverse_frequency_weights([0, -1])
    with pytest.raises(TypeError, match="integer"):
        inverse_frequency_weights([0.5, 1.0])
    with pytest.raises(ValueError, match="num_classes"):
        inverse_frequency_weights([0, 7], num_classes=7)


def test_balanced_sampler_equalises_classes(seed):
    # RAF-DB-like imbalance: 36x between the largest and the smallest class.
    counts = [1290, 281, 717, 4772, 1982, 705, 2524]
    targets = np.repeat(np.arange(7), [c // 10 for c in counts])
    g = torch.Generator().manual_seed(seed)
    sampler = build_balanced_sampler(targets.tolist(), num_samples=14000, generator=g)
    drawn = np.bincount(targets[list(sampler)], minlength=7) / 14000
    np.testing.assert_allclose(drawn, 1 / 7, atol=0.02)  # ~6 sigma for a binomial at n = 14000
    assert len(build_balanced_sampler(targets)) == len(targets)
    with pytest.raises(ValueError, match="num_samples"):
        build_balanced_sampler(targets, num_samples=0)


def test_dataloader_over_a_dataset(tmp_path, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(9, 20))
    lines = []
    for i in range(n):
        lines.append(f"train_{i + 1:05d}.jpg {int(rng.integers(1, 8))}")
        (tmp_path / "Image" / "aligned").mkdir(parents=True, exist_ok=True)
        random_image(rng, 40, 40).save(tmp_path / "Image" / "aligned" / f"train_{i + 1:05d}_aligned.jpg")
    (tmp_path / "EmoLabel").mkdir()
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines))
    ds = build_dataset("rafdb", tmp_path, "train", transform=TwoViewTransform(build_finetune_transform(32)),
                       cache=True)
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=2)
    seen = []
    for (v1, v2), labels, idx in loader:
        assert v1.shape[1:] == v2.shape[1:] == (3, 32, 32) and v1.shape[0] == labels.shape[0] == idx.shape[0]
        assert labels.tolist() == [ds.targets[i] for i in idx.tolist()]
        seen += idx.tolist()
    assert seen == list(range(n))
