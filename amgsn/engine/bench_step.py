"""Whole pre-training step benchmark (``amgsn bench-step``): forward + backward + optimiser step.

Four variants on the same random images and the same per-image ratios:

* ``fused``      — abmg_mrus with the fused op and the packed varlen encoder (ours);
* ``fused_bank`` — the same with the saliency bank (docs/method.md §4.4): the teacher sees ``ceil(P * B)``
  images per step, the others read the bank through a random crop box and flip; P =
  :data:`DEFAULT_REFRESH` unless given. Timed with a *warm* bank: every image written once before;
* ``reference``  — abmg_mrus the anchors' way: full last-block attention, argsort, padded encoder;
* ``mae_random`` — plain MAE random masking at a fixed ratio (the mean of the per-image ratios):
  ``fused / mae_random`` is the price of ABMG's teacher pass.

The variants take turns step by step (round-robin) and each reports its median step time.

With ``compile=True`` (``--compile``, docs/method.md §9.3) every variant also runs compiled, as
``<variant>_compiled``, in the same round-robin: its entry adds ``compiles`` (graphs per region its
steps compiled), ``recompiles`` and ``compile_s`` (seconds its steps spent compiling — in its warm-up
steps; a second variant reuses what the first compiled), and ``<variant>_compiled_speedup`` = eager
/ compiled median. The ratios between variants are also given between their compiled twins (keys
ending in ``_compiled``).

Model FLOPs are counted analytically (matmuls and attention, forward ×3 for trained parts, the
teacher's forward ×1), so MFU = FLOPs / time / peak.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from amgsn.engine.common import autocast, resolve_device
from amgsn.engine.compile import compile_mae, compile_stats, stats_since, validate_options
from amgsn.masking import MaskingPolicy, RatioBank, SaliencyBank
from amgsn.masking.saliency_bank import IDENTITY_VIEW
from amgsn.models import MaskedAutoencoderViT
from amgsn.models.attention import resolve_backend

VARIANTS = ("fused", "fused_bank", "reference", "mae_random")
# fused_bank's P: the smallest refresh fraction whose saliency_agreement held >= 0.7 over the second half of
# the demo-size pre-training, refreshing from whole images (0.25 -> 0.69, 0.375 -> 0.73; RESULTS.md, issue 19).
DEFAULT_REFRESH = 0.375
CROP_SCALE = (0.35, 1.0)  # the pre-training transform's RandomResizedCrop scale (amgsn.data.transforms)

# Dense bf16 tensor-core peak (datasheet, SXM): used for MFU on these cards.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}


def _block_flops(tokens_per_seq: list[int] | torch.Tensor, width: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one transformer block over sequences of these lengths."""
    L = torch.as_tensor(tokens_per_seq, dtype=torch.float64)
    linear = 2 * L.sum() * width * width * (4 + 2 * mlp_ratio)  # qkv + proj + fc1 + fc2
    attention = 4 * (L * L).sum() * width  # q·kᵀ and attn·v
    return float(linear + attention)


def step_flops(model: MaskedAutoencoderViT, seqlens: torch.Tensor, teacher: bool,
               teacher_images: int | None = None) -> float:
    """Model FLOPs of one training step with these per-image visible counts (B,); the teacher (if any)
    runs on ``teacher_images`` images (default: all B)."""
    cfg = model.config
    B, N, D, p = seqlens.numel(), model.num_patches, model.embed_dim, model.patch_size
    Bt = B if teacher_images is None else teacher_images
    Dd, depth, ddepth = cfg["decoder_embed_dim"], cfg["depth"], cfg["decoder_depth"]
    pix = p * p * model.in_chans
    fwd = 2.0 * B * N * pix * D  # patch embedding (every patch)
    fwd += depth * _block_flops(seqlens + 1, D)  # encoder on CLS + visible
    fwd += 2.0 * float(seqlens.sum() + B) * D * Dd  # decoder_embed
    fwd += ddepth * _block_flops([N + 1] * B, Dd) + 2.0 * B * (N + 1) * Dd * pix  # decoder + head
    total = 3.0 * fwd
    if teacher:  # forward only: blocks[:-1] on full images, then the last block's q_cls and K
        total += (depth - 1) * _block_flops([N + 1] * Bt, D) + 2.0 * Bt * (N + 1) * D * D + 2.0 * Bt * D * D
    return total


