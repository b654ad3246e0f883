"""Issue 19: the saliency bank (docs/method.md §4.4) — ops vs the grid_sample reference (C++ and Triton
through the interpreter), hand-checked geometry, argument errors, the bank's refresh plan / write /
checkpoint state, the view-recording transform, the policy's teacher-on-a-fraction path, and
pre-training with P < 1 and P = 1."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from amgsn.data.transforms import build_pretrain_transform
from amgsn.engine.checkpoint import load_checkpoint
from amgsn.engine.pretrain import PretrainConfig, pretrain
from amgsn.masking import MaskingPolicy, SaliencyBank, spearman
from amgsn.masking.saliency_bank import IDENTITY_VIEW
from amgsn.models import MaskedAutoencoderViT
from amgsn.ops import abmg_select, cls_attention_scores, saliency_bank_read, saliency_bank_write_
from amgsn.ops import reference as ref

GRIDS = [(1, 1), (1, 4), (3, 5), (7, 7), (8, 8)]


def _views(B: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop boxes (some at the borders, the whole image, tiny ones) and flips."""
    h = torch.rand(B, generator=gen) * 0.9 + 0.05
    w = torch.rand(B, generator=gen) * 0.9 + 0.05
    top = torch.rand(B, generator=gen) * (1 - h)
    left = torch.rand(B, generator=gen) * (1 - w)
    boxes = torch.stack([top, left, h, w], 1)
    specials = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1 - 0.3, 1 - 0.4, 0.3, 0.4], [0.0, 0.5, 0.5, 0.5],
                             [0.25, 0.0, 0.75, 0.02]])
    k = min(B, len(specials))
    boxes[:k] = specials[:k]
    return boxes, torch.rand(B, generator=gen) < 0.5


