"""Masking policies: ABMG masks the most salient patches, warm-up masks at random, the fused and
reference implementations agree, the EMA teacher, and the MRUS ratio bank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amgsn.masking import EMATeacher, MaskingPolicy, RatioBank
from amgsn.models import MaskedAutoencoderViT
from amgsn.ops import reference as ref_ops

IMG, PATCH = 32, 8
N = (IMG // PATCH) ** 2


def tiny_mae() -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT("vit_tiny", img_size=IMG, patch_size=PATCH, depth=2, decoder_depth=1)


def ratios_for(B: int, gen: torch.Generator) -> torch.Tensor:
    return 0.3 + 0.6 * torch.rand(B, generator=gen)


def saliency(model: MaskedAutoencoderViT, imgs: torch.Tensor) -> torch.Tensor:
    """Independent saliency: DINO/AttMask's CLS row of the last block's full attention matrix."""
    with torch.no_grad():
        q, k, _ = model.eval().teacher_qk(imgs, full_q=True)
    model.train()
    return ref_ops.cls_attention_scores_full(q, k)


def expected_mask(values: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """Mask the N - num_keep largest values of each row (ties are measure-zero here)."""
    B, n = values.shape
    keep = ref_ops.num_keep_from_ratio(ratios, B, n)
    mask = torch.zeros(B, n, dtype=torch.bool)
    for b in range(B):
        top = torch.topk(values[b], n - int(keep[b])).indices
        mask[b, top] = True
    return mask


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_abmg_masks_the_most_salient_patches(seed, impl):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae()
    B = 5
    imgs = torch.randn(B, 3, IMG, IMG, generator=gen)
    ratios = ratios_for(B, gen)
    policy = MaskingPolicy("abmg", epochs=10, warmup_epochs=0, sigma=0.0, impl=impl)
    batch = policy.select(model, imgs, ratios, epoch=0)
    assert batch.abmg and batch.encoder == ("packed" if impl == "fused" else "padded")
    assert torch.equal(batch.selection.mask, expected_mask(saliency(model, imgs), ratios))
    assert model.training  # the online teacher's eval pass restores training mode


def test_abmg_noise_is_uniform_on_normalised_scores(seed):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae()
    B, sigma = 4, 0.5
    imgs = torch.randn(B, 3, IMG, IMG, generator=gen)
    ratios = ratios_for(B, gen)
    policy = MaskingPolicy("abmg_mrus", epochs=10, warmup_epochs=0, sigma=sigma)
    torch.manual_seed(seed)
    batch = policy.select(model, imgs, ratios, epoch=3)
    # Replay the policy's draws: the teacher pass uses no randomness, then U(0, sigma) noise.
    torch.manual_seed(seed)
    noise = torch.rand(B, N) * sigma
    s = saliency(model, imgs).double()
    normalised = (s - s.amin(1, keepdim=True)) / (s.amax(1, keepdim=True) - s.amin(1, keepdim=True))
    assert torch.equal(batch.selection.mask, expected_mask(normalised + noise.double(), ratios))


def test_warmup_masks_at_random(seed):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae()
    B = 4
    imgs = torch.randn(B, 3, IMG, IMG, generator=gen)
    ratios = ratios_for(B, gen)
    policy = MaskingPolicy("abmg_mrus", epochs=30)
    assert policy.warmup_epochs == 3 and policy.uses_ratio_bank  # default: 10 % of the epochs
    assert [policy.uses_abmg(e) for e in (0, 2, 3, 29)] == [False, False, True, True]
    torch.manual_seed(seed)
    batch = policy.select(model, imgs, ratios, epoch=2)
    torch.manual_seed(seed)
    noise = torch.rand(B, N)
    assert not batch.abmg
    assert torch.equal(batch.selection.mask, expected_mask(noise, ratios))
    # Random mode never uses saliency, whatever the epoch.
    random_policy = MaskingPolicy("random", epochs=30)
    assert not random_policy.uses_abmg(100) and not random_policy.uses_ratio_bank


@pytest.mark.parametrize("mode,epoch", [("abmg_mrus", 5), ("abmg", 5), ("random", 5), ("abmg_mrus", 0)])
def test_fused_and_reference_agree(seed, mode, epoch):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae()
    B = 5
    imgs = torch.randn(B, 3, IMG, IMG, generator=gen)
    ratios = ratios_for(B, gen)
    outs = []
    for impl in ("fused", "reference"):
        policy = MaskingPolicy(mode, epochs=10, warmup_epochs=1, impl=impl)
        torch.manual_seed(seed)  # same noise for both
        batch = policy.select(model, imgs, ratios, epoch)
        outs.append((batch, model(imgs, masked=(batch.visible, batch.selection), encoder=batch.encoder)))
    (bf, of), (br, orf) = outs
    for a, b in zip(bf.selection, br.selection):
        assert (a == b) if isinstance(a, int) else torch.equal(a, b)
    torch.testing.assert_close(bf.visible, br.visible, atol=0, rtol=0)
    torch.testing.assert_close(of.per_image_loss, orf.per_image_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(of.loss, orf.loss, atol=1e-5, rtol=1e-5)


def test_policy_output_trains_the_online_model(seed):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae()
    imgs = torch.randn(3, 3, IMG, IMG, generator=gen)
    policy = MaskingPolicy("abmg", epochs=4, warmup_epochs=0)
    out = policy(model, imgs, 0.75, epoch=1)
    out.loss.backward()
    # The tokens the encoder sees are the online model's: the patch embedding gets a gradient.
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert out.per_image_loss.shape == (3,)


def test_ema_teacher(seed):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae()
    policy = MaskingPolicy("abmg", epochs=4, warmup_epochs=0, teacher="ema", ema_decay=0.9)
    policy.update_teacher(model)  # first call: copy of the online model
    before = {k: v.clone() for k, v in policy.ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    policy.update_teacher(model)
    for name, p in model.named_parameters():
        expected = 0.9 * before[name] + 0.1 * p.detach()
        torch.testing.assert_close(policy.ema.module.get_parameter(name), expected, atol=1e-6, rtol=1e-6)
    assert not policy.ema.module.training
    assert not any(p.requires_grad for p in policy.ema.parameters())
    # The selection follows the EMA's saliency, not the online model's.
    imgs = torch.randn(4, 3, IMG, IMG, generator=gen)
    policy_nonoise = MaskingPolicy("abmg", epochs=4, warmup_epochs=0, teacher="ema", sigma=0.0)
    policy_nonoise.ema = policy.ema
    batch = policy_nonoise.select(model, imgs, 0.5, epoch=0)
    assert torch.equal(batch.selection.mask, expected_mask(saliency(policy.ema.module, imgs), torch.tensor(0.5)))
    # Checkpoint round trip.
    restored = MaskingPolicy("abmg", epochs=4, teacher="ema")
    restored.load_state_dict(policy.state_dict(), model)
    for k, v in policy.ema.module.state_dict().items():
        assert torch.equal(restored.ema.module.state_dict()[k], v)
    with pytest.raises(ValueError, match="online"):
        MaskingPolicy("abmg", teacher="online").load_state_dict(policy.state_dict(), model)


def test_policy_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        MaskingPolicy("attmask")
    with pytest.raises(ValueError, match="impl must be one of"):
        MaskingPolicy(impl="triton")
    with pytest.raises(ValueError, match="teacher must be one of"):
        MaskingPolicy(teacher="momentum")
    with pytest.raises(ValueError, match="warmup_epochs"):
        MaskingPolicy(warmup_epochs=-1)
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(tiny_mae(), decay=1.5)


# ------------------------------------------------------------------------------- RatioBank


def test_ratio_bank_update_matches_formula(seed):
    rng = np.random.default_rng(seed)
    n, eta, mom = 50, 0.08, 0.9
    bank = RatioBank(n, r0=0.7, eta=eta, r_min=0.5, r_max=0.9, momentum=mom)
    r = np.full(n, 0.7)
    lbar = None
    for _ in range(6):
        idx = rng.choice(n, size=12, replace=True)  # duplicates happen: averaged per image
        loss = rng.uniform(0.2, 2.0, size=12)
        bank.update(torch.from_numpy(idx), torch.from_numpy(loss).float())
        loss32 = torch.from_numpy(loss).float().double().numpy()  # the bank sees the float32 losses
        lbar = loss32.mean() if lbar is None else mom * lbar + (1 - mom) * loss32.mean()
        for i in np.unique(idx):
            li = loss32[idx == i].mean()
            r[i] = np.clip(r[i] + eta * (lbar - li) / lbar, 0.5, 0.9)
        np.testing.assert_allclose(bank.all_ratios.numpy(), r, rtol=0, atol=1e-12)
        assert bank.loss_mean == pytest.approx(lbar, rel=1e-12)
    got = bank.ratios(torch.tensor([3, 0, 3]))
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    np.testing.assert_allclose(got.numpy(), r[[3, 0, 3]].astype(np.float32))


def test_ratio_bank_clips_and_moves_in_the_right_direction():
    bank = RatioBank(3, r0=0.75, eta=0.1, r_min=0.5, r_max=0.9)
    bank.update([0, 1, 2], torch.tensor([1.0, 2.0, 3.0]))  # lbar = 2
    r = bank.all_ratios
    assert r[0] > 0.75 and r[1] == 0.75 and r[2] < 0.75  # easy image masked more, hard one less
    bank = RatioBank(2, r0=0.75, eta=1.0, r_min=0.5, r_max=0.9)
    bank.update([0, 1], torch.tensor([0.0, 100.0]))  # steps +1 and -1: clipped at both ends
    assert bank.all_ratios.tolist() == [0.9, 0.5]


def test_ratio_bank_state_round_trip(seed):
    gen = torch.Generator().manual_seed(seed)
    a = RatioBank(20)
    for _ in range(3):
        a.update(torch.randint(0, 20, (8,), generator=gen), torch.rand(8, generator=gen))
    b = RatioBank(20, r0=0.6)
    b.load_state_dict(a.state_dict())
    idx, loss = torch.randint(0, 20, (8,), generator=gen), torch.rand(8, generator=gen)
    a.update(idx, loss)
    b.update(idx, loss)
    assert torch.equal(a.all_ratios, b.all_ratios) and a.loss_mean == b.loss_mean
    assert a.state_dict()["num_updates"] == b.state_dict()["num_updates"] == 4
    with pytest.raises(ValueError, match="different training set"):
        RatioBank(21).load_state_dict(a.state_dict())


def test_ratio_bank_histogram_and_summary(seed):
    gen = torch.Generator().manual_seed(seed)
    bank = RatioBank(40, eta=0.3)
    bank.update(torch.arange(40), torch.rand(40, generator=gen) * 2)
    counts, edges = bank.histogram(bins=4)
    np_counts, np_edges = np.histogram(bank.all_ratios.numpy(), bins=4, range=(0.5, 0.9))
    assert counts == np_counts.tolist() and sum(counts) == 40
    np.testing.assert_allclose(edges, np_edges)
    s = bank.summary()
    r = bank.all_ratios
    assert (s["mean"], s["min"], s["max"]) == (float(r.mean()), float(r.min()), float(r.max()))


def test_ratio_bank_bad_input():
    bank = RatioBank(5)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
        bank.ratios([5])
    with pytest.raises(TypeError, match="indices must be integers"):
        bank.ratios(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="finite"):
        bank.update([0, 1], torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="one entry per index"):
        bank.update([0, 1], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="r_min <= r0"):
        RatioBank(5, r0=0.95)
    with pytest.raises(ValueError, match="num_images"):
        RatioBank(0)
    assert bank.num_updates == 0 and torch.equal(bank.all_ratios, torch.full((5,), 0.75, dtype=torch.float64))


@pytest.mark.cuda
def test_fused_and_reference_agree_cuda(seed):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae().cuda()
    B = 8
    imgs = torch.randn(B, 3, IMG, IMG, generator=gen).cuda()
    ratios = ratios_for(B, gen)
    sels = []
    for impl in ("fused", "reference"):
        torch.manual_seed(seed)
        sels.append(MaskingPolicy("abmg_mrus", epochs=10, warmup_epochs=0, impl=impl).select(model, imgs, ratios, 3))
    assert torch.equal(sels[0].selection.mask, sels[1].selection.mask)
    assert torch.equal(sels[0].selection.ids_keep, sels[1].selection.ids_keep)
    torch.testing.assert_close(sels[0].visible, sels[1].visible, atol=0, rtol=0)