def _timed(step, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


class _Variant:
    """One variant's fresh model, optimiser and ratio bank, and its training step."""

    def __init__(self, variant: str, model: str, img_size: int, patch_size: int, depth: int | None,
                 imgs: torch.Tensor, bank_ratios: torch.Tensor, bounds: tuple[float, float], device: str,
                 seed: int, saliency_refresh: float = DEFAULT_REFRESH, *, compile: bool = False,
                 compile_mode: str | None = None, compile_shapes: str = "dynamic") -> None:
        torch.manual_seed(seed)
        batch_size = imgs.shape[0]
        self.imgs, self.device, self.indices = imgs, device, torch.arange(batch_size)
        self.net = MaskedAutoencoderViT(model, img_size=img_size, patch_size=patch_size, depth=depth).to(device)
        self.mode, impl = {"fused": ("abmg_mrus", "fused"), "fused_bank": ("abmg_mrus", "fused"),
                           "reference": ("abmg_mrus", "reference"), "mae_random": ("random", "fused")}[variant]
        self.policy = MaskingPolicy(self.mode, epochs=1, warmup_epochs=0, impl=impl)
        self.saliency: SaliencyBank | None = None
        self.view_gen = torch.Generator().manual_seed(seed + 1)
        if variant == "fused_bank":
            self.saliency = SaliencyBank(batch_size, img_size // patch_size, saliency_refresh, device)
            self._warm_bank()  # eager: set-up, not timed (the steps compile what they run)
        self.compiled = compile
        self.compile_stats: dict[str, Any] = {"compiles": {}, "recompiles": 0, "compile_s": 0.0}
        if compile:
            fixed = float(bank_ratios.mean())
            compile_mae(self.net, mode=compile_mode, shapes=compile_shapes, batch_size=batch_size,
                        ratio_range=bounds if self.mode == "abmg_mrus" else (fixed, fixed))
        self.fixed = {"ratios": bank_ratios.clone(), "loss_mean": None, "num_updates": 0}
        self.bank = RatioBank(batch_size, r0=float(bank_ratios.mean()), r_min=bounds[0], r_max=bounds[1])
        self.bank.load_state_dict(self.fixed)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                           foreach=True)
        self.fixed_ratio = float(bank_ratios.mean())
        self.seqlens = torch.zeros(0)
        self.times: list[float] = []
        self.peak_mib: float | None = None

    def _views(self) -> torch.Tensor:
        """(B, 5) random crop boxes (area in CROP_SCALE, square) and flips, as the pre-training transform."""
        B = self.imgs.shape[0]
        u = torch.rand(4, B, generator=self.view_gen)
        side = (u[0] * (CROP_SCALE[1] - CROP_SCALE[0]) + CROP_SCALE[0]).sqrt()
        top, left, flips = u[1] * (1 - side), u[2] * (1 - side), (u[3] < 0.5).float()
        return torch.stack([top, left, side, side, flips], 1).to(self.device)

    @torch.no_grad()
    def _warm_bank(self) -> None:
        """Every image through the teacher once, whole, written into the bank (not timed)."""
        with autocast(self.device):
            scores = self.policy.teacher_scores(self.net, self.imgs)
        self.saliency.write(self.indices, scores, scores.new_tensor([IDENTITY_VIEW]).expand(len(scores), 5))

    def step(self) -> None:
        uses_bank = self.policy.uses_ratio_bank
        ratios = self.bank.ratios(self.indices) if uses_bank else self.fixed_ratio
        views = self._views() if self.saliency is not None else None
        with autocast(self.device):
            # The bench's images stand for the originals: the teacher refreshes from them whole.
            batch = self.policy.select(self.net, self.imgs, ratios, epoch=0, bank=self.saliency, indices=self.indices,
                                       views=views, wholes=self.imgs if views is not None else None)
            out = self.net(self.imgs, masked=(batch.visible, batch.selection), encoder=batch.encoder)
        if batch.refreshed is not None:
            self.saliency.write(batch.refreshed.indices, batch.refreshed.scores, batch.refreshed.views)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if uses_bank:
            self.bank.update(self.indices, out.per_image_loss.detach())
            self.bank.load_state_dict(self.fixed)  # same ratios every step: every variant times the same workload
        self.seqlens = (batch.selection.cu_seqlens[1:] - batch.selection.cu_seqlens[:-1]).cpu()

    def _state_bytes(self) -> int:
        """Bytes this variant keeps between steps: weights, gradients (if any), optimiser state."""
        params = list(self.net.parameters())
        tensors = params + [p.grad for p in params if p.grad is not None]
        tensors += [t for st in self.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")

    def timed_step(self, record: bool) -> None:
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()  # every variant's state, not only this one's
        before = compile_stats() if self.compiled else None
        elapsed = _timed(self.step, self.device)
        if before is not None:  # what this step compiled is this variant's
            new, total = stats_since(before), self.compile_stats
            for region, n in new["compiles"].items():
                total["compiles"][region] = total["compiles"].get(region, 0) + n
            total["recompiles"] += new["recompiles"]
            total["compile_s"] = round(total["compile_s"] + new["compile_s"], 3)
        if record:
            self.times.append(elapsed)
            if cuda:
                # This variant's peak as if it ran alone: its own state + what its step allocated on top.
                peak = (torch.cuda.max_memory_allocated() - resident + self._state_bytes()) / 2**20
                self.peak_mib = max(self.peak_mib or 0.0, peak)

    def summary(self) -> dict[str, Any]:
        median = statistics.median(self.times)
        batch_size = self.imgs.shape[0]
        teacher_images = None if self.saliency is None else self.saliency.num_refresh(batch_size)
        flops = step_flops(self.net, self.seqlens, teacher=self.mode != "random", teacher_images=teacher_images)
        entry = {"median_ms": round(median * 1e3, 2), "images_per_s": round(batch_size / median, 1),
                 "tflops_per_step": round(flops / 1e12, 3), "achieved_tflops": round(flops / median / 1e12, 2)}
        if self.saliency is not None:
            entry["saliency_refresh"] = self.saliency.refresh
        if self.compiled:
            entry.update(self.compile_stats)
        if self.policy.encoder_path == "packed":  # which varlen attention the packed encoder ran on
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
            entry["attn_backend"] = resolve_backend(self.net.attn_backend, torch.device(self.device), dtype)
        if self.device.startswith("cuda"):
            name = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
            if peak:
                entry["mfu"] = float(f"{flops / median / peak:.4g}")  # 4 significant digits: tiny test runs stay > 0
            entry["peak_MiB"] = round(self.peak_mib or 0.0, 1)
        return entry


def bench_step(
    *,
    model: str = "vit_tiny",
    img_size: int = 112,
    patch_size: int = 8,
    batch_size: int = 64,
    ratio_range: tuple[float, float] = (0.5, 0.9),
    device: str = "auto",
    steps: int = 5,
    warmup: int = 2,
    depth: int | None = None,
    seed: int = 0,
    variants: tuple[str, ...] = VARIANTS,
    saliency_refresh: float | None = None,
    compile: bool = False,
    compile_mode: str | None = None,
    compile_shapes: str = "dynamic",
) -> dict[str, Any]:
    """Median step time of each variant -> ``{"fused": {...}, "fused_bank": {..., "saliency_refresh": P},
    "reference": {...}, "mae_random": {...}, ...}`` (``saliency_refresh``: fused_bank's P, default
    :data:`DEFAULT_REFRESH`); with ``compile`` also ``"<variant>_compiled": {...}`` (see the module
    docstring)."""
    device = resolve_device(device)
    validate_options(compile, compile_mode, compile_shapes)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"--variants must be some of {VARIANTS}, got {list(variants)}")
    refresh = DEFAULT_REFRESH if saliency_refresh is None else saliency_refresh
    if isinstance(refresh, bool) or not isinstance(refresh, (int, float)) or not 0.0 < refresh <= 1.0:
        raise ValueError(f"--saliency-refresh must lie in (0, 1], got {saliency_refresh!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}")
    lo, hi = ratio_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"--ratio-range must satisfy 0 <= lo <= hi <= 1, got {ratio_range}")
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(device)
    bank_ratios = torch.rand(batch_size, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    result: dict[str, Any] = {"config": {"model": model, "img_size": img_size, "patch_size": patch_size,
                                         "batch_size": batch_size, "ratio_range": [lo, hi], "device": device,
                                         "steps": steps, "torch": torch.__version__}}
    if compile:
        result["config"].update({"compile_mode": compile_mode or "default", "compile_shapes": compile_shapes})
    runs = {}
    for v in variants:
        runs[v] = _Variant(v, model, img_size, patch_size, depth, imgs, bank_ratios, (lo, hi), device, seed, refresh)
        if compile:
            runs[f"{v}_compiled"] = _Variant(v, model, img_size, patch_size, depth, imgs, bank_ratios, (lo, hi),
                                             device, seed, refresh, compile=True, compile_mode=compile_mode,
                                             compile_shapes=compile_shapes)
    # Round-robin: step i of every variant runs back to back, so a slow spell of a shared machine
    # (other tenants, frequency changes) lands on all variants alike instead of on one of them.
    for i in range(warmup + steps):
        for run in runs.values():
            run.timed_step(record=i >= warmup)
    for variant, run in runs.items():
        result[variant] = run.summary()
    for suffix in ("", "_compiled") if compile else ("",):
        ms = {v: result[v + suffix]["median_ms"] for v in variants}
        for key, (num, den) in RATIOS.items():
            if num in ms and den in ms:
                result[key + suffix] = round(ms[num] / ms[den], 3)
    if compile:
        for v in variants:
            result[f"{v}_compiled_speedup"] = round(result[v]["median_ms"] / result[f"{v}_compiled"]["median_ms"], 3)
    return result


# Ratios between variants: key -> (numerator, denominator) median step times.
RATIOS = {"fused_speedup_vs_reference": ("reference", "fused"), "fused_over_mae_random": ("fused", "mae_random"),
          "fused_bank_over_mae_random": ("fused_bank", "mae_random"),
          "reference_over_fused_bank": ("reference", "fused_bank")}