def _case(grid, seed, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    Gh, Gw = grid
    M = 11
    B = 1 + int(torch.randint(0, 7, (1,), generator=gen))
    bank = torch.rand(M, Gh, Gw, generator=gen).to(dtype)
    idx = torch.randperm(M, generator=gen)[:B]
    boxes, flips = _views(B, gen)
    scores = torch.randn(B, Gh * Gw, generator=gen)
    fresh = torch.rand(B, generator=gen) < 0.5
    alpha = float(torch.rand((), generator=gen))
    return bank, idx, boxes, flips, scores, fresh, alpha


def _write_checks(out, expected, before, idx, boxes, flips, fresh, atol):
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=atol)
    untouched = torch.ones(before.shape[0], dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(out[untouched], before[untouched])  # other images' maps are never touched


@pytest.mark.parametrize("grid", GRIDS)
def test_cpu_ops_match_reference(grid, seed):
    bank, idx, boxes, flips, scores, fresh, alpha = _case(grid, seed)
    torch.testing.assert_close(saliency_bank_read(bank, idx, boxes, flips),
                               ref.saliency_bank_read(bank, idx, boxes, flips), rtol=0, atol=2e-6)
    for a in (1.0, alpha):
        out = saliency_bank_write_(bank.clone(), idx, scores, boxes, flips, fresh, a)
        expected = ref.saliency_bank_write_(bank.clone(), idx, scores, boxes, flips, fresh, a)
        _write_checks(out, expected, bank, idx, boxes, flips, fresh, atol=1e-3)  # one fp16 ulp at 1.0


@pytest.mark.parametrize("grid", GRIDS)
def test_triton_kernels_match_reference(grid, seed):
    from amgsn.kernels import saliency as K

    bank, idx, boxes, flips, scores, fresh, alpha = _case(grid, seed, torch.float32)
    torch.testing.assert_close(K.saliency_bank_read(bank, idx, boxes, flips),
                               ref.saliency_bank_read(bank, idx, boxes, flips), rtol=0, atol=2e-6)
    out = bank.clone()
    K.saliency_bank_write_(out, idx, scores, boxes, flips, fresh, alpha)
    expected = ref.saliency_bank_write_(bank.clone(), idx, scores, boxes, flips, fresh, alpha)
    _write_checks(out, expected, bank, idx, boxes, flips, fresh, atol=2e-6)
    with pytest.raises(ValueError, match="indices"):  # the in-kernel bound check, reported at once on CPU
        K.saliency_bank_read(bank, torch.tensor([0, bank.shape[0]]), boxes[:1].repeat(2, 1), flips[:1].repeat(2))


def test_geometry_by_hand():
    bank = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    zero = torch.zeros(1, dtype=torch.long)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    # The whole image: cell centres land on cell centres -> the map itself; flipped -> mirrored.
    assert torch.equal(saliency_bank_read(bank, zero, whole, torch.tensor([False])), bank.reshape(1, 16))
    assert torch.equal(saliency_bank_read(bank, zero, whole, torch.tensor([True])), bank.flip(-1).reshape(1, 16))
    # The right half, not flipped: view columns 0..3 sit at x = .5 + .5 * (c + .5) / 4 -> bank px = 1.75 + c/2.
    right = torch.tensor([[0.0, 0.5, 1.0, 0.5]])
    got = saliency_bank_read(bank, zero, right, torch.tensor([False])).reshape(4, 4)
    torch.testing.assert_close(got[0], torch.tensor([1.75, 2.25, 2.75, 3.0]))  # last clamps at the border
    # Writing that view back: only columns 2, 3 lie inside the crop (centres .625, .875).
    old = torch.full((1, 4, 4), -1.0)
    scores = torch.arange(16, dtype=torch.float32).reshape(1, 16)  # normalised: /15
    saliency_bank_write_(old, zero, scores, right, torch.tensor([False]), torch.tensor([False]))
    assert (old[0, :, :2] == -1).all() and (old[0, :, 2:] >= 0).all()
    # Column 2 sits at view x = .25 -> view px = .5: between view columns 0 and 1.
    torch.testing.assert_close(old[0, :, 2], (torch.arange(4) * 4 + 0.5) / 15)
    # alpha = 1/4 moves a seen map a quarter of the way (inside the crop only).
    blended = torch.full((1, 4, 4), -1.0)
    saliency_bank_write_(blended, zero, scores, right, torch.tensor([False]), torch.tensor([False]), 0.25)
    assert (blended[0, :, :2] == -1).all()
    torch.testing.assert_close(blended[0, :, 2:], -1 + 0.25 * (old[0, :, 2:] + 1))
    # A fresh image takes a value in every cell (border extension), whatever alpha.
    new = torch.full((1, 4, 4), -1.0)
    saliency_bank_write_(new, zero, scores, right, torch.tensor([True]), torch.tensor([True]), 0.25)
    assert (new >= 0).all()
    # A constant view writes zeros (no range to normalise by).
    saliency_bank_write_(new, zero, torch.ones(1, 16), whole, torch.tensor([False]), torch.tensor([False]))
    assert (new == 0).all()


def test_op_errors_name_the_argument():
    bank = torch.zeros(3, 2, 2, dtype=torch.float16)
    idx, boxes, flips = torch.tensor([0, 1]), torch.tensor([[0, 0, 1, 1.0]] * 2), torch.tensor([False, True])
    with pytest.raises(ValueError, match="indices must lie in"):
        saliency_bank_read(bank, torch.tensor([0, 3]), boxes, flips)
    with pytest.raises(ValueError, match="boxes must be finite"):
        saliency_bank_read(bank, idx, torch.tensor([[0, 0, 1, 0.0]] * 2), flips)
    with pytest.raises(ValueError, match="boxes has size 3"):
        saliency_bank_read(bank, idx, boxes[:, :3], flips)
    with pytest.raises(TypeError, match="flips"):
        saliency_bank_read(bank, idx, boxes, flips.float())
    with pytest.raises(TypeError, match="bank"):
        saliency_bank_read(bank.bfloat16(), idx, boxes, flips)
    with pytest.raises(TypeError, match="indices"):
        saliency_bank_read(bank, idx.int(), boxes, flips)
    with pytest.raises(ValueError, match="scores has size 3"):
        saliency_bank_write_(bank, idx, torch.zeros(2, 3), boxes, flips, flips)
    with pytest.raises(ValueError, match="indices must be distinct"):
        saliency_bank_write_(bank, torch.tensor([1, 1]), torch.zeros(2, 4), boxes, flips, flips)
    with pytest.raises(TypeError, match="fresh"):
        saliency_bank_write_(bank, idx, torch.zeros(2, 4), boxes, flips, flips.long())
    with pytest.raises(ValueError, match="alpha"):
        saliency_bank_write_(bank, idx, torch.zeros(2, 4), boxes, flips, flips, 1.5)


def test_bank_plan_write_and_state(tmp_path):
    bank = SaliencyBank(10, (2, 3), refresh=0.3)
    assert bank.num_refresh(8) == 3 and bank.num_refresh(1) == 1 and SaliencyBank(5, 2, 1.0).num_refresh(7) == 7
    batch = torch.tensor([4, 7, 1, 9, 0, 2, 5, 3])
    assert bank.plan(batch).tolist() == [0, 1, 2]  # all never seen: batch order
    views = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]] * 3)
    bank.write(batch[:3], torch.rand(3, 6), views)  # 4, 7, 1 written at clock 0
    bank.write(torch.tensor([9, 0]), torch.rand(2, 6), views[:2])  # clock 1
    # Never-seen (2, 5, 3 at positions 5, 6, 7) first, then the oldest — positions returned ascending.
    assert bank.plan(batch).tolist() == [5, 6, 7]
    assert bank.plan(torch.tensor([9, 4, 0, 7])).tolist() == [1, 3]  # ceil(.3 * 4) = 2 oldest: 4, 7
    assert bank.coverage() == 0.5 and bank.seen([4, 2]).tolist() == [True, False]
    # A repeated index keeps its last view.
    scores = torch.tensor([[0.0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0]])
    bank.write(torch.tensor([6, 6]), scores, views[:2])
    assert torch.equal(bank.maps[6].float().reshape(-1), (scores[1] / 5).half().float())
    torch.save(bank.state_dict(), tmp_path / "bank.pth")
    other = SaliencyBank(10, (2, 3), refresh=0.3)
    other.load_state_dict(torch.load(tmp_path / "bank.pth", weights_only=True))
    assert torch.equal(other.maps, bank.maps) and torch.equal(other.last_refresh, bank.last_refresh)
    assert other.clock == bank.clock == 3
    with pytest.raises(ValueError, match="different training set"):
        SaliencyBank(11, (2, 3), 0.3).load_state_dict(bank.state_dict())
    with pytest.raises(ValueError, match="patch grid"):
        SaliencyBank(10, (3, 2), 0.3).load_state_dict(bank.state_dict())
    with pytest.raises(ValueError, match="refresh"):
        SaliencyBank(10, 2, 0.0)
    with pytest.raises(ValueError, match="blend"):
        SaliencyBank(10, 2, 0.5, blend=0.0)
    # A seen map moves half-way (the default blend) inside the crop: the whole image here.
    before = bank.maps[6].float().clone()
    bank.write(torch.tensor([6]), scores[:1], views[:1])
    torch.testing.assert_close(bank.maps[6].float(), (before + 0.5 * ((scores[0] / 5).reshape(2, 3) - before)),
                               atol=1e-3, rtol=0)


