"""Operator benchmark cases: ours vs the reference on the same inputs, in the same process.

One definition of each case serves both ``benchmarks/bench_*.py`` (pytest-benchmark) and
``amgsn bench`` (a table + JSON without pytest). A case builds its inputs once and returns two
zero-argument callables; the timer synchronises CUDA around each call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    """One benchmark: ``build(device) -> (ours, reference, bytes_moved or None)``."""

    op: str
    shape: str
    devices: tuple[str, ...]
    build: Callable[[str], tuple[Callable[[], object], Callable[[], object], int | None]]
    target: float | None = None  # the speed-up the project promises on this device (doc only)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, *, warmup: int = 3, rounds: int = 20) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA synchronised before and after each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# ---------------------------------------------------------------------------------------------
# Masking (docs/method.md §3.1–3.5)
# ---------------------------------------------------------------------------------------------


def _select_gather(device: str, B: int = 256, N: int = 196, D: int = 192):
    from amgsn import ops
    from amgsn.ops import reference

    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(B, N, generator=gen).to(device)
    x = torch.randn(B, N, D, generator=gen).to(device)
    ratio = (torch.rand(B, generator=gen) * 0.4 + 0.5).to(device)

    def ours():
        sel = ops.abmg_select(scores, ratio)
        return ops.gather_visible(x, sel.ids_keep, sel.cu_seqlens, sel.max_seqlen)

    def ref():
        sel = reference.abmg_select(scores, ratio)
        return reference.gather_visible(x, sel.ids_keep, sel.cu_seqlens)

    return ours, ref, None


def _fused(device: str, B: int = 256, H: int = 12, N: int = 196, d: int = 64, D: int = 768):
    from amgsn import ops
    from amgsn.ops import reference

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, N + 1, d, generator=gen).to(device, dtype)
    k = torch.randn(B, H, N + 1, d, generator=gen).to(device, dtype)
    x = torch.randn(B, N, D, generator=gen).to(device, dtype)
    ratio = torch.rand(B, generator=gen) * 0.4 + 0.5  # the MRUS bank lives on the CPU
    noise = (torch.rand(B, N, generator=gen) * 0.5).to(device)
    q_cls = q[:, :, 0]

    def ours():
        return ops.abmg_mask_and_gather(q_cls, k, x, ratio, noise, relative_noise=True)

    def ref():
        return reference.abmg_mask_and_gather_full(q, k, x, ratio.to(device), noise, True)

    # bytes the fused op must move: q_cls + K read, kept rows of x read + written, ids + mask
    kept = int((1 - ratio.mean()) * B * N)
    moved = (q_cls.numel() + k.numel()) * k.element_size() + 2 * kept * D * x.element_size()
    moved += kept * 8 + B * N + noise.numel() * 4
    return ours, ref, moved


def _scatter(device: str, B: int = 256, N: int = 196, D: int = 512):
    from amgsn import ops
    from amgsn.ops import reference

    gen = torch.Generator().manual_seed(0)
    sel = reference.abmg_select(torch.rand(B, N, generator=gen), torch.rand(B, generator=gen) * 0.4 + 0.5)
    ids, cu = sel.ids_keep.to(device), sel.cu_seqlens.to(device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    y = torch.randn(ids.numel(), D, generator=gen).to(device, dtype)
    token = torch.randn(D, generator=gen).to(device, dtype)

    def ours():
        return ops.scatter_visible(y, ids, cu, token, N, sel.max_seqlen)

    def ref():
        return reference.scatter_visible(y, ids, cu, token, N)

    moved = (y.numel() + B * N * D) * y.element_size()
    return ours, ref, moved


def one_thread(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with one intra-op thread (the thread count is restored after each call)."""

    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)

    return run


def _scores_cpu(device: str, B: int = 256, H: int = 12, N: int = 196, d: int = 64):
    """Issue 23: the CLS scores on one CPU thread, ours (lane dots + ATen softmax) vs the plain einsum route."""
    from amgsn import ops
    from amgsn.ops import reference

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, d, generator=gen).to(device)
    k = torch.randn(B, H, N + 1, d, generator=gen).to(device)
    moved = (q.numel() + k.numel() + B * N) * 4
    return (one_thread(lambda: ops.cls_attention_scores(q, k)),
            one_thread(lambda: reference.cls_attention_scores(q, k)), moved)


def _fused_cpu(device: str, B: int = 256, H: int = 12, N: int = 196, d: int = 64, D: int = 768):
    """Issue 23: the fused op on one CPU thread vs einsum scores + ``torch.topk`` (the kept = least attended,
    unsorted: the cheapest plain route) + ``torch.gather`` — a float ratio, as MAE."""
    from amgsn import ops
    from amgsn.ops import reference

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, d, generator=gen).to(device)
    k = torch.randn(B, H, N + 1, d, generator=gen).to(device)
    x = torch.randn(B, N, D, generator=gen).to(device)
    keep = int(N * (1 - 0.75))

    def plain():
        scores = reference.cls_attention_scores(q, k)
        ids = torch.topk(scores, keep, dim=1, largest=False).indices
        return torch.gather(x, 1, ids[..., None].expand(-1, -1, D))

    return one_thread(lambda: ops.abmg_mask_and_gather(q, k, x, 0.75)), one_thread(plain), None


