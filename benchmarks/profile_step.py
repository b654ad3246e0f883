"""Where does a pre-training step spend its time? (GPU: issue 5's ViT-B/16 step; CPU works too.)

For each variant of ``amgsn bench-step`` (fused, reference, mae_random) this times the step's phases
with a synchronisation between them — masking (patch embedding + teacher pass + selection + gather),
forward (encoder + decoder + loss), backward, optimiser, ratio-bank update — and profiles two steps
with ``torch.profiler`` (top kernels by device time, and device-busy vs wall time). It also times the
fused variant with a fused AdamW and with each usable attention backend, and fused vs reference
with the dense blocks (teacher, decoder) compiled.

    python benchmarks/profile_step.py --out runs/profile            # ViT-B/16, 224 px, B=256 on CUDA
    python benchmarks/profile_step.py --model vit_tiny --img-size 112 --patch-size 8 --batch-size 64 --device cpu

Writes ``profile.json`` and ``profile_<variant>.txt`` (the profiler's tables) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from amgsn.engine.bench_step import _Variant
from amgsn.engine.common import autocast, resolve_device

PHASES = ("mask", "forward", "backward", "optimizer", "bank")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _phased_step(run: _Variant) -> dict[str, float]:
    """One step of ``run`` split into phases (ms), with a sync after each."""
    times, dev = {}, run.device
    _sync(dev)
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        _sync(dev)
        now = time.perf_counter()
        times[name] = (now - t) * 1e3
        t = now

    uses_bank = run.policy.uses_ratio_bank
    ratios = run.bank.ratios(run.indices) if uses_bank else run.fixed_ratio
    with autocast(dev):
        batch = run.policy.select(run.net, run.imgs, ratios, epoch=0)
        lap("mask")
        out = run.net(run.imgs, masked=(batch.visible, batch.selection), encoder=batch.encoder)
        lap("forward")
    out.loss.backward()
    lap("backward")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    lap("optimizer")
    if uses_bank:
        run.bank.update(run.indices, out.per_image_loss.detach())
        run.bank.load_state_dict(run.fixed)
    lap("bank")
    return times


def _step_ms(run: _Variant, steps: int) -> float:
    """Median of ``steps`` timed steps (ms), as ``amgsn bench-step`` times them."""
    run.times.clear()
    for _ in range(steps):
        run.timed_step(record=True)
    return statistics.median(run.times) * 1e3


def _profile(run: _Variant, out_dir: Path, name: str, rows: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    cuda = run.device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(run.device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(2):
            run.step()
        _sync(run.device)
    wall_ms = (time.perf_counter() - t) * 1e3 / 2
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    table = events.table(sort_by=key, row_limit=rows, max_name_column_width=70)
    (out_dir / f"profile_{name}.txt").write_text(table)
    summary = {"wall_ms_per_step": round(wall_ms, 2)}
    if cuda:
        busy = sum(e.self_device_time_total for e in events)
        summary["device_busy_ms_per_step"] = round(busy / 1e3 / 2, 2)
        kernels = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
        summary["top"] = [(e.key[:60], round(e.self_device_time_total / 1e3 / 2, 2), e.count // 2)
                          for e in kernels]
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--ratio-range", type=float, nargs=2, default=(0.5, 0.9))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=30, help="rows of each profiler table")
    ap.add_argument("--out", type=Path, default=Path("runs/profile"))
    ap.add_argument("--compile-trial", action="store_true", help="also off CUDA: time compiled dense blocks")
    args = ap.parse_args()
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    B, lo, hi = args.batch_size, *args.ratio_range
    imgs = torch.randn(B, 3, args.img_size, args.img_size, generator=gen).to(device)
    ratios = torch.rand(B, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    result: dict = {"config": vars(args) | {"out": str(args.out), "device": device, "torch": torch.__version__}}
    if device.startswith("cuda"):
        result["config"]["gpu"] = torch.cuda.get_device_name()

    def make(variant: str, prepare=None, warmup: int = 2) -> _Variant:
        """A fresh variant; ``prepare(run)`` changes it before its warm-up steps."""
        run = _Variant(variant, args.model, args.img_size, args.patch_size, None, imgs, ratios, (lo, hi), device, 0)
        if prepare is not None:
            prepare(run)
        for _ in range(warmup):
            run.step()
        return run

    for variant in ("fused", "reference", "mae_random"):
        run = make(variant)
        phases = [_phased_step(run) for _ in range(args.steps)]
        entry = {p: round(statistics.median(ph[p] for ph in phases), 2) for p in PHASES}
        entry["sum_of_phases"] = round(sum(entry[p] for p in PHASES), 2)
        entry["step_ms"] = round(_step_ms(run, args.steps), 2)
        entry["profile"] = _profile(run, args.out, variant, args.rows)
        result[variant] = entry
        print(variant, json.dumps({k: v for k, v in entry.items() if k != "profile"}), flush=True)
        print("  profile", json.dumps(entry["profile"]), flush=True)
        del run
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    # What would change the fused step: a fused AdamW, another attention backend for the packed encoder.
    trials = {}
    if device.startswith("cuda"):
        def fused_adamw(run: _Variant) -> None:
            run.optimizer = torch.optim.AdamW(run.net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                              fused=True)

        trials["fused+fused_adamw"] = round(_step_ms(make("fused", fused_adamw), args.steps), 2)
        from amgsn.models import attention

        for backend in ("torch_varlen", "flex", "sdpa_padded", "sdpa_per_seq"):
            try:
                attention.resolve_backend(backend, torch.device(device), torch.bfloat16)
                run = make("fused", lambda r, b=backend: setattr(r.net, "attn_backend", b))
                trials[f"fused+{backend}"] = round(_step_ms(run, args.steps), 2)
                del run
            except Exception as err:  # noqa: BLE001 — report and go on: this is a survey
                trials[f"fused+{backend}"] = f"{type(err).__name__}: {str(err)[:200]}"
            torch.cuda.empty_cache()
    if device.startswith("cuda") or args.compile_trial:
        # The dense paths shared by every variant (the teacher's blocks, the decoder) compiled, so
        # inductor fuses their LayerNorm / GELU / residual / cast glue; fused and reference round-robin.
        def compile_dense(run: _Variant) -> None:
            for blk in [*run.net.blocks, *run.net.decoder_blocks]:
                blk.compile()

        try:
            runs = {v: make(v, compile_dense, warmup=0) for v in ("fused", "reference")}
            for i in range(3 + args.steps):  # 3 warm-up steps: compilation, then a recompile at most
                for run in runs.values():
                    run.timed_step(record=i >= 3)
            medians = {v: statistics.median(run.times) * 1e3 for v, run in runs.items()}
            for v, ms in medians.items():
                trials[f"{v}+compiled_dense_blocks"] = round(ms, 2)
            trials["compiled_ratio"] = round(medians["reference"] / medians["fused"], 3)
            del runs
        except Exception as err:  # noqa: BLE001 — report and go on: this is a survey
            trials["compiled_dense_blocks"] = f"{type(err).__name__}: {str(err)[:200]}"
    result["trials_step_ms"] = trials
    print("trials", json.dumps(trials), flush=True)
    (args.out / "profile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