def test_refresh_count_is_exact_where_p_times_b_rounds_above_an_integer():
    # 0.28 * 25 = 7.000000000000001 and 0.56 * 50 = 28.000000000000004 in float64: ceil must still give 7 / 28
    # (issue 22), and the plan must hold that many images.
    for p, b, k in ((0.28, 25, 7), (0.28, 50, 14), (0.56, 25, 14), (0.14, 50, 7), (0.56, 50, 28)):
        assert p * b > k  # the float product really lands above the integer
        bank = SaliencyBank(64, 2, refresh=p)
        assert bank.num_refresh(b) == k, (p, b)
        assert bank.plan(torch.arange(b)).tolist() == list(range(k))


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_preview_of_a_seen_image_blends_like_write_then_read(impl, seed):
    # preview = what write + read would give, without touching the bank — for images already in the bank,
    # whose maps a write moves only `blend` of the way (issue 22: blend < 1 was never previewed).
    gen = torch.Generator().manual_seed(seed)
    bank = SaliencyBank(12, (3, 5), refresh=0.5, impl=impl, blend=0.25)
    whole = torch.tensor([IDENTITY_VIEW])
    bank.write(torch.arange(12), torch.rand(12, 15, generator=gen), whole.repeat(12, 1))  # every map seen
    idx = torch.tensor([7, 2, 9])  # seen
    fresh_idx = torch.tensor([4])
    boxes, flips = _views(3, gen)
    src = torch.cat([boxes, flips.float()[:, None]], 1)
    src[0] = whole[0]  # the whole image: the map moves a quarter of the way everywhere
    read_views = torch.cat([_views(3, gen)[0], torch.tensor([[0.0], [1.0], [0.0]])], 1)
    scores = torch.randn(3, 15, generator=gen)
    maps, last = bank.maps.clone(), bank.last_refresh.clone()
    got = bank.preview(idx, scores, src, read_views)
    assert torch.equal(bank.maps, maps) and torch.equal(bank.last_refresh, last)  # the bank is left as it is
    # The same by the bank's own write + read (on a copy), and by hand for the whole-image view.
    twin = SaliencyBank(12, (3, 5), refresh=0.5, impl=impl, blend=0.25)
    twin.load_state_dict(bank.state_dict())
    twin.write(idx, scores, src)
    torch.testing.assert_close(got, twin.read(idx, read_views), rtol=0, atol=1e-6)
    new = (scores[0] - scores[0].min()) / (scores[0].max() - scores[0].min())
    by_hand = maps[7].float().reshape(-1) + 0.25 * (new - maps[7].float().reshape(-1))
    torch.testing.assert_close(twin.maps[7].float().reshape(-1), by_hand, rtol=0, atol=2e-3)
    assert not torch.allclose(twin.maps[7].float().reshape(-1), new, atol=0.05)  # not an overwrite
    # A never-seen image is overwritten whatever the blend (fresh), as write does.
    twin2 = SaliencyBank(12, (3, 5), refresh=0.5, impl=impl, blend=0.25)
    twin2.write(fresh_idx, scores[:1], whole)
    torch.testing.assert_close(SaliencyBank(12, (3, 5), 0.5, impl=impl, blend=0.25).preview(
        fresh_idx, scores[:1], whole, whole), twin2.read(fresh_idx, whole), rtol=0, atol=1e-6)


