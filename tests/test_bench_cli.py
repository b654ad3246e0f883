"""`amgsn bench` (what `make bench` runs) and `amgsn bench-step` produce their table / JSON.
Timings are not asserted here (speed goals live in benchmarks/, DEVELOPERS rules)."""

from __future__ import annotations

import json

import pytest
import torch

from amgsn.benchmarking import all_cases
from amgsn.cli import main
from amgsn.engine.bench_step import DEFAULT_REFRESH


def test_bench_cpu_table_and_json(tmp_path, capsys, monkeypatch):
    from amgsn import benchmarking

    # The step row at toy size (the real one is ViT-Tiny at 112 px, batch 64: seconds per step).
    monkeypatch.setitem(benchmarking.STEP_CONFIGS, "cpu",
                        {"model": "vit_tiny", "img_size": 32, "patch_size": 8, "batch_size": 4, "depth": 1})
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--rounds", "1", "--step-steps", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    cpu_cases = [c for c in all_cases() if "cpu" in c.devices]
    assert len(result["rows"]) == len(cpu_cases) + 2 >= 6
    for row, case in zip(result["rows"], cpu_cases):
        assert row["op"] == case.op and row["ours_ms"] > 0 and row["reference_ms"] > 0
        assert case.op in table
    for row in result["rows"]:
        assert abs(row["ratio"] - row["reference_ms"] / row["ours_ms"]) < 0.01 * row["ratio"] + 0.01
    step_row, bank_row = result["rows"][-2:]
    assert step_row["op"].startswith("pretrain step") and "depth 1 32px/8 B=4" in step_row["shape"]
    assert step_row["ours_ms"] == result["step"]["fused"]["median_ms"]
    assert step_row["reference_ms"] == result["step"]["reference"]["median_ms"]
    assert bank_row["op"] == f"pretrain step + saliency bank P={DEFAULT_REFRESH:g}"
    assert bank_row["shape"] == step_row["shape"]
    assert bank_row["ours_ms"] == result["step"]["fused_bank"]["median_ms"] and bank_row["target"] == 1.5
    assert "pretrain step" in table
    assert table.splitlines()[1].split()[:5] == ["op", "shape", "ours_ms", "reference_ms", "ratio"]


def test_bench_without_step_row(capsys):
    assert main(["bench", "--device", "cpu", "--rounds", "1", "--step-steps", "0"]) == 0
    table = capsys.readouterr().out
    assert "pretrain step" not in table and "center_loss" in table
    assert main(["bench", "--device", "cpu", "--step-steps", "-1"]) == 2
    assert "--step-steps must be >= 0" in capsys.readouterr().err


def test_bench_step_json(capsys):
    assert main(["bench-step", "--model", "vit_tiny", "--img-size", "32", "--patch-size", "8", "--batch-size", "4",
                 "--depth", "1", "--steps", "1", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for name in ("fused", "fused_bank", "reference", "mae_random"):
        assert result[name]["median_ms"] > 0 and result[name]["images_per_s"] > 0
    assert result["fused_speedup_vs_reference"] > 0
    assert result["fused_bank"]["saliency_refresh"] == DEFAULT_REFRESH and result["reference_over_fused_bank"] > 0
    # fused_bank alone, with its own P; the teacher's FLOPs count only the refreshed images.
    assert main(["bench-step", "--img-size", "32", "--batch-size", "4", "--depth", "1", "--steps", "1", "--device",
                 "cpu", "--json", "--variants", "fused_bank", "--saliency-refresh", "0.5"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert set(alone) & {"fused", "reference", "mae_random"} == set()
    assert alone["fused_bank"]["saliency_refresh"] == 0.5
    assert main(["bench-step", "--device", "cpu", "--saliency-refresh", "0"]) == 2
    assert main(["bench-step", "--device", "cpu", "--variants", "fast"]) == 2
    assert main(["bench-step", "--steps", "0", "--device", "cpu"]) == 2
    assert main(["bench-step", "--ratio-range", "0.9", "0.5", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--steps must be an int >= 1, got 0" in err and "--ratio-range must satisfy" in err
    assert "--saliency-refresh must lie in (0, 1]" in err and "--variants must be some of" in err


def test_bench_step_variants_take_turns(monkeypatch):
    """Round-robin: step i of every variant runs before step i+1 of any, and only the steps after
    the warm-up are recorded — a slow spell of the host cannot land on one variant alone."""
    from amgsn.engine import bench_step as bs

    order: list[str] = []
    original = bs._Variant.step

    def logged(self):
        order.append("bank" if self.saliency is not None else self.policy.impl if self.mode != "random" else "random")
        original(self)

    monkeypatch.setattr(bs._Variant, "step", logged)
    result = bs.bench_step(model="vit_tiny", img_size=32, patch_size=8, batch_size=4, depth=1, steps=2, warmup=1,
                           device="cpu")
    assert order == ["fused", "bank", "reference", "random"] * 3
    assert all(result[v]["median_ms"] > 0 for v in ("fused", "fused_bank", "reference", "mae_random"))


@pytest.mark.cuda
def test_bench_step_cuda_reports_memory_and_mfu():
    from amgsn.engine.bench_step import PEAK_BF16_FLOPS, bench_step

    result = bench_step(model="vit_tiny", img_size=32, patch_size=8, batch_size=4, depth=1, steps=1, device="cuda")
    known_card = any(k in torch.cuda.get_device_name() for k in PEAK_BF16_FLOPS)
    for name in ("fused", "reference", "mae_random"):
        entry = result[name]
        # Each variant's own state + step (the three variants stay resident side by side).
        assert 0 < entry["peak_MiB"] < torch.cuda.get_device_properties(0).total_memory / 2**20
        if name != "reference":  # the packed encoder runs on a real varlen kernel, not padded SDPA
            assert entry["attn_backend"] in ("torch_varlen", "flex")
        if known_card:  # MFU needs the card's peak: H100/H200, the GPU machine's cards
            assert 0 < entry["mfu"] < 1
        else:
            assert "mfu" not in entry
