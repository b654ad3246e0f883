"""Compiled training (``--compile``, issue 24, docs/method.md §9.3) on the CPU.

Inductor's C++ backend: 10 compiled pre-training steps give the eager losses (1e-4 relative), masks and
ratios; SIGTERM + ``--resume`` with ``--compile`` ends bit-identical to an uninterrupted compiled run
(real subprocesses, a real signal); torchrun (gloo, 2 processes) runs compiled. Those share one
Inductor cache (the first test pays the C++ build). The tests of what Dynamo does — how many graphs a
whole MRUS run compiles per region with dynamic or bucketed shapes, the bench-step and fine-tuning
plumbing — run the same graphs with eager kernels (``AMGSN_COMPILE_BACKEND=aot_eager``). The bucket
padding itself is checked eagerly: padded rows change nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amgsn.cli import main
from amgsn.engine import compile as comp
from amgsn.engine.checkpoint import load_checkpoint
from amgsn.engine.pretrain import PretrainConfig, pretrain
from amgsn.masking import MaskingPolicy
from amgsn.models import MaskedAutoencoderViT, ViTClassifier
from amgsn.models.regions import EAGER, Regions

HERE = Path(__file__).parent
RUN = dict(img_size=32, patch_size=8, depth=2, decoder_depth=1, batch_size=8, epochs=2, abmg_warmup=1,
           warmup_epochs=1, eta=0.2, seed=3, max_steps=10, workers=0, progress=False)
RUN_ARGS = ["--img-size", "32", "--patch-size", "8", "--depth", "2", "--decoder-depth", "1", "--batch-size", "8",
            "--epochs", "2", "--abmg-warmup", "1", "--warmup-epochs", "1", "--eta", "0.2", "--seed", "3",
            "--max-steps", "10", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    """One Inductor cache for the module's compiled runs (in this process and in its subprocesses)."""
    return str(tmp_path_factory.mktemp("inductor"))


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setenv(comp.BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()  # counts start from nothing compiled
    yield
    torch._dynamo.reset()


def _env(cache: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent), "TORCHINDUCTOR_CACHE_DIR": cache}
    for key in ("SIGNAL_AT_STEP", comp.BACKEND_ENV):
        env.pop(key, None)
    return env


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _recorded_run(data: Path, out: Path, **kw) -> dict:
    """pretrain() with every step's loss and mask recorded, on one thread: the same kernels as the
    subprocesses below (OMP_NUM_THREADS=1; Inductor writes the thread count into its C++ code)."""
    from amgsn.engine.common import NonFiniteGuard

    seen: dict[str, list] = {"loss": [], "mask": [], "visible": []}
    real_check, real_select = NonFiniteGuard.check, MaskingPolicy.select

    def check(self, loss, *a, **k):
        seen["loss"].append(float(loss))
        return real_check(self, loss, *a, **k)

    def select(self, *a, **k):
        batch = real_select(self, *a, **k)
        seen["mask"].append(batch.selection.mask.clone())
        seen["visible"].append(batch.visible.shape[0])
        return batch

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(NonFiniteGuard, "check", check)
        m.setattr(MaskingPolicy, "select", select)
        torch.set_num_threads(1)
        try:
            summary = pretrain(PretrainConfig(data_dir=str(data), out=str(out), **{**RUN, **kw}))
        finally:
            torch.set_num_threads(threads)
    return {**seen, "summary": summary, "out": out}