def test_spearman():
    a = torch.tensor([[1.0, 2, 3, 4], [1.0, 2, 3, 4], [1.0, 1, 2, 3], [2.0, 2, 2, 2]])
    b = torch.tensor([[10.0, 20, 30, 40], [4.0, 3, 2, 1], [1.0, 2, 3, 4], [1.0, 2, 3, 4]])
    rho = spearman(a, b)
    # Row 2 with average ranks: (.5, .5, 2, 3) vs (0, 1, 2, 3) -> 0.9486832980505138 (scipy.stats.spearmanr).
    torch.testing.assert_close(rho, torch.tensor([1.0, -1.0, 0.9486832980505138, 0.0], dtype=torch.float64))


def test_view_recording_transform_draws_the_same_and_records_the_view():
    plain, recording = build_pretrain_transform(32), build_pretrain_transform(32, record_view=True)
    # The image is its own x coordinate: the view's left / right edges can be read back from the pixels.
    x = np.tile(np.linspace(0, 255, 80, dtype=np.float32), (60, 1))
    img = Image.fromarray(np.stack([x, x, x], -1).round().astype(np.uint8))
    flips = set()
    for s in range(12):
        random.seed(s)
        torch.manual_seed(s)
        expected = plain(img)
        random.seed(s)
        torch.manual_seed(s)
        got, view, whole = recording(img)
        assert torch.equal(got, expected)
        whole_row = whole[0, 16] * 0.229 + 0.485  # the whole image, never flipped: spans x = 0 .. 1
        assert float(whole_row[0]) < 0.05 and float(whole_row[-1]) > 0.95
        top, left, h, w, flipped = view.tolist()
        assert 0 <= top and 0 <= left and top + h <= 1 + 1e-6 and left + w <= 1 + 1e-6 and 0.3 < h * w <= 1.0
        row = got[0, 16] * 0.229 + 0.485  # de-normalised red channel, one row
        first, last = (row[-1], row[0]) if flipped else (row[0], row[-1])
        assert abs(float(first) - left) < 0.05 and abs(float(last) - (left + w)) < 0.05
        flips.add(flipped)
    assert flips == {0.0, 1.0}


