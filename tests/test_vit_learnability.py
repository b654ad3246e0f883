"""benchmarks/vit_learnability.py: the generator variants, the variant-aware set cache, mimetic init
and one tiny training run end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import amgsn.data.synthetic as synthetic
from amgsn.data._face_model import sample_identity
from amgsn.models import ViTClassifier
from amgsn.models.pos_embed import sincos_2d

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "vit_learnability.py"
_spec = importlib.util.spec_from_file_location("vit_learnability", _PATH)
vl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vl)



@pytest.fixture(autouse=True)
def keep_thread_count():
    before = torch.get_num_threads()  # main() sets --threads for the process
    yield
    torch.set_num_threads(before)


_SMALL = ["--num-train", "42", "--num-test", "21", "--gen-size", "32", "--size", "32", "--depth", "1",
          "--batch-size", "8", "--threads", "1"]  # fmt: skip


def test_generator_variants_change_the_samplers_and_restore_them():
    rng = lambda: np.random.default_rng(5)  # noqa: E731
    before_n, before_e = synthetic.sample_nuisance, synthetic.sample_expression
    ident = sample_identity(np.random.default_rng(1), "x")
    with vl.generator_variant("no-nuisance"):
        nz = synthetic.sample_nuisance(rng())
        assert (nz.yaw, nz.pitch, nz.roll, nz.scale, nz.shift, nz.occluder) == (0.0, 0.0, 0.0, 1.0, (0.0, 0.0), "")
        assert nz.jpeg_quality == 0 and nz.blur == 0.0 and nz.noise == 0.0
    with vl.generator_variant("full-intensity"):
        ex = synthetic.sample_expression(rng(), "Surprise", ident)
        plain = before_e(rng(), "Surprise", ident)
        assert ex.intensity == 1.0 and plain.intensity < 1.0
        assert ex.aus["AU1"] == pytest.approx(min(1.0, plain.aus["AU1"] / plain.intensity))
        assert synthetic.sample_expression(rng(), "Neutral", ident).intensity == 0.0
    assert (synthetic.sample_nuisance, synthetic.sample_expression) == (before_n, before_e)
    with pytest.raises(ValueError, match="variant must be one of"):
        with vl.generator_variant("easy"):
            pass


def test_ensure_set_regenerates_when_the_variant_changes(tmp_path):
    root = tmp_path / "set"
    first = root / synthetic.IMAGE_DIR / "train_00001_aligned.jpg"
    vl.ensure_set(root, "as-is", 14, 7, 32)
    as_is = first.read_bytes()
    assert (root / "variant.txt").read_text() == "as-is\n"
    vl.ensure_set(root, "no-nuisance", 14, 7, 32)
    assert (root / "variant.txt").read_text() == "no-nuisance\n" and first.read_bytes() != as_is
    stamp = first.stat().st_mtime_ns
    vl.ensure_set(root, "no-nuisance", 14, 7, 32)  # same variant and sizes: reused
    assert first.stat().st_mtime_ns == stamp
    vl.ensure_set(root, "as-is", 14, 7, 32)
    assert first.read_bytes() == as_is  # same seed, same bytes


def test_mimetic_init_sets_the_attention_products():
    torch.manual_seed(0)
    model = ViTClassifier("vit_tiny", 3, img_size=16, patch_size=8, depth=1)
    attn = model.vit.blocks[0].attn
    D, H = attn.qkv.in_features, attn.num_heads
    d = D // H
    # alpha = 0: each head's W_q^T W_k is beta times a rank-d orthogonal projection.
    vl.mimetic_init_(model, torch.Generator().manual_seed(0), alpha=0.0, beta=0.7, alpha_v=0.0, beta_v=0.4)
    w = attn.qkv.weight.detach()
    for h in range(H):
        prod = w[h * d:(h + 1) * d].T @ w[D + h * d: D + (h + 1) * d]
        assert torch.allclose(prod, prod.T, atol=1e-5)
        assert torch.allclose(prod @ prod, 0.7 * prod, atol=1e-5)
        assert float(torch.trace(prod)) == pytest.approx(0.7 * d, rel=1e-4)
    # Value and output projection: full rank, so the product is exactly alpha_v Z - beta_v I = -0.4 I here.
    vo = w[2 * D:].T @ attn.proj.weight.detach().T
    assert torch.allclose(vo, -0.4 * torch.eye(D), atol=1e-5)
    vl.mimetic_init_(model, torch.Generator().manual_seed(0))  # the defaults: noise around the identity
    w = attn.qkv.weight.detach()
    vo = w[2 * D:].T @ attn.proj.weight.detach().T
    assert float(vo.diagonal().mean()) == pytest.approx(-0.4, abs=0.1)
    qk = sum(w[h * d:(h + 1) * d].T @ w[D + h * d: D + (h + 1) * d] for h in range(H))
    assert float(qk.diagonal().mean()) > 0.3


def test_model_options_take_effect():
    args = vl.parse_args(["--root", "unused", "--size", "16", "--depth", "1", "--pool", "max", "--sincos-pos"])
    model = vl.build_model(args, 3)
    pos = model.vit.pos_embed
    assert not pos.requires_grad
    assert torch.equal(pos.detach().reshape(-1, pos.shape[-1]), sincos_2d(pos.shape[-1], 2, cls_token=True))
    tokens = torch.randn(2, 5, pos.shape[-1])  # CLS + 4 patches
    pooled = model.vit.forward_head(tokens, pre_logits=True)
    assert torch.allclose(pooled, model.vit.fc_norm(tokens[:, 1:].amax(dim=1)))  # max over the patch tokens
    args = vl.parse_args(["--root", "unused", "--size", "16", "--depth", "1", "--pool", "token"])
    model = vl.build_model(args, 3)
    assert model.vit.global_pool == "token" and model.vit.pos_embed.requires_grad


def test_a_tiny_run_end_to_end(tmp_path, capsys):
    root = tmp_path / "set"
    records = vl.main(["--root", str(root), *_SMALL, "--epochs", "2", "--pool", "max", "--mimetic", "--sincos-pos",
                       "--classes", "Happiness,Surprise"])
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["test_mean_class_acc"] <= 1.0
        assert np.isfinite(r["train_loss"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines == records


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--classes", "Happiness,Nope"], "--classes must name two or more"),
     (["--classes", "Happiness"], "--classes must name two or more"),
     (["--patch-size", "5"], "must be a multiple of --patch-size")],
)
def test_bad_arguments_stop_before_any_data_is_written(tmp_path, capsys, extra, message):
    root = tmp_path / "set"
    with pytest.raises(SystemExit):
        vl.main(["--root", str(root), *_SMALL, *extra])
    assert message in capsys.readouterr().err
    assert not root.exists()