@pytest.fixture(scope="module")
def compiled_run(tiny_synthetic, tmp_path_factory, inductor_cache) -> dict:
    """The 10-step run with --compile (Inductor, this module's cache: it pays the C++ build)."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
        m.delenv(comp.BACKEND_ENV, raising=False)
        torch._dynamo.reset()
        return _recorded_run(tiny_synthetic, tmp_path_factory.mktemp("compiled") / "run", compile=True)


def test_ten_compiled_steps_give_the_eager_losses_masks_and_ratios(tiny_synthetic, tmp_path, compiled_run):
    eager = _recorded_run(tiny_synthetic, tmp_path / "eager")
    compiled = compiled_run
    assert len(eager["loss"]) == len(compiled["loss"]) == 10
    assert eager["visible"] == compiled["visible"] and len(set(eager["visible"])) > 1  # T changed step to step
    for step, (a, b) in enumerate(zip(eager["mask"], compiled["mask"])):
        assert torch.equal(a, b), f"step {step}: masks differ"
    losses_e, losses_c = torch.tensor(eager["loss"]), torch.tensor(compiled["loss"])
    torch.testing.assert_close(losses_c, losses_e, rtol=1e-4, atol=0)
    assert not torch.equal(losses_c, losses_e)  # the compiled kernels did run (not the eager ones)
    torch.testing.assert_close(compiled["summary"]["ratio_bank"], eager["summary"]["ratio_bank"], rtol=0,
                               atol=1e-6)
    # log.jsonl: each region compiled once over a run whose T changed every step; epoch 1's teacher too
    records = _records(compiled["out"])
    assert records[-1]["compiles"] == {"decoder.block": 1, "decoder.embed": 1, "decoder.loss": 1,
                                       "encoder.attn_in": 1, "encoder.attn_out": 1, "teacher.block": 1}
    assert records[-1]["recompiles"] == 0 and records[-1]["compile_s"] > 0
    assert "compiles" not in _records(tmp_path / "eager")[-1]
    # The checkpoint is an eager one: same keys (no _orig_mod.), loads strictly into an eager model.
    a = load_checkpoint(tmp_path / "eager" / "checkpoint-last.pth", kind="pretrain")
    b = load_checkpoint(compiled["out"] / "checkpoint-last.pth", kind="pretrain")
    assert list(a["model"]) == list(b["model"])
    MaskedAutoencoderViT(**b["model_config"]).load_state_dict(b["model"], strict=True)


def _cli(args: list[str], cache: str, signal_at: int | None = None, nproc: int = 1) -> subprocess.CompletedProcess:
    env = _env(cache)
    if signal_at is not None:
        env.update(SIGNAL_AT_STEP=str(signal_at), SIGNAL_NAME="SIGTERM")
    launcher = [sys.executable]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
    return subprocess.run([*launcher, str(HERE / "signal_at_step.py"), *args], env=env, capture_output=True,
                          text=True, timeout=400)


def test_sigterm_then_resume_with_compile_is_bit_exact(tiny_synthetic, tmp_path, inductor_cache, compiled_run):
    """The uninterrupted run is the module's (in this process); the stopped and resumed ones are
    subprocesses, each compiling anew (from the module's Inductor cache)."""
    args = ["pretrain", "--data-dir", str(tiny_synthetic), *RUN_ARGS, "--compile"]
    straight, stopped = compiled_run["out"], tmp_path / "stopped"
    cut = _cli([*args, "--out", str(stopped)], inductor_cache, signal_at=5)
    assert cut.returncode == 128 + signal.SIGTERM, cut.stderr[-3000:]
    assert "SIGTERM received, stopped after step 6 (epoch 0, batch 6 of 8)" in cut.stderr
    resumed = _cli([*args, "--out", str(stopped), "--resume", str(stopped / "checkpoint-last.pth")], inductor_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_checkpoint(straight / "checkpoint-last.pth", kind="pretrain")
    b = load_checkpoint(stopped / "checkpoint-last.pth", kind="pretrain")
    assert a["global_step"] == b["global_step"] == 10
    for part in ("model", "ratio_bank"):
        for key, value in a[part].items():
            assert (torch.equal(value, b[part][key]) if torch.is_tensor(value) else value == b[part][key]), key
    for key, value in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][key][n]) for n, v in value.items()), key
    losses = [[(r["epoch"], r["loss"], r["ratio_mean"]) for r in _records(run)] for run in (straight, stopped)]
    assert losses[0] == losses[1]
    assert _records(stopped)[-1]["compiles"]["encoder.attn_in"] == 1  # the resumed process compiled anew


@pytest.mark.dist
def test_torchrun_with_compile(tiny_synthetic, tmp_path, inductor_cache):
    out = tmp_path / "run"
    args = [a if a != "10" else "3" for a in RUN_ARGS]  # --max-steps 3 (2 ranks x 8 images: 4 steps an epoch)
    done = _cli(["pretrain", "--data-dir", str(tiny_synthetic), "--out", str(out), *args, "--compile"],
                inductor_cache, nproc=2)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = _records(out)[-1]
    assert record["step"] == 3 and record["recompiles"] == 0 and record["compiles"]["encoder.attn_out"] == 1
    state = load_checkpoint(out / "checkpoint-last.pth", kind="pretrain")
    MaskedAutoencoderViT(**state["model_config"]).load_state_dict(state["model"], strict=True)