def test_policy_runs_the_teacher_on_the_refreshed_images_only(seed):
    torch.manual_seed(seed)
    model = MaskedAutoencoderViT("vit_tiny", img_size=32, patch_size=8, depth=2, decoder_depth=1)
    policy = MaskingPolicy("abmg_mrus", epochs=2, warmup_epochs=0)
    B, N = 8, 16
    bank = SaliencyBank(20, 4, refresh=0.3)
    imgs = torch.randn(B, 3, 32, 32)
    indices = torch.tensor([3, 11, 5, 17, 0, 8, 2, 19])
    gen = torch.Generator().manual_seed(seed)
    boxes, flips = _views(B, gen)
    views = torch.cat([boxes, flips.float()[:, None]], 1)
    bank.write(indices[:5], torch.rand(5, N, generator=gen), views[:5])  # 5 seen, 3 never seen
    seen_batches = []
    real = model.teacher_qk
    model.teacher_qk = lambda *a, **k: (seen_batches.append(k["tokens"].shape[0]), real(*a, **k))[1]
    ratios = torch.rand(B, generator=gen) * 0.4 + 0.5
    state = torch.get_rng_state()
    batch = policy.select(model, imgs, ratios, epoch=1, bank=bank, indices=indices, views=views)
    assert seen_batches == [3]  # ceil(0.3 * 8) = 3: the teacher saw 3 images, not 8
    assert batch.refreshed.indices.tolist() == [8, 2, 19]  # the never-seen ones
    # The same selection by hand: bank reads for everyone, the fresh teacher scores for the refreshed.
    expected = bank.read(indices, views)
    with torch.no_grad():
        model.eval()
        q, k, _ = real(tokens=model.embed_patches(imgs[5:]))
        model.train()
    expected[5:] = cls_attention_scores(q, k)
    torch.set_rng_state(state)
    noise = torch.rand(B, N) * policy.sigma
    want = abmg_select(expected, ratios, noise, relative_noise=True)
    assert torch.equal(batch.selection.mask, want.mask) and torch.equal(batch.selection.ids_keep, want.ids_keep)
    with pytest.raises(ValueError, match="indices and views"):
        policy.select(model, imgs, ratios, epoch=1, bank=bank)


def test_policy_refreshes_from_whole_images(seed):
    """With the whole images, the teacher sees the refreshed images whole; their masks this step come from
    those whole-image maps read through their views (by hand: reference write + read)."""
    torch.manual_seed(seed)
    model = MaskedAutoencoderViT("vit_tiny", img_size=32, patch_size=8, depth=2, decoder_depth=1)
    policy = MaskingPolicy("abmg_mrus", epochs=2, warmup_epochs=0)
    B, N = 8, 16
    bank = SaliencyBank(20, 4, refresh=0.3)
    gen = torch.Generator().manual_seed(seed)
    imgs, wholes = torch.randn(B, 3, 32, 32, generator=gen), torch.randn(B, 3, 32, 32, generator=gen)
    indices = torch.tensor([3, 11, 5, 17, 0, 8, 2, 19])
    boxes, flips = _views(B, gen)
    views = torch.cat([boxes, flips.float()[:, None]], 1)
    bank.write(indices[:5], torch.rand(5, N, generator=gen), views[:5])
    before = bank.maps.clone()
    ratios = torch.rand(B, generator=gen) * 0.4 + 0.5
    state = torch.get_rng_state()
    batch = policy.select(model, imgs, ratios, epoch=1, bank=bank, indices=indices, views=views, wholes=wholes)
    assert torch.equal(bank.maps, before)  # select only reads: the caller writes (after gathering ranks)
    with torch.no_grad():
        model.eval()
        q, k, _ = model.teacher_qk(wholes[5:])
        model.train()
    fresh = cls_attention_scores(q, k)
    torch.testing.assert_close(batch.refreshed.scores, fresh)
    expected = bank.read(indices, views)
    new_maps = ref.saliency_bank_write_(torch.zeros(3, 4, 4, dtype=torch.float16), torch.arange(3), fresh,
                                        torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3), torch.zeros(3, dtype=torch.bool),
                                        torch.ones(3, dtype=torch.bool))
    expected[5:] = ref.saliency_bank_read(new_maps, torch.arange(3), boxes[5:], flips[5:])
    torch.set_rng_state(state)
    want = abmg_select(expected, ratios, torch.rand(B, N) * policy.sigma, relative_noise=True)
    assert torch.equal(batch.selection.mask, want.mask)



