"""Memory floors of the fused ops at the benchmark shapes (docs/method.md §9.2), and — on a GPU — the measured
time of each launch beside its floor.

A launch's floor is the time its compulsory traffic takes at the card's DRAM bandwidth: every byte it must
read from its inputs and write to its outputs, each counted once (data a program re-reads from L1 / L2, such
as a class's center row read by many samples, is counted once; scratch it writes for a later launch counts
as written there and read by the reader). Bandwidths: 3.35 TB/s (H100 SXM, HBM3) and 4.8 TB/s (H200, HBM3e),
the vendors' peak figures; a well-written memory-bound kernel reaches ~85-90 % of them.

    python benchmarks/memory_floors.py                      # the floors (any machine)
    python benchmarks/memory_floors.py --device cuda --json runs/floors.json   # + measured (profiler)

Measured = mean CUDA time per call of each kernel over ``--rounds`` calls (torch.profiler), matched by kernel
name; the ratio is measured / floor at the card's own bandwidth (H200 if its name says so, else H100).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}
B, H, N, HEAD_DIM = 256, 12, 196, 64
D_FUSED, D_SELECT, D_SCATTER, D_CENTER = 768, 192, 512, 768


@dataclass
class Floor:
    op: str
    launch: str  # kernel name, as the profiler shows it (substring)
    nbytes: int
    what: str
    case: str = ""  # the measured call it belongs to (see measure())

    def __post_init__(self) -> None:
        self.case = self.case or self.op.split(" (")[0].replace(" backward", "")

    def us(self, card: str) -> float:
        return self.nbytes / BANDWIDTH[card] * 1e6


def kept_rows(ratio: torch.Tensor, n: int = N) -> int:
    """T = Σ_b num_keep[b], num_keep = clamp(floor((1 - r) N + 1e-4), 1, N) (docs/method.md §3.2)."""
    return int(torch.clamp(torch.floor((1 - ratio.double()) * n + 1e-4), 1, n).sum())


def inputs(device: str = "cpu") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"ratio": torch.rand(B, generator=gen) * 0.4 + 0.5,
            "noise": torch.rand(B, N, generator=gen).to(device),
            "scores": torch.rand(B, N, generator=gen).to(device)}


def floors(T: int) -> list[Floor]:
    """Per launch at the benchmark shapes; T = kept rows of the batch (same ratios for every op)."""
    bf16, f32, i64, i32 = 2, 4, 8, 4
    BN = B * N
    plan = B * f32 + 2 * (B + 1) * i32  # ratios in; num_keep / cu_seqlens out
    out = [
        Floor("abmg_mask_and_gather (bf16, D=768)", "_head_probs_kernel",
              B * H * HEAD_DIM * bf16 + B * H * (N + 1) * HEAD_DIM * bf16 + B * H * N * f32,
              "q_cls + K read, per-head rows P (fp32) written"),
        Floor("abmg_mask_and_gather (bf16, D=768)", "_rank_kernel",
              B * H * N * f32 + BN * f32 + plan + BN * f32 + T * i64 + BN + BN * i32,
              "P + noise + plan read; scores, ids_keep, mask, inverse map written"),
        Floor("abmg_mask_and_gather (bf16, D=768)", "_gather_kernel",
              T * i64 + (B + 1) * i32 + 2 * T * D_FUSED * bf16, "ids + kept rows of x read, (T, D) written"),
        Floor("abmg_mask_and_gather backward (bf16)", "_scatter_kernel",
              BN * i32 + T * D_FUSED * bf16 + BN * D_FUSED * bf16, "inverse map + grad rows read, (B, N, D) written"),
        Floor("abmg_select + gather_visible (fp32, D=192)", "_select_kernel",
              BN * f32 + plan + T * i64 + BN, "scores + plan read; ids_keep, mask written"),
        Floor("abmg_select + gather_visible (fp32, D=192)", "_gather_kernel",
              T * i64 + (B + 1) * i32 + 2 * T * D_SELECT * f32, "ids + kept rows read, (T, D) written"),
        Floor("scatter_visible (bf16, D=512)", "_inverse_kernel",
              T * i64 + (B + 1) * i32 + BN * i32, "ids read, inverse map written"),
        Floor("scatter_visible (bf16, D=512)", "_scatter_kernel",
              BN * i32 + T * D_SCATTER * bf16 + D_SCATTER * bf16 + BN * D_SCATTER * bf16,
              "inverse map + visible rows + token read, (B, N, D) written"),
    ]
    for C in (7, 1000):
        centers = min(B, C) * D_CENTER * f32  # the distinct center rows a batch touches
        out += [
            Floor(f"center loss C={C} (bf16 features)", "loss_forward_kernel",
                  B * D_CENTER * bf16 + centers + B * i64 + C * f32, "features + touched centers + labels read"),
            Floor(f"center loss C={C} (bf16 features)", "backward_kernel",
                  B * D_CENTER * bf16 + centers + B * i64 + B * D_CENTER * bf16,
                  "features + centers read, grad written"),
            Floor(f"center loss C={C} (bf16 features)", "column_kernel",
                  B * D_CENTER * bf16 + B * i64 + 2 * centers, "features + labels read, touched centers updated"),
        ]
    return out


def measure(device: str, rounds: int) -> dict[tuple[str, str], float]:
    """Mean CUDA µs per call of each (op, kernel) at the benchmark shapes."""
    from torch.profiler import ProfilerActivity, profile

    from amgsn import ops
    from amgsn.benchmarking import center_loss_step

    x_in = inputs(device)
    ratio = x_in["ratio"]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, HEAD_DIM, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(B, H, N + 1, HEAD_DIM, generator=gen).to(device, torch.bfloat16)
    x = torch.randn(B, N, D_FUSED, generator=gen).to(device, torch.bfloat16).requires_grad_()
    xs = torch.randn(B, N, D_SELECT, generator=gen).to(device)
    sel = ops.abmg_select(x_in["scores"], ratio)
    y = torch.randn(sel.ids_keep.numel(), D_SCATTER, generator=gen).to(device, torch.bfloat16)
    token = torch.randn(D_SCATTER, generator=gen).to(device, torch.bfloat16)

    def fused():
        visible, _ = ops.abmg_mask_and_gather(q, k, x, ratio, x_in["noise"], relative_noise=True)
        visible.backward(torch.ones_like(visible))

    def select_gather():
        s = ops.abmg_select(x_in["scores"], ratio)
        ops.gather_visible(xs, s.ids_keep, s.cu_seqlens)

    def scatter():
        ops.scatter_visible(y, sel.ids_keep, sel.cu_seqlens, token, N)

    cases = {"abmg_mask_and_gather": fused, "abmg_select + gather_visible": select_gather,
             "scatter_visible": scatter}
    for C in (7, 1000):
        ours, _, _ = center_loss_step(device, C)
        cases[f"center loss C={C}"] = ours
    times: dict[tuple[str, str], float] = {}
    for name, fn in cases.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(rounds):
                fn()
            torch.cuda.synchronize()
        for evt in prof.key_averages():
            if evt.device_type.name == "CUDA" or getattr(evt, "device_time_total", 0) > 0:
                total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
                times[(name, evt.key)] = total / rounds
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args()
    T = kept_rows(inputs()["ratio"])
    rows = floors(T)
    measured: dict[tuple[str, str], float] = {}
    card = "H100"
    if args.device.startswith("cuda"):
        card = "H200" if "H200" in torch.cuda.get_device_name() else "H100"
        measured = measure(args.device, args.rounds)
    print(f"T = {T} kept rows of B x N = {B * N} (ratios U[0.5, 0.9], seed 0); floors at 3.35 TB/s (H100) / "
          f"4.8 TB/s (H200)" + (f"; measured on {torch.cuda.get_device_name()}" if measured else ""))
    head = f"{'op':44} {'launch':22} {'MB':>8} {'H100 us':>8} {'H200 us':>8}"
    print(head + (f" {'measured':>9} {'x floor':>8}" if measured else ""))
    result = []
    for f in rows:
        line = f"{f.op:44} {f.launch:22} {f.nbytes / 1e6:8.2f} {f.us('H100'):8.1f} {f.us('H200'):8.1f}"
        entry = asdict(f) | {"floor_us_h100": f.us("H100"), "floor_us_h200": f.us("H200")}
        if measured:
            hits = [t for (case, key), t in measured.items() if case == f.case and f.launch in key]
            us = sum(hits) if hits else math.nan
            entry |= {"measured_us": us, "card": card, "over_floor": us / f.us(card)}
            line += f" {us:9.1f} {us / f.us(card):8.2f}"
        print(line)
        result.append(entry)
    total = {op: sum(f.us("H100") for f in rows if f.op == op) for op in dict.fromkeys(f.op for f in rows)}
    for op, us in total.items():
        print(f"  {op}: floor {us:.1f} us on H100, {us * BANDWIDTH['H100'] / BANDWIDTH['H200']:.1f} us on H200")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"T": T, "card": card, "rows": result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