# ------------------------------------------------------------------------------------- shapes


def test_bucket_sizes_cover_the_ratio_range_with_three_sizes():
    assert comp.bucket_sizes(64, 196, (0.5, 0.9)) == (2976, 4656, 6336)  # rows = 64 x (1 + kept)
    assert comp.bucket_sizes(64, 196, (0.75, 0.75)) == (64 * 50,)
    regions = comp.CompiledRegions(shapes="bucket", buckets=comp.bucket_sizes(8, 16, (0.5, 0.9)))
    seen = set()
    for kept in range(8 * 1, 8 * 8 + 1):  # every total a batch of 8 can keep at ratios 0.5..0.9
        padded = regions.padded_rows(kept + 8)
        assert padded >= kept + 8 and padded % comp.ROW_ALIGN == 0
        seen.add(padded)
    assert len(seen) == 3
    assert regions.padded_rows(1000) % regions.buckets[-1] == 0  # beyond the range: whole top buckets
    assert comp.CompiledRegions().padded_rows(37) == 37  # dynamic: no padding


class _Padding(Regions):
    """Eager regions that pad the packed encoder by ``extra`` rows (several padding sequences)."""

    def __init__(self, extra: int) -> None:
        self.extra = extra

    def padded_rows(self, rows: int) -> int:
        return rows + self.extra