TINY = dict(img_size=32, patch_size=8, depth=1, decoder_depth=1, batch_size=8, workers=0, progress=False,
            warmup_epochs=1, mask_mode="abmg_mrus", seed=5)


def _same_checkpoints(a, b, keys=("model", "optimizer", "ratio_bank")):
    a, b = load_checkpoint(a), load_checkpoint(b)
    for key in keys:
        flat_a, flat_b = torch.utils._pytree.tree_flatten(a[key])[0], torch.utils._pytree.tree_flatten(b[key])[0]
        assert len(flat_a) == len(flat_b)
        for x, y in zip(flat_a, flat_b):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, key
    return a, b


def test_pretrain_p1_is_todays_abmg_and_the_bank_path_keeps_the_data_stream(tiny_synthetic, tmp_path):
    # P = 1 given explicitly = the default: same weights, no bank in the checkpoint, no saliency keys.
    pretrain(PretrainConfig(data_dir=str(tiny_synthetic), out=str(tmp_path / "a"), epochs=2, abmg_warmup=1,
                            max_steps=10, **TINY))
    pretrain(PretrainConfig(data_dir=str(tiny_synthetic), out=str(tmp_path / "b"), epochs=2, abmg_warmup=1,
                            max_steps=10, saliency_refresh=1.0, **TINY))
    a, _ = _same_checkpoints(tmp_path / "a" / "checkpoint-last.pth", tmp_path / "b" / "checkpoint-last.pth")
    assert "saliency_bank" not in a
    assert "saliency_agreement" not in (tmp_path / "a" / "log.jsonl").read_text()
    # With P < 1 but ABMG still in warm-up, the run (view-recording transform, loop) equals P = 1.
    for name, p in (("c", 1.0), ("d", 0.25)):
        pretrain(PretrainConfig(data_dir=str(tiny_synthetic), out=str(tmp_path / name), epochs=1, abmg_warmup=1,
                                max_steps=3, saliency_refresh=p, **TINY))
    _same_checkpoints(tmp_path / "c" / "checkpoint-last.pth", tmp_path / "d" / "checkpoint-last.pth")


def test_pretrain_with_bank_logs_agreement_and_resumes_exactly(tiny_synthetic, tmp_path):
    import os
    import signal

    from torch.optim.optimizer import register_optimizer_step_post_hook

    from amgsn.engine.common import Preempted

    kw = dict(epochs=3, abmg_warmup=1, saliency_refresh=0.25, **TINY)
    full, cut = tmp_path / "full", tmp_path / "cut"
    pretrain(PretrainConfig(data_dir=str(tiny_synthetic), out=str(full), **kw))
    records = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    assert records[0]["saliency_agreement"] is None and records[0]["saliency_coverage"] == 0.0  # warm-up
    # 8 steps x ceil(.25 * 8) = 2 refreshed per ABMG epoch, never-seen first: 16 new images per epoch.
    assert [r["saliency_coverage"] for r in records[1:]] == [0.25, 0.5]
    assert all(-1.0 <= r["saliency_agreement"] <= 1.0 for r in records[1:])
    state = load_checkpoint(full / "checkpoint-last.pth")
    assert (state["saliency_bank"]["last_refresh"] >= 0).sum() == 32 and state["saliency_bank"]["clock"] == 16
    gallery = np.load(full / "mask_gallery" / "end.npz")
    assert gallery["bank_mask"].shape == gallery["abmg_mask"].shape and gallery["bank_seen"].dtype == bool
    # SIGTERM inside epoch 1 (ABMG on, the bank half-written), then resume: the same end state.
    steps = []
    hook = register_optimizer_step_post_hook(
        lambda *_: steps.append(1) or (len(steps) == 11 and os.kill(os.getpid(), signal.SIGTERM)))
    try:
        with pytest.raises(Preempted):
            pretrain(PretrainConfig(data_dir=str(tiny_synthetic), out=str(cut), **kw))
    finally:
        hook.remove()
    mid = load_checkpoint(cut / "checkpoint-last.pth")
    assert mid["in_epoch"]["epoch"] == 1 and 0 < mid["in_epoch"]["batches"] < 8
    assert 0 < int((mid["saliency_bank"]["last_refresh"] >= 0).sum()) < 32
    pretrain(PretrainConfig(data_dir=str(tiny_synthetic), out=str(cut), resume=str(cut / "checkpoint-last.pth"), **kw))
    _same_checkpoints(full / "checkpoint-last.pth", cut / "checkpoint-last.pth",
                      ("model", "optimizer", "ratio_bank", "saliency_bank"))


