"""Pre-training end to end on a tiny synthetic set: every mask mode, exact resume, the
non-finite-loss guard, checkpoint contents, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from amgsn.cli import main
from amgsn.engine import pretrain as pretrain_mod
from amgsn.engine.checkpoint import load_checkpoint
from amgsn.engine.pretrain import PretrainConfig, pretrain

TINY = dict(img_size=32, patch_size=8, depth=2, decoder_depth=1, batch_size=8, workers=0, progress=False,
            warmup_epochs=1)


def _cfg(data, out, **kw) -> PretrainConfig:
    return PretrainConfig(data_dir=str(data), out=str(out), **{**TINY, **kw})


@pytest.mark.parametrize("mode,impl", [("random", "fused"), ("abmg", "fused"), ("abmg_mrus", "fused"),
                                       ("abmg_mrus", "reference")])
def test_every_mask_mode_runs(tiny_synthetic, tmp_path, mode, impl):
    out = tmp_path / "run"
    summary = pretrain(_cfg(tiny_synthetic, out, mask_mode=mode, impl=impl, epochs=2, abmg_warmup=1, max_steps=12))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[0]["abmg_active"] is False and records[1]["abmg_active"] is (mode != "random")
    assert sum(records[-1]["ratio_hist"]["counts"]) == 64
    if mode == "abmg_mrus":  # per-image ratios have moved away from r0
        assert records[-1]["ratio_max"] > records[-1]["ratio_min"]
    else:
        assert records[-1]["ratio_min"] == records[-1]["ratio_max"] == 0.75
    state = load_checkpoint(out / "checkpoint-last.pth", kind="pretrain")
    assert state["epoch"] == 1 and state["global_step"] == summary["step"] == 12
    assert {"model", "optimizer", "scaler", "ratio_bank", "rng", "policy"} <= set(state)
    for name in ("start.npz", "end.npz"):
        gallery = dict(**__import__("numpy").load(out / "mask_gallery" / name))
        assert gallery["images"].shape[1:] == (32, 32, 3)
        assert gallery["abmg_mask"].shape == gallery["random_mask"].shape == (len(gallery["labels"]), 16)
        assert (gallery["abmg_mask"].sum(1) == 12).all()  # floor(0.25 * 16) kept -> 12 masked


def test_resume_is_exact(tiny_synthetic, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    kw = dict(mask_mode="abmg_mrus", epochs=2, abmg_warmup=1, eta=0.2, seed=3)
    pretrain(_cfg(tiny_synthetic, full, **kw))
    pretrain(_cfg(tiny_synthetic, resumed, resume=str(full / "checkpoint-0.pth"), **kw))
    a = load_checkpoint(full / "checkpoint-last.pth")
    b = load_checkpoint(resumed / "checkpoint-last.pth")
    assert a["epoch"] == b["epoch"] == 1 and a["global_step"] == b["global_step"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["ratio_bank"]["ratios"], b["ratio_bank"]["ratios"])
    assert a["ratio_bank"]["loss_mean"] == b["ratio_bank"]["loss_mean"]
    # the resumed folder holds only the epoch it ran
    assert [json.loads(x)["epoch"] for x in (resumed / "log.jsonl").read_text().splitlines()] == [1]


def test_non_finite_losses_stop_the_run_and_keep_the_last_checkpoint(tiny_synthetic, tmp_path, monkeypatch):
    out = tmp_path / "run"
    pretrain(_cfg(tiny_synthetic, out, epochs=1, mask_mode="random"))
    before = (out / "checkpoint-last.pth").read_bytes()

    real = pretrain_mod._load_train_set

    class Poisoned(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            img, label, index = self.inner[i]
            return img * float("nan"), label, index

    monkeypatch.setattr(pretrain_mod, "_load_train_set", lambda cfg: Poisoned(real(cfg)))
    with pytest.raises(FloatingPointError, match="5 non-finite losses in a row"):
        pretrain(_cfg(tiny_synthetic, out, epochs=2, mask_mode="random", resume=str(out / "checkpoint-last.pth")))
    assert (out / "checkpoint-last.pth").read_bytes() == before


def test_resume_rejects_other_model_and_kind(tiny_synthetic, tmp_path):
    out = tmp_path / "run"
    pretrain(_cfg(tiny_synthetic, out, epochs=1, mask_mode="random", max_steps=2))
    with pytest.raises(ValueError, match="model"):
        pretrain(_cfg(tiny_synthetic, tmp_path / "b", epochs=2, depth=3, resume=str(out / "checkpoint-last.pth")))
    bad = tmp_path / "bad.pth"
    torch.save({"kind": "finetune", "model": {}}, bad)
    with pytest.raises(ValueError, match="'finetune' checkpoint"):
        pretrain(_cfg(tiny_synthetic, tmp_path / "c", epochs=2, resume=str(bad)))


def test_cli_pretrain_and_bad_args(tiny_synthetic, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["pretrain", "--data-dir", str(tiny_synthetic), "--out", str(out), "--img-size", "32",
                 "--patch-size", "8", "--depth", "1", "--decoder-depth", "1", "--epochs", "1", "--batch-size", "8",
                 "--workers", "0", "--max-steps", "2", "--mask-mode", "abmg", "--no-progress"])
    assert code == 0 and (out / "checkpoint-last.pth").exists()
    assert "pre-training done" in capsys.readouterr().out
    capsys.readouterr()
    assert main(["pretrain", "--data-dir", str(tiny_synthetic), "--out", str(out), "--epochs", "0"]) == 2
    assert "amgsn pretrain: error: --epochs must be >= 1, got 0" in capsys.readouterr().err