MASKING_CASES = [
    Case("abmg_select+gather_visible", "B=256 N=196 D=192 r~U[0.5,0.9]", ("cpu", "cuda"), _select_gather, 2.0),
    Case("abmg_mask_and_gather", "B=256 H=12 N=196 d=64 D=768 r~U[0.5,0.9]", ("cuda",), _fused, 5.0),
    Case("scatter_visible", "B=256 N=196 D=512", ("cpu", "cuda"), _scatter, None),
    Case("cls_attention_scores vs einsum", "B=256 H=12 N=196 d=64 fp32, 1 thread", ("cpu",), _scores_cpu, 1.5),
    Case("abmg_mask_and_gather vs einsum+topk+gather", "B=256 H=12 N=196 d=64 D=768 r=0.75 fp32, 1 thread",
         ("cpu",), _fused_cpu, 1.3),
]


# ---------------------------------------------------------------------------------------------
# Debiased center loss (docs/method.md §3.6–3.7): forward + backward + center update
# ---------------------------------------------------------------------------------------------


def center_loss_step(device: str, C: int, dtype: torch.dtype | None = None, *, B: int = 256, D: int = 768,
                     fused_stats: bool = False, check_finite: bool | None = None):
    """Ours = ``DebiasedCenterLoss`` (compiled op), or with ``fused_stats`` the forward that also
    returns the per-class statistics + ``center_apply_``; reference = distance-matrix loss +
    autograd + a separate ``index_add_`` update. float32 on CPU, bf16 features on CUDA by default."""
    from amgsn.losses import DebiasedCenterLoss
    from amgsn.ops import reference
    from amgsn.ops.center_loss import center_apply_, debiased_center_loss_with_stats

    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 500, (C,), generator=gen)
    feats = torch.randn(B, D, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, C, (B,), generator=gen).to(device)
    module = DebiasedCenterLoss(C, D, class_counts=counts, alpha=0.5, check_finite=check_finite).to(device)
    module.centers.copy_(torch.randn(C, D, generator=gen))
    ref_centers = module.centers.clone()
    weights = module.class_weights

    def ours() -> None:
        feats.grad = None
        if fused_stats:
            loss, stats = debiased_center_loss_with_stats(feats, labels, module.centers, weights,
                                                          check_finite=check_finite)
            loss.backward()
            center_apply_(module.centers, stats.delta_sums, stats.counts, 0.5)
            return
        module(feats, labels).backward()
        module.update_centers(feats, labels)

    def ref() -> None:
        feats.grad = None
        reference.debiased_center_loss(feats, labels, ref_centers, weights).backward()
        reference.center_update_(feats, labels, ref_centers, 0.5)

    return ours, ref, None


LOSS_CASES = [
    Case("center_loss fwd+bwd+update", "B=256 D=768 C=7", ("cpu", "cuda"),
         lambda device: center_loss_step(device, 7), 3.0),
    Case("center_loss fwd+bwd+update", "B=256 D=768 C=1000", ("cpu", "cuda"),
         lambda device: center_loss_step(device, 1000), 3.0),
]


def all_cases() -> list[Case]:
    """Every operator case, in table order."""
    return list(MASKING_CASES) + list(LOSS_CASES)


def run_case(case: Case, device: str, *, rounds: int = 20) -> dict:
    """Time one case on ``device`` -> a row for the table/JSON."""
    ours, ref, moved = case.build(device)
    ours_ms = median_ms(ours, device, rounds=rounds)
    ref_ms = median_ms(ref, device, rounds=rounds)
    row = {
        "op": case.op,
        "shape": case.shape,
        "device": device,
        "ours_ms": round(ours_ms, 4),
        "reference_ms": round(ref_ms, 4),
        "ratio": round(ref_ms / ours_ms, 2),
        "target": case.target,
    }
    if moved is not None:
        row["ours_GBps"] = round(moved / (ours_ms * 1e-3) / 1e9, 1)
    return row


def copy_bandwidth_GBps(device: str, nbytes: int = 1 << 30) -> float | None:
    """Measured device-to-device copy bandwidth (bytes read + written per second), CUDA only."""
    if not device.startswith("cuda"):
        return None
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=3, rounds=20)
    return round(2 * src.numel() / (ms * 1e-3) / 1e9, 1)