def _ddp_rank(rank: int, world: int, port: int, data: str, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    summary = pretrain(PretrainConfig(data_dir=data, out=out, epochs=2, abmg_warmup=1, saliency_refresh=0.25,
                                      **TINY))
    torch.save(summary["saliency_bank"], f"{out}-rank{rank}.pt")


@pytest.mark.dist
def test_pretrain_ddp_saliency_bank_identical_on_every_rank(tiny_synthetic, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, str(tiny_synthetic), str(tmp_path / "run")), nprocs=2)
    banks = [torch.load(tmp_path / f"run-rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(banks[0]["maps"], banks[1]["maps"])
    assert torch.equal(banks[0]["last_refresh"], banks[1]["last_refresh"])
    # One ABMG epoch: 4 steps x 2 ranks x ceil(.25 * 8) = 2 images each, all written on both ranks.
    assert int((banks[0]["last_refresh"] >= 0).sum()) == 16 and banks[0]["clock"] == 4
    assert banks[0]["maps"].abs().sum() > 0


def test_pretrain_rejects_bad_refresh(tmp_path):
    for p in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="--saliency-refresh must lie in"):
            PretrainConfig(data_dir="x", out="y", saliency_refresh=p).validate()


def test_gallery_shows_bank_masks_and_agreement_curve(seed):
    from amgsn import viz

    rng = np.random.default_rng(seed)
    n, N = 3, 16
    g = {"images": rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8), "labels": np.arange(n),
         "abmg_mask": rng.random((n, N)) < 0.75, "random_mask": rng.random((n, N)) < 0.75,
         "patch_size": np.asarray(8), "classes": np.asarray(["a", "b", "c"])}
    plain = Image.open(__import__("io").BytesIO(viz.mask_gallery(g)))
    with_bank = Image.open(__import__("io").BytesIO(viz.mask_gallery(
        {**g, "bank_mask": rng.random((n, N)) < 0.75, "bank_seen": np.array([True, False, True])})))
    assert with_bank.width > plain.width * 1.2 and with_bank.height == plain.height  # a fourth column
    with pytest.raises(ValueError, match="bank_mask"):
        viz.mask_gallery({**g, "bank_mask": np.zeros((n, N + 1), dtype=bool)})
    records = [{"stage": "pretrain", "epoch": e, "saliency_agreement": a, "saliency_coverage": c}
               for e, a, c in ((0, None, 0.0), (1, 0.5, 0.25), (2, 0.8, 0.5))]
    assert viz.plot_saliency_agreement(records)[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(viz.NothingToPlot):
        viz.plot_saliency_agreement([{"stage": "pretrain", "epoch": 0, "loss": 1.0}])


_ROUTE_SCRIPT = """
import torch
from amgsn.ops import reference as ref, saliency as S, saliency_bank_read, saliency_bank_write_
assert S.TRITON_ON_CPU
g = torch.Generator().manual_seed({seed})
bank = torch.rand(9, 5, 6, generator=g)
idx = torch.tensor([4, 0, 8])
boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.3, 0.5, 0.7], [0.6, 0.0, 0.4, 0.25]])
flips = torch.tensor([True, False, True])
torch.testing.assert_close(saliency_bank_read(bank, idx, boxes, flips), ref.saliency_bank_read(bank, idx, boxes, flips),
                           rtol=0, atol=2e-6)
scores, fresh = torch.randn(3, 30, generator=g), torch.tensor([False, True, False])
out = saliency_bank_write_(bank.clone(), idx, scores, boxes, flips, fresh, 0.5)
torch.testing.assert_close(out, ref.saliency_bank_write_(bank.clone(), idx, scores, boxes, flips, fresh, 0.5),
                           rtol=0, atol=2e-6)
print("route ok")
"""


def test_public_ops_through_the_triton_route(seed):
    """The ops' CUDA route (custom op -> Triton launcher) on CPU tensors: AMGSN_TRITON_ON_CPU=1 + the
    interpreter, in a subprocess (both must be set before amgsn is imported)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "AMGSN_TRITON_ON_CPU": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _ROUTE_SCRIPT.format(seed=seed)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "route ok" in proc.stdout, proc.stderr[-3000:]


def test_ops_compile_fullgraph(seed):
    bank, idx, boxes, flips, scores, fresh, alpha = _case((3, 4), seed)
    read = torch.compile(lambda *a: saliency_bank_read(*a) * 2, fullgraph=True)
    assert torch.equal(read(bank, idx, boxes, flips), saliency_bank_read(bank, idx, boxes, flips) * 2)

    def write(b, *a):
        saliency_bank_write_(b, *a)
        return b.float().sum()

    compiled, eager = bank.clone(), bank.clone()
    torch.compile(write, fullgraph=True)(compiled, idx, scores, boxes, flips, fresh, alpha)
    write(eager, idx, scores, boxes, flips, fresh, alpha)
    assert torch.equal(compiled, eager)


@pytest.mark.cuda
def test_cuda_ops_match_reference_without_host_sync(seed):
    """The compiled Triton kernels on the GPU (benchmarks/gpu_check.sh): fp16 bank, vs the reference, and no
    host sync inside either op."""
    for grid in ((1, 1), (7, 7), (14, 14)):
        bank, idx, boxes, flips, scores, fresh, alpha = (t.cuda() if isinstance(t, torch.Tensor) else t
                                                         for t in _case(grid, seed))
        want_read = ref.saliency_bank_read(bank, idx, boxes, flips)
        want_bank = ref.saliency_bank_write_(bank.clone(), idx, scores, boxes, flips, fresh, alpha)
        out = bank.clone()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = saliency_bank_read(bank, idx, boxes, flips)
            saliency_bank_write_(out, idx, scores, boxes, flips, fresh, alpha)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.testing.assert_close(got, want_read, rtol=0, atol=1e-5)  # FMA contraction on the GPU: a few ulp
        torch.testing.assert_close(out.float(), want_bank.float(), rtol=0, atol=1e-3)  # one fp16 ulp at 1.0


@pytest.mark.parametrize("teacher,impl", [("ema", "fused"), ("online", "reference"), ("ema", "reference")])
def test_policy_bank_path_for_every_teacher_and_impl(teacher, impl, seed):
    torch.manual_seed(seed)
    model = MaskedAutoencoderViT("vit_tiny", img_size=32, patch_size=8, depth=2, decoder_depth=1)
    policy = MaskingPolicy("abmg_mrus", epochs=2, warmup_epochs=0, teacher=teacher, impl=impl)
    bank = SaliencyBank(20, 4, refresh=0.3, impl=impl)
    seen = []
    net = policy._ensure_ema(model).module if teacher == "ema" else model
    real = net.teacher_qk
    net.teacher_qk = lambda *a, **k: (seen.append((a[0] if a else k["tokens"]).shape[0]), real(*a, **k))[1]
    views = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.1, 0.2, 0.6, 0.7, 1.0]] * 4)
    batch = policy.select(model, torch.randn(8, 3, 32, 32), torch.full((8,), 0.75), 1, bank=bank,
                          indices=torch.arange(8) * 2, views=views, wholes=torch.randn(8, 3, 32, 32))
    assert seen == [3] and batch.refreshed.indices.tolist() == [0, 2, 4]
    assert torch.equal(batch.refreshed.views, torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]] * 3))  # whole images
    assert batch.encoder == ("packed" if impl == "fused" else "padded") and batch.visible.shape[0] == 8 * 4
    bank.write(*batch.refreshed)
    assert bank.coverage() == 3 / 20