@pytest.mark.parametrize("drop_path", [0.0, 0.5])
def test_padding_rows_change_nothing(seed, drop_path):
    imgs = torch.randn(5, 3, 32, 32)
    ratios = torch.tensor([0.5, 0.9, 0.75, 0.6, 0.8], dtype=torch.float64)
    model = MaskedAutoencoderViT("vit_tiny", img_size=32, patch_size=8, depth=2, decoder_depth=1,
                                 drop_path_rate=drop_path)
    outs = []
    for regions in (EAGER, _Padding(23)):  # 23 rows > the longest sequence (9): three padding sequences
        model.regions = regions
        model.zero_grad()
        torch.manual_seed(seed)
        out = model(imgs, ratios)
        out.loss.backward()
        outs.append((out, [p.grad.clone() for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = outs
    assert torch.equal(a.selection.mask, b.selection.mask)
    torch.testing.assert_close(b.per_image_loss, a.per_image_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.pred, a.pred, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shapes", ["dynamic", "bucket"])
def test_a_whole_mrus_run_compiles_each_region_at_most_three_times(aot_eager, shapes):
    torch.manual_seed(0)
    B = 8
    model = MaskedAutoencoderViT("vit_tiny", img_size=32, patch_size=8, depth=2, decoder_depth=1)
    regions = comp.compile_mae(model, shapes=shapes, batch_size=B, ratio_range=(0.5, 0.9))
    policy = MaskingPolicy("abmg_mrus", epochs=2, warmup_epochs=1)
    before = comp.compile_stats()
    rows, gen = set(), torch.Generator().manual_seed(1)
    # Ratios from all over the MRUS range (random warm-up epoch, then ABMG), the extremes included.
    draws = [torch.full((B,), 0.5), torch.full((B,), 0.9)]
    draws += [torch.rand(B, generator=gen, dtype=torch.float64) * 0.4 + 0.5 for _ in range(8)]
    for step, ratios in enumerate(draws):
        batch = policy.select(model, torch.randn(B, 3, 32, 32), ratios, epoch=step % 2)
        out = model(torch.randn(B, 3, 32, 32), masked=(batch.visible, batch.selection))
        out.loss.backward()
        rows.add(batch.visible.shape[0] + B)
    assert len(rows) >= 6  # T changed through the run
    compiles = comp.stats_since(before)["compiles"]
    expected = 1 if shapes == "dynamic" else len({regions.padded_rows(n) for n in rows})
    assert expected <= 3
    assert compiles["encoder.attn_in"] == compiles["encoder.attn_out"] == expected
    assert all(compiles[r] == 1 for r in ("teacher.block", "decoder.embed", "decoder.block", "decoder.loss"))
    # the teacher at other batch sizes (a bank's refresh, the gallery): the same graph
    with torch.no_grad():
        model.eval().teacher_qk(torch.randn(3, 3, 32, 32))
        model.teacher_qk(torch.randn(5, 3, 32, 32))
    assert comp.stats_since(before)["compiles"]["teacher.block"] == 1


# ------------------------------------------------------------------------------------- plumbing


def test_bench_step_compiled_twins_report_their_compiles(aot_eager):
    from amgsn.engine.bench_step import bench_step

    result = bench_step(model="vit_tiny", img_size=32, patch_size=8, batch_size=4, depth=2, steps=2, warmup=1,
                        device="cpu", variants=("fused", "fused_bank"), compile=True)
    assert result["config"]["compile_shapes"] == "dynamic"
    first, second = result["fused_compiled"], result["fused_bank_compiled"]
    assert first["compiles"] == {"decoder.block": 1, "decoder.embed": 1, "decoder.loss": 1, "encoder.attn_in": 1,
                                 "encoder.attn_out": 1, "teacher.block": 1}
    assert first["recompiles"] == 0 and first["compile_s"] > 0
    # fused_bank runs the same graphs (its teacher on 2 of 4 images: the dynamic batch): nothing new
    assert second["compiles"] == {} and second["compile_s"] == 0
    assert "compiles" not in result["fused"]
    assert result["fused_compiled_speedup"] == round(result["fused"]["median_ms"] / first["median_ms"], 3)
    assert "fused_bank_over_mae_random_compiled" not in result  # only between variants that ran


def test_compile_options_name_the_flag(tiny_synthetic, tmp_path, capsys):
    base = dict(data_dir="d", out="o")
    with pytest.raises(ValueError, match=r"--compile-mode must be one of .*got 'fastest'"):
        PretrainConfig(**base, compile=True, compile_mode="fastest").validate()
    with pytest.raises(ValueError, match=r"--compile-shapes must be one of \('dynamic', 'bucket'\), got 'padded'"):
        PretrainConfig(**base, compile=True, compile_shapes="padded").validate()
    with pytest.raises(ValueError, match="need --compile"):
        PretrainConfig(**base, compile_mode="max-autotune").validate()
    code = main(["finetune", "--data-dir", str(tiny_synthetic), "--out", str(tmp_path), "--compile",
                 "--compile-mode", "turbo"])
    assert code == 2 and "amgsn finetune: error: --compile-mode must be one of" in capsys.readouterr().err
    assert main(["bench-step", "--compile-shapes", "ragged", "--device", "cpu"]) == 2
    assert "amgsn bench-step: error: --compile-shapes must be one of" in capsys.readouterr().err


def test_compiled_classifier_is_timms_forward_block_by_block(aot_eager, tiny_synthetic, tmp_path):
    torch.manual_seed(0)
    # token pooling: the final norm is timm's `norm` (average pooling moves it to `fc_norm`, after the blocks)
    eager = ViTClassifier("vit_tiny", 7, img_size=32, patch_size=8, depth=2, drop_path_rate=0.0, global_pool="token")
    compiled = ViTClassifier("vit_tiny", 7, img_size=32, patch_size=8, depth=2, drop_path_rate=0.0,
                             global_pool="token")
    compiled.load_state_dict(eager.state_dict())
    comp.compile_classifier(compiled)
    x = torch.randn(6, 3, 32, 32)
    for train in (True, False):
        eager.train(train), compiled.train(train)
        for a, b in zip(eager.forward_features_and_logits(x), compiled.forward_features_and_logits(x)):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    # finetune --compile: the classifier's blocks compiled, an eager checkpoint
    from amgsn.engine.finetune import FinetuneConfig, finetune

    out = tmp_path / "ft"
    finetune(FinetuneConfig(data_dir=str(tiny_synthetic), out=str(out), img_size=32, patch_size=8, depth=2,
                            batch_size=16, epochs=1, max_steps=2, workers=0, progress=False, device="cpu",
                            compile=True))
    record = _records(out)[-1]
    assert 1 <= record["compiles"]["classifier.block"] <= 3
    state = load_checkpoint(out / "checkpoint-last.pth", kind="finetune")
    assert list(state["model"]) == list(ViTClassifier("vit_tiny", 7, img_size=32, patch_size=8, depth=2).state_dict())
