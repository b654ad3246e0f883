"""``--init SPEC`` (amgsn.models.pretrained) into pre-training and fine-tuning, offline.

A fake Hugging Face cache (``HF_HOME/hub/models--timm--<name>/snapshots/<commit>/model.safetensors`` +
``refs/main``) holds the weights of a small timm ViT made here; ``timm:<name>`` loads them through timm
with ``HF_HUB_OFFLINE=1``, at another image and patch size than the file's: the resampled tensors must
equal timm's resample functions' output and every other tensor the file's. An MAE-format file (a timm
ViT's weights under MAE's names, with and without decoder) starts the MAE; irreconcilable shapes are
one-line errors (CLI exit 2); a head of another class count is ignored with a note.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from amgsn.cli import main
from amgsn.engine.finetune import FinetuneConfig, build_model
from amgsn.engine.pretrain import PretrainConfig, _build_model
from amgsn.models import MaskedAutoencoderViT, read_init, sincos_2d

NAME = "vit_tiny_patch16_224.augreg_in21k"  # a real timm pretrained tag: timm's registry resolves it
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILE_IMG, FILE_PATCH, FILE_DEPTH, FILE_CLASSES = 32, 8, 2, 5
IMG, PATCH = 48, 4  # the models' sizes: another grid (4x4 -> 12x12) and another patch size (8 -> 4)
REPO = Path(__file__).resolve().parents[1]


def small_vit(model: str = "vit_tiny_patch16_224", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {"depth": FILE_DEPTH, "img_size": FILE_IMG, "patch_size": FILE_PATCH, "num_classes": FILE_CLASSES, **kw}
    return timm.create_model(model, **kw)


def file_state(**kw) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone().contiguous() for k, v in small_vit(**kw).state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for value in sd.values():  # LayerNorms at (1, 0) and zero biases would compare equal to a fresh init
        value.add_(torch.randn(value.shape, generator=gen) * 0.01)
    return sd


def write_hf_cache(home: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    repo = home / "hub" / f"models--timm--{name}"
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    save_file(state, str(repo / "snapshots" / COMMIT / "model.safetensors"))
    return repo


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    home = tmp_path_factory.mktemp("hf")
    state = file_state()
    write_hf_cache(home, NAME, state)
    return home, state


@pytest.fixture
def offline(hf_home, monkeypatch):
    """HF_HOME / HF_HUB_OFFLINE for this process. huggingface_hub reads them into its constants at import,
    so those are set too (the subprocess test below goes through the real environment variables)."""
    from huggingface_hub import constants

    home, state = hf_home
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return state


def _assert_rest_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], skip: set[str]) -> None:
    for key, value in want.items():
        if key not in skip and key in got:
            assert torch.equal(got[key], value), key


def test_timm_spec_from_the_offline_cache_into_pretraining(offline, tmp_path, capsys):
    cfg = PretrainConfig(data_dir="unused", out=str(tmp_path), init=f"timm:{NAME}", img_size=IMG, patch_size=PATCH,
                         decoder_depth=1)
    model, resolved = _build_model(cfg)
    # width and depth from the weights, image and patch size as asked
    assert (resolved.model, resolved.depth, resolved.img_size, resolved.patch_size) == ("vit_tiny", 2, IMG, PATCH)
    sd = model.state_dict()
    assert torch.equal(sd["patch_embed.proj.weight"], resample_patch_embed(offline["patch_embed.proj.weight"],
                                                                           [PATCH, PATCH]))
    # the MAE's position tables are fixed sin-cos: recomputed for the 12x12 grid, the file's learned one ignored
    assert torch.equal(sd["pos_embed"][0], sincos_2d(192, IMG // PATCH, cls_token=True))
    _assert_rest_equal(sd, offline, skip={"patch_embed.proj.weight", "pos_embed"})
    assert sum(k.startswith("blocks.") for k in sd) == sum(k.startswith("blocks.") for k in offline)
    report = model.init_report
    assert set(report.resampled) == {"patch_embed.proj.weight"}
    assert set(report.ignored) == {"pos_embed", "head.weight", "head.bias"}
    assert {k.split(".")[0] for k in report.kept_init} == {"decoder_embed", "mask_token", "decoder_blocks",
                                                           "decoder_norm", "decoder_pred"}
    assert len(report.loaded) == len(offline) - 3  # all but pos_embed and the head
    line = capsys.readouterr().out.strip()
    assert line == report.summary() and "\n" not in line
    assert line.startswith(f"--init timm:{NAME} (timm weights) -> vit_tiny MAE (48 px, 4-px patches, 2 + 1 blocks): "
                           f"{len(offline) - 3} tensors loaded; resampled patch_embed.proj.weight (8 -> 4 px patches)")
    assert "head (the MAE has no classifier head)" in line and "decoder_blocks.0" in line


def test_timm_spec_from_the_offline_cache_into_finetuning(offline, tmp_path, capsys):
    cfg = FinetuneConfig(data_dir="unused", out=str(tmp_path), init=f"timm:{NAME}", img_size=IMG, patch_size=PATCH)
    model = build_model(cfg, num_classes=7)
    assert (model.model_name, model.depth, model.img_size, model.patch_size) == ("vit_tiny", 2, IMG, PATCH)
    sd = model.vit.state_dict()
    grid = IMG // PATCH
    assert torch.equal(sd["pos_embed"], resample_abs_pos_embed(offline["pos_embed"], [grid, grid], [4, 4],
                                                               num_prefix_tokens=1))
    assert torch.equal(sd["patch_embed.proj.weight"], resample_patch_embed(offline["patch_embed.proj.weight"],
                                                                           [PATCH, PATCH]))
    # average pooling: the file's final norm lands in fc_norm
    assert torch.equal(sd["fc_norm.weight"], offline["norm.weight"])
    _assert_rest_equal(sd, offline, skip={"pos_embed", "patch_embed.proj.weight", "head.weight", "head.bias"})
    # a head of another class count: ignored with a note, the head starts at MAE's fine-tuning init
    assert model.vit.head.weight.shape == (7, 192) and float(model.vit.head.weight.detach().std()) < 1e-4
    assert torch.count_nonzero(model.vit.head.bias) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "pos_embed (4x4 -> 12x12 grid)" in line and "patch_embed.proj.weight (8 -> 4 px" in line
    assert "ignored: head (5 classes in the file, 7 here: re-initialised)" in line


def test_timm_spec_through_the_cli_with_the_real_environment(hf_home, tiny_synthetic, tmp_path):
    """`amgsn pretrain --init timm:<name>` in a fresh process: HF_HOME and HF_HUB_OFFLINE=1 from the
    environment."""
    home, _ = hf_home
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "pre"
    cmd = [sys.executable, "-m", "amgsn", "pretrain", "--init", f"timm:{NAME}", "--data-dir", str(tiny_synthetic),
           "--out", str(out), "--depth", "1", "--decoder-depth", "1", "--epochs", "1", "--max-steps", "1",
           "--batch-size", "8", "--workers", "0", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # the file's size (32 px / 8-px patches) since none was given; --depth 1 keeps the first block
    assert f"--init timm:{NAME} (timm weights) -> vit_tiny MAE (32 px, 8-px patches, 1 + 1 blocks)" in proc.stdout
    assert "blocks.1 (the MAE has 1 block)" in proc.stdout
    # the same name absent from the cache: one line naming the offline mode, exit 2
    missing = [a.replace(NAME, "vit_small_patch16_224.augreg_in21k") for a in cmd]
    proc = subprocess.run(missing, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "\n" not in err and "HF_HUB_OFFLINE=1" in err and "vit_small_patch16_224.augreg_in21k" in err, err


def test_finetune_cli_with_a_timm_spec(offline, tiny_synthetic, tmp_path, capsys):
    out = tmp_path / "ft"
    code = main(["finetune", "--init", f"timm:{NAME}", "--data-dir", str(tiny_synthetic), "--out", str(out),
                 "--patch-size", "4", "--epochs", "1", "--max-steps", "1", "--batch-size", "8", "--workers", "0",
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"--init timm:{NAME} (timm weights) -> vit_tiny classifier (32 px, 4-px patches, 2 blocks)" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["init"] == f"timm:{NAME}" and config["model_config"]["patch_size"] == 4


@pytest.mark.parametrize("with_decoder", [False, True])
def test_mae_format_file_into_pretraining(tmp_path, with_decoder):
    enc = file_state(num_classes=0, global_pool="token")
    enc["pos_embed"] = sincos_2d(192, FILE_IMG // FILE_PATCH, cls_token=True)[None]  # MAE's fixed table
    state = dict(enc)
    if with_decoder:
        torch.manual_seed(3)
        mae = MaskedAutoencoderViT("vit_tiny", img_size=FILE_IMG, patch_size=FILE_PATCH, depth=FILE_DEPTH,
                                   decoder_depth=1)
        dec = {k: v + 0.01 for k, v in mae.state_dict().items() if k.startswith(("decoder_", "mask_token"))}
        dec["decoder_pos_embed"] = mae.decoder_pos_embed.clone()
        state.update(dec)
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": state}, path)  # MAE's own layout: {"model": state_dict}
    model, resolved = _build_model(PretrainConfig(data_dir="unused", out=str(tmp_path), init=str(path), img_size=IMG))
    assert resolved.patch_size == FILE_PATCH and resolved.decoder_depth == (1 if with_decoder else 4)
    sd = model.state_dict()
    # the encoder starts equal to the file; the sin-cos tables are recomputed for the 6x6 grid
    _assert_rest_equal(sd, enc, skip={"pos_embed"})
    assert torch.equal(sd["pos_embed"][0], sincos_2d(192, IMG // FILE_PATCH, cls_token=True))
    report = model.init_report
    assert report.kind == "MAE checkpoint" and not report.resampled and not report.ignored
    assert "pos_embed" in report.recomputed
    if with_decoder:  # loaded, every tensor (the decoder's position table recomputed as well)
        _assert_rest_equal(sd, dec, skip={"decoder_pos_embed"})
        assert "decoder_pos_embed" in report.recomputed and not report.kept_init
        assert len(report.loaded) == len(state) - 2
    else:
        assert {k.split(".")[0] for k in report.kept_init} == {"decoder_embed", "mask_token", "decoder_blocks",
                                                               "decoder_norm", "decoder_pred"}
        assert "kept their init: mask_token, decoder_embed, decoder_blocks.0-3" in report.summary()


def test_amgsn_checkpoint_into_finetuning_recomputes_sincos_and_fits_depth(tmp_path):
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT("vit_tiny", img_size=FILE_IMG, patch_size=FILE_PATCH, depth=2, decoder_depth=1)
    state = {"kind": "pretrain", "model": mae.state_dict(), "model_config": mae.config, "args": {}}
    cfg = FinetuneConfig(data_dir="unused", out=str(tmp_path), init="unused", img_size=IMG, depth=3)
    init = read_init(state)
    from amgsn.models import ViTClassifier

    clf = ViTClassifier.from_init(init, 7, img_size=cfg.img_size, depth=cfg.depth)
    sd = clf.vit.state_dict()
    assert torch.equal(sd["pos_embed"][0], sincos_2d(192, IMG // FILE_PATCH, cls_token=True))
    for key, value in mae.state_dict().items():
        if key.startswith("blocks."):
            assert torch.equal(sd[key], value), key
    report = clf.init_report
    assert {k.split(".")[1] for k in report.kept_init if k.startswith("blocks.")} == {"2"}
    assert "blocks.2 (not in the file)" in report.summary()
    assert "decoder_blocks.0" in report.summary() and "the classifier has no decoder" in report.summary()


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_irreconcilable_shapes_are_one_line_errors_with_exit_2(tiny_synthetic, tmp_path, capsys):
    small = tmp_path / "vit_small.safetensors"
    save_file(file_state(model="vit_small_patch16_224", depth=1), str(small))
    common = ["--data-dir", str(tiny_synthetic), "--out", str(tmp_path / "run"), "--workers", "0", "--no-progress"]
    for stage in ("pretrain", "finetune"):
        code, err = _run([stage, "--init", str(small), "--model", "vit_tiny", *common], capsys)
        assert code == 2 and "\n" not in err, err
        assert "(1, 1, 384)" in err and "(1, 1, 192)" in err and str(small) in err and "vit_small" in err
    # a ViT variant with parts amgsn does not build (layer scale): refused, not silently dropped
    odd = file_state()
    odd["blocks.0.ls1.gamma"] = torch.ones(192)
    save_file(odd, str(tmp_path / "odd.safetensors"))
    code, err = _run(["pretrain", "--init", str(tmp_path / "odd.safetensors"), *common], capsys)
    assert code == 2 and "\n" not in err and "no place for blocks.0" in err, err
    # another in_chans: both shapes named
    save_file(file_state(in_chans=1), str(tmp_path / "gray.safetensors"))
    code, err = _run(["finetune", "--init", str(tmp_path / "gray.safetensors"), *common], capsys)
    assert code == 2 and "patch_embed.proj.weight is (192, 1, 8, 8)" in err and "(192, 3, 8, 8)" in err, err
    # not a ViT, a missing file, an unknown timm name
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "cnn.pth")
    for spec, expected in ((str(tmp_path / "cnn.pth"), "has no 'cls_token'"),
                           (str(tmp_path / "missing.pth"), "not found"),
                           ("timm:no_such_model.tag", "timm has no pretrained weights named 'no_such_model.tag'")):
        code, err = _run(["pretrain", "--init", spec, *common], capsys)
        assert code == 2 and expected in err and "\n" not in err, err


def test_pretrain_init_refuses_an_unsafe_file(tmp_path, tiny_synthetic, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 192)}, "x": Evil()}, path)
    code, err = _run(["pretrain", "--init", str(path), "--data-dir", str(tiny_synthetic), "--out",
                      str(tmp_path / "run"), "--workers", "0", "--no-progress"], capsys)
    assert code == 2 and "not a safe" in err and not (tmp_path / "ran").exists()


def test_demo_passes_init_to_pretraining_and_on_to_finetuning(tmp_path, monkeypatch):
    import amgsn.data.synthetic as synthetic
    import amgsn.engine.finetune as ft
    import amgsn.engine.pretrain as pre

    seen = {}

    class Stop(Exception):
        pass

    def fake_pretrain(cfg):
        seen["pretrain"] = cfg
        return {"checkpoint": "PRE.pth"}

    def fake_finetune(cfg):
        seen["finetune"] = cfg
        raise Stop

    monkeypatch.setattr(synthetic, "ensure_synthetic", lambda *a, **k: tmp_path)
    monkeypatch.setattr(pre, "pretrain", fake_pretrain)
    monkeypatch.setattr(ft, "finetune", fake_finetune)
    from amgsn.engine.demo import DemoConfig, demo

    for init in (f"timm:{NAME}", None):
        with pytest.raises(Stop):
            demo(DemoConfig(out=str(tmp_path / "demo"), quick=True, init=init, progress=False))
        p = seen["pretrain"]
        assert p.init == init and p.model == (None if init else "vit_tiny")  # default demo: as before
        assert (p.img_size, p.patch_size, p.depth) == (32, 8, 2)
        assert seen["finetune"].init == "PRE.pth"