# The whole pre-training step (issue 5's workload) as the last row of ``amgsn bench``: abmg_mrus
# the fused way (fused op + packed encoder) vs the anchors' way, per device kind. The CUDA size is
# docs/method.md §9's ViT-B/16 run (bf16 autocast); the CPU size keeps a step to a few seconds on 2 cores.
STEP_CONFIGS: dict[str, dict] = {
    "cpu": {"model": "vit_tiny", "img_size": 112, "patch_size": 8, "batch_size": 64, "depth": None},
    "cuda": {"model": "vit_base", "img_size": 224, "patch_size": 16, "batch_size": 256, "depth": None},
}
STEP_TARGET = 1.2


def run_step_row(device: str, *, steps: int = 5) -> tuple[dict, dict]:
    """Time the pre-training step, fused vs reference -> (table row, full ``bench_step`` result)."""
    from amgsn.engine.bench_step import bench_step

    kind = "cuda" if device.startswith("cuda") else "cpu"
    cfg = STEP_CONFIGS[kind]
    result = bench_step(device=device, steps=steps, ratio_range=(0.5, 0.9),
                        variants=("fused", "fused_bank", "reference"), **cfg)
    fused, ref = result["fused"], result["reference"]
    depth = "" if cfg["depth"] is None else f" depth {cfg['depth']}"
    row = {
        "op": "pretrain step (abmg_mrus, fwd+bwd+AdamW)",
        "shape": f"{cfg['model']}{depth} {cfg['img_size']}px/{cfg['patch_size']} B={cfg['batch_size']} "
                 f"r~U[0.5,0.9]" + (" bf16" if kind == "cuda" else ""),
        "device": device,
        "ours_ms": fused["median_ms"],
        "reference_ms": ref["median_ms"],
        "ratio": round(ref["median_ms"] / fused["median_ms"], 2),
        "target": STEP_TARGET,
    }
    if "peak_MiB" in fused:
        row["peak_MiB"] = fused["peak_MiB"]
    return row, result


BANK_STEP_TARGET = 1.5  # reference / fused_bank (issue 19)


def bank_step_row(step_row: dict, result: dict) -> dict:
    """The same step with the saliency bank (docs/method.md §4.4, warm bank): fused_bank vs the reference."""
    bank, ref = result["fused_bank"], result["reference"]
    row = {**step_row, "op": f"pretrain step + saliency bank P={bank['saliency_refresh']:g}",
           "ours_ms": bank["median_ms"], "ratio": round(ref["median_ms"] / bank["median_ms"], 2),
           "target": BANK_STEP_TARGET}
    row.pop("peak_MiB", None)
    if "peak_MiB" in bank:
        row["peak_MiB"] = bank["peak_MiB"]
    return row


def run_all(device: str, *, rounds: int = 20, cases: list[Case] | None = None, progress: bool = True,
            step_steps: int = 5) -> dict:
    """Run every case available on ``device``, then (``step_steps`` > 0) the pre-training step
    -> ``{"device", "copy_GBps", "rows": [...], "step": bench_step's result}``."""
    from tqdm.auto import tqdm

    kind = "cuda" if device.startswith("cuda") else "cpu"
    todo = [c for c in (cases or all_cases()) if kind in c.devices]
    copy = copy_bandwidth_GBps(device)
    rows = []
    bar = tqdm(total=len(todo) + (step_steps > 0), desc=f"bench [{device}]", disable=not progress)
    for case in todo:
        if kind == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row = run_case(case, device, rounds=rounds)
        if kind == "cuda":
            row["peak_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            if copy and "ours_GBps" in row:
                row["of_copy_bw"] = round(row["ours_GBps"] / copy, 3)
        rows.append(row)
        bar.update()
    step = None
    if step_steps > 0:
        bar.set_postfix_str("pre-training step")
        step_row, step = run_step_row(device, steps=step_steps)
        rows += [step_row, bank_step_row(step_row, step)]
        bar.update()
    bar.close()
    info = {"device": device, "torch": torch.__version__}
    if kind == "cuda":
        info["card"] = torch.cuda.get_device_name()
        info["copy_GBps"] = copy
    out = {**info, "rows": rows}
    if step is not None:
        out["step"] = step
    return out


def format_table(result: dict) -> str:
    """A fixed-width table: op, shape, ours, reference, ratio (+ GB/s and peak memory on CUDA)."""
    cols = ["op", "shape", "ours_ms", "reference_ms", "ratio", "target", "ours_GBps", "peak_MiB"]
    cols = [c for c in cols if any(c in r for r in result["rows"])]
    cells = [[str(r.get(c, "")) if r.get(c) is not None else "" for c in cols] for r in result["rows"]]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    head = f"device: {result['device']}" + (f" ({result.get('card')}, copy {result.get('copy_GBps')} GB/s)"
                                            if result.get("card") else "")
    return "\n".join([head, line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])
