"""Issue 18 finding 1: the MRUS ratio bank's wiring in the pre-training loop, replayed step by step.

The loop must (a) look up each batch's ratios for exactly that batch's dataset indices, from the bank
as all earlier steps left it, and pass them to the masking policy in batch order, and (b) hand
``RatioBank.update`` each image's own reconstruction loss paired with that image's dataset index. The
test records what the loader yields, what the policy gets, what the model returns and what the bank is
given, then replays the updates on a fresh bank built with the run's parameters."""

from __future__ import annotations

import torch

from amgsn.engine import common
from amgsn.engine.pretrain import PretrainConfig, pretrain
from amgsn.masking.abmg import MaskingPolicy
from amgsn.masking.mrus import RatioBank
from amgsn.models.vit_mae import MaskedAutoencoderViT


def test_mrus_wiring_replayed_against_ratio_bank_update(tiny_synthetic, tmp_path, monkeypatch):
    batches, selects, forwards, updates, banks = [], [], [], [], []

    real_epoch = common.TrainLoader.epoch

    def epoch(self, *a, **kw):
        for imgs, labels, indices in real_epoch(self, *a, **kw):
            batches.append((imgs.clone(), indices.clone()))
            yield imgs, labels, indices

    real_select = MaskingPolicy.select

    def select(self, model, imgs, ratios, *a, **kw):
        selects.append((imgs.clone(), ratios.clone() if isinstance(ratios, torch.Tensor) else ratios))
        return real_select(self, model, imgs, ratios, *a, **kw)

    real_forward = MaskedAutoencoderViT.forward

    def forward(self, imgs, *a, **kw):
        result = real_forward(self, imgs, *a, **kw)
        forwards.append((imgs.detach().clone(), result.per_image_loss.detach().float().clone()))
        return result

    real_init, real_update = RatioBank.__init__, RatioBank.update

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        # Distinct starting ratios, so that a lookup for the wrong images shows from the first step.
        gen = torch.Generator().manual_seed(len(banks))
        order = torch.randperm(self.num_images, generator=gen)
        self._ratios = torch.linspace(self.r_min, self.r_max, self.num_images, dtype=torch.float64)[order]
        banks.append((self, self._ratios.clone()))

    def update(self, indices, losses):
        updates.append((torch.as_tensor(indices).clone(), torch.as_tensor(losses).clone()))
        return real_update(self, indices, losses)

    monkeypatch.setattr(common.TrainLoader, "epoch", epoch)
    monkeypatch.setattr(MaskingPolicy, "select", select)
    monkeypatch.setattr(MaskedAutoencoderViT, "forward", forward)
    monkeypatch.setattr(RatioBank, "__init__", init)
    monkeypatch.setattr(RatioBank, "update", update)

    cfg = PretrainConfig(data_dir=str(tiny_synthetic), out=str(tmp_path / "run"), img_size=32, patch_size=8,
                         depth=1, decoder_depth=1, batch_size=8, workers=0, progress=False, warmup_epochs=0,
                         mask_mode="abmg_mrus", epochs=2, abmg_warmup=0, max_steps=5, eta=0.5)
    pretrain(cfg)

    ((bank, start),) = banks
    assert len(updates) == len(batches) == len(selects) == 5
    replay = RatioBank(bank.num_images, r0=bank.r0, eta=bank.eta, r_min=bank.r_min, r_max=bank.r_max,
                       momentum=bank.momentum)
    replay._ratios = start.clone()
    # The policy's forward passes the teacher too; the reconstruction is the forward on the batch
    # images that returns the per-image loss of the step (the last one recorded before the update).
    for step, ((imgs, indices), (sel_imgs, ratios), (idx, losses)) in enumerate(zip(batches, selects, updates)):
        assert torch.equal(sel_imgs, imgs.to(sel_imgs.device))
        # (a) this batch's ratios, in batch order, from the bank after the earlier steps
        want = replay.ratios(indices)
        assert torch.equal(torch.as_tensor(ratios).cpu().float(), want), f"step {step}: wrong ratio lookup"
        # (b) each index paired with its own image's loss
        step_loss = [loss for x, loss in forwards if x.shape == imgs.shape and torch.equal(x.cpu(), imgs.cpu())]
        assert step_loss, f"step {step}: no forward on the batch images"
        per_image = step_loss[-1]
        assert torch.equal(idx.cpu().long(), indices.long()), f"step {step}: update got other indices"
        assert torch.equal(losses.cpu().float(), per_image.cpu()), f"step {step}: losses paired with other images"
        replay.update(indices, per_image)
        if step == 0:
            assert not torch.equal(replay.all_ratios, start)  # the updates do move ratios
    assert torch.equal(replay.all_ratios, bank.all_ratios)
