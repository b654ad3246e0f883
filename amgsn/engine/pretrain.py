"""AMGSN pre-training (docs/method.md §4.1, §4.2): MAE whose masks come from ABMG, with per-image MRUS ratios.

``pretrain(PretrainConfig(...))`` is what ``amgsn pretrain`` runs. Each step: the policy picks the
visible patches (random in warm-up, else the teacher's last-block CLS attention + noise, most
salient masked), the packed encoder + decoder reconstruct, the per-image losses update the ratio
bank. Output folder: ``config.json``, ``log.jsonl`` (one line per epoch), ``checkpoint-<e>.pth`` /
``checkpoint-last.pth`` (atomic), ``mask_gallery/{start,end}.npz``.

``--saliency-refresh P`` < 1 (docs/method.md §4.4) adds the saliency bank: the loader hands each view's
crop box and flip (and the whole image) to the step, the teacher runs on the whole images of
``ceil(P * B)`` images of the batch (never-seen first, then the oldest maps), every view reads its scores
out of the bank; the ranks gather the refreshed maps so every rank's bank is the same; the bank is
checkpointed; each epoch logs ``saliency_agreement`` (Spearman, bank vs a fresh teacher pass, on a
fixed probe batch). P = 1 is §4.1 exactly.

``--compile`` (docs/method.md §9.3, :mod:`amgsn.engine.compile`) runs the blocks, the decoder's entry and
the loss compiled; each epoch's log line then also holds ``compiles`` (graphs per region so far in this
process), ``recompiles`` and ``compile_s``. Checkpoints are the same either way.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from amgsn.engine import checkpoint as ckpt
from amgsn.engine import distributed
from amgsn.engine.common import (
    PROGRESS_EVERY,
    EpochTally,
    JsonlLog,
    NonFiniteGuard,
    StopSignals,
    TrainLoader,
    autocast,
    cosine_scheduler,
    effective_lr,
    preempt,
    resolve_device,
    resume_inside_epoch,
    save_inside_epoch,
    write_config,
)
from amgsn.masking import MaskingPolicy, RatioBank, SaliencyBank, SaliencyRefresh, spearman
from amgsn.masking.saliency_bank import IDENTITY_VIEW
from amgsn.models import MaskedAutoencoderViT
from amgsn.models.sizes import DEFAULT_SIZE
from amgsn.ops import abmg_select, cls_attention_scores


@dataclass
class PretrainConfig:
    """Every knob of a pre-training run (the CLI flags map 1:1; see ``amgsn pretrain --help``)."""

    data_dir: str
    out: str
    dataset: str = "synthetic"
    # Pre-trained weights (amgsn.models.pretrained.read_init): a file, timm:<name.tag> or hf-hub:<repo>.
    # model / img_size / patch_size / depth / decoder_depth left at None come from them (from scratch:
    # amgsn.models.sizes.DEFAULT_SIZE); given, the weights are fitted to them (resampled).
    init: str | None = None
    model: str | None = None
    img_size: int | None = None
    patch_size: int | None = None
    depth: int | None = None
    decoder_depth: int | None = None
    mask_mode: str = "abmg_mrus"
    mask_ratio: float = 0.75  # fixed ratio (random/abmg) and the bank's r0 (abmg_mrus)
    ratio_min: float = 0.5
    ratio_max: float = 0.9
    eta: float = 0.05
    ratio_momentum: float = 0.9  # EMA momentum of MRUS's running mean loss
    sigma: float = 0.5
    abmg_warmup: int | None = None  # epochs of random masking; default 10 % of --epochs
    teacher: str = "online"
    ema: float = 0.999
    impl: str = "fused"
    saliency_refresh: float = 1.0  # P: fraction of each batch the teacher sees (< 1: the saliency bank, §4.4)
    epochs: int = 20
    batch_size: int = 64
    accum: int = 1
    blr: float = 1.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    max_steps: int | None = None
    seed: int = 0
    save_every: int = 1
    save_every_steps: int | None = None  # also write checkpoint-last.pth every N optimizer steps
    workers: int = 2
    device: str = "auto"
    resume: str | None = None
    skip_bad: bool = False
    gallery_per_class: int = 2
    progress: bool = True
    cache_images: bool = True
    compile: bool = False  # regional torch.compile (amgsn.engine.compile)
    compile_mode: str | None = None  # torch.compile mode (default / reduce-overhead / max-autotune...)
    compile_shapes: str = "dynamic"  # the packed encoder's T: dynamic, or bucket

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "accum", "img_size", "patch_size", "save_every", "max_steps",
                     "save_every_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ValueError(f"--mask-ratio must lie in [0, 1], got {self.mask_ratio}")
        if not 0.0 < self.saliency_refresh <= 1.0:
            raise ValueError(f"--saliency-refresh must lie in (0, 1], got {self.saliency_refresh}")
        from amgsn.engine.compile import validate_options

        validate_options(self.compile, self.compile_mode, self.compile_shapes)

    @property
    def uses_saliency_bank(self) -> bool:
        """P < 1 with a saliency-guided mask mode: the saliency bank of docs/method.md §4.4."""
        return self.saliency_refresh < 1.0 and self.mask_mode != "random"


def _build_model(cfg: PretrainConfig) -> tuple[MaskedAutoencoderViT, PretrainConfig]:
    """The MAE (from scratch, or from ``cfg.init``: its load summary printed on rank 0) and ``cfg`` with
    the sizes it was built with (those left at None filled in)."""
    size = {k: getattr(cfg, k) for k in ("model", "img_size", "patch_size", "depth", "decoder_depth")}
    if cfg.init is None:
        model = MaskedAutoencoderViT(**{**DEFAULT_SIZE, **{k: v for k, v in size.items() if v is not None}})
    else:
        model = MaskedAutoencoderViT.from_init(cfg.init, **size, in_chans=3)  # the loaders give RGB
        if distributed.info().is_main:
            print(model.init_report.summary(), flush=True)
    c = model.config
    return model, dataclasses.replace(cfg, model=c["model"], img_size=c["img_size"], patch_size=c["patch_size"],
                                      depth=c["depth"], decoder_depth=c["decoder_depth"])


def _load_train_set(cfg: PretrainConfig):
    from amgsn.data import build_dataset
    from amgsn.data.transforms import build_pretrain_transform

    # Decode once: small sets are cached in memory (the loader must not be the step's bottleneck).
    # With the saliency bank each item is ((image, view, whole image), label, index): the same image, same draws.
    tf = build_pretrain_transform(cfg.img_size, record_view=cfg.uses_saliency_bank)
    return build_dataset(cfg.dataset, cfg.data_dir, "train", transform=tf, skip_bad=cfg.skip_bad,
                         cache=cfg.cache_images)


PROBE_SIZE = 64  # images in the saliency-agreement probe batch


def _saliency_probe(dataset, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed probe batch of the saliency guard: ``PROBE_SIZE`` images spread over the training set,
    each with one view drawn once from a seed of its own (epoch key -1: no training epoch draws it)
    -> (indices (P,) CPU, images (P, C, H, W), views (P, 5)) on ``device``."""
    from amgsn.engine.common import SeededItems

    items = SeededItems(dataset, seed)
    indices = torch.linspace(0, len(dataset) - 1, min(PROBE_SIZE, len(dataset))).round().long().unique()
    imgs, views, _ = zip(*(items[(-1, int(i))][0] for i in indices))
    return indices, torch.stack(imgs).to(device), torch.stack(views).to(device)


@torch.no_grad()
def saliency_agreement(policy: MaskingPolicy, model: MaskedAutoencoderViT, sal_bank: SaliencyBank,
                       probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float | None:
    """Mean over the probe images the bank has seen of the Spearman rank correlation between the bank's
    scores for the probe views and a fresh teacher pass on the same views (None: none seen yet)."""
    indices, imgs, views = probe
    seen = sal_bank.seen(indices)
    if not bool(seen.any()):
        return None
    stored = sal_bank.read(indices, views)
    fresh = policy.teacher_scores(model, imgs)
    rho = spearman(stored, fresh)
    return float(rho[seen].mean())


def _write_refreshed(sal_bank: SaliencyBank, refreshed: SaliencyRefresh, device: str) -> None:
    """Every rank writes every rank's refreshed maps, in rank order: the banks stay identical. (One
    process: the indices stay on the host — no device round trip, no sync.)"""
    if not distributed.info().enabled:
        sal_bank.write(refreshed.indices, refreshed.scores, refreshed.views)
        return
    idx = distributed.all_gather_cat(refreshed.indices.to(device)).cpu()
    scores = distributed.all_gather_cat(refreshed.scores.float())
    views = distributed.all_gather_cat(refreshed.views.float())
    sal_bank.write(idx, scores, views)


@torch.no_grad()
def write_mask_gallery(model: MaskedAutoencoderViT, cfg: PretrainConfig, path: Path, device: str,
                       sal_bank: SaliencyBank | None = None) -> None:
    """A few faces per class with the patches ABMG masks (no noise: pure saliency) and random ones; with
    a saliency bank also the patches its stored maps mask (``bank_mask``, ``bank_seen``)."""
    from amgsn.data import build_dataset
    from amgsn.data.transforms import build_eval_transform

    raw = build_dataset(cfg.dataset, cfg.data_dir, "train", skip_bad=cfg.skip_bad)
    per_class: dict[int, list[int]] = {}
    for i, y in enumerate(raw.targets):
        if len(per_class.setdefault(y, [])) < cfg.gallery_per_class:
            per_class[y].append(i)
    picks = [i for y in sorted(per_class) for i in per_class[y]]
    tf = build_eval_transform(cfg.img_size)
    images, tensors, labels = [], [], []
    for i in picks:
        img, label, _ = raw[i]
        img = img.convert("RGB").resize((cfg.img_size, cfg.img_size))
        images.append(np.asarray(img, dtype=np.uint8))
        tensors.append(tf(img))
        labels.append(label)
    x = torch.stack(tensors).to(device)
    was_training = model.training
    model.eval()
    q, k, _ = model.teacher_qk(x)
    model.train(was_training)
    B, N = x.shape[0], model.num_patches
    abmg = abmg_select(cls_attention_scores(q, k), cfg.mask_ratio).mask
    gen = torch.Generator().manual_seed(cfg.seed)
    rand = abmg_select(torch.zeros(B, N), cfg.mask_ratio, torch.rand(B, N, generator=gen)).mask
    extra = {}
    if sal_bank is not None:  # the bank's masks of the same (whole, unflipped) images, beside the fresh ones
        views = torch.tensor([IDENTITY_VIEW] * B, device=device)
        extra = {"bank_mask": abmg_select(sal_bank.read(picks, views), cfg.mask_ratio).mask.cpu().numpy(),
                 "bank_seen": sal_bank.seen(picks).numpy()}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=np.stack(images), labels=np.asarray(labels), abmg_mask=abmg.cpu().numpy(),
                        random_mask=rand.numpy(), patch_size=np.asarray(cfg.patch_size),
                        classes=np.asarray(list(raw.classes)), **extra)


def _checkpoint_state(cfg, model, optimizer, scaler, bank, policy, epoch: int, global_step: int,
                      sal_bank: SaliencyBank | None = None) -> dict:
    extra = {} if sal_bank is None else {"saliency_bank": sal_bank.state_dict()}  # P = 1: today's layout
    return {
        "kind": "pretrain",
        "args": dataclasses.asdict(cfg),
        "model_config": model.config,
        "epoch": epoch,
        "global_step": global_step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "ratio_bank": bank.state_dict(),
        "policy": policy.state_dict(),
        **extra,
        **ckpt.rng_entries(),
    }


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) pre-training; returns a summary (last epoch's log record + paths)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    dist = distributed.init(device)
    if device == "cuda" and dist.enabled:
        device = f"cuda:{dist.local_rank}"
    out = Path(cfg.out)
    ckpt.seed_everything(cfg.seed + dist.rank)

    model, cfg = _build_model(cfg)  # cfg: with the sizes the model has (from --init where not given)
    model = model.to(device)
    dataset = _load_train_set(cfg)
    policy = MaskingPolicy(cfg.mask_mode, epochs=cfg.epochs, warmup_epochs=cfg.abmg_warmup, sigma=cfg.sigma,
                           impl=cfg.impl, teacher=cfg.teacher, ema_decay=cfg.ema)
    bank = RatioBank(len(dataset), r0=cfg.mask_ratio, eta=cfg.eta, r_min=min(cfg.ratio_min, cfg.mask_ratio),
                     r_max=max(cfg.ratio_max, cfg.mask_ratio), momentum=cfg.ratio_momentum)
    sal_bank = (SaliencyBank(len(dataset), cfg.img_size // cfg.patch_size, cfg.saliency_refresh, device,
                             impl=cfg.impl) if cfg.uses_saliency_bank else None)
    compiled_since = None  # the compile counts at the start (--compile)
    if cfg.compile:
        from amgsn.engine.compile import compile_mae, compile_stats

        ratio_range = (bank.r_min, bank.r_max) if policy.uses_ratio_bank else (cfg.mask_ratio, cfg.mask_ratio)
        compile_mae(model, mode=cfg.compile_mode, shapes=cfg.compile_shapes, batch_size=cfg.batch_size,
                    ratio_range=ratio_range)
        compiled_since = compile_stats()
    from timm.optim import param_groups_weight_decay

    lr = effective_lr(cfg.blr, cfg.batch_size, cfg.accum, dist.world_size)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, cfg.weight_decay), lr=lr, betas=(0.9, 0.95),
                                  foreach=True)
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # bf16 autocast needs no loss scaling
    local_batches = len(dataset) // (cfg.batch_size * dist.world_size)
    if local_batches < cfg.accum:
        raise ValueError(f"the training set ({len(dataset)} images) is smaller than one optimiser step "
                         f"(batch {cfg.batch_size} x accum {cfg.accum} x {dist.world_size} ranks)")
    steps_per_epoch = local_batches // cfg.accum
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = cosine_scheduler(optimizer, total_steps, cfg.warmup_epochs * steps_per_epoch, cfg.min_lr)

    start_epoch, global_step = 0, 0
    guard = NonFiniteGuard()
    in_epoch: dict[str, Any] | None = None  # where a run stopped inside an epoch (preemption)
    if cfg.resume:
        state = ckpt.load_checkpoint(cfg.resume, kind="pretrain")
        if state["model_config"] != model.config:
            raise ValueError(f"{cfg.resume} was made for model {state['model_config']}, this run builds "
                             f"{model.config}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        bank.load_state_dict(state["ratio_bank"])
        policy.load_state_dict(state["policy"], model)
        if sal_bank is not None and state.get("saliency_bank") is not None:
            sal_bank.load_state_dict(state["saliency_bank"])
        ckpt.restore_rng(state)
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        in_epoch = resume_inside_epoch(state, guard, cfg.batch_size, cfg.resume)
        if in_epoch is not None:
            start_epoch = in_epoch["epoch"]
        del state

    ddp_model = model
    if dist.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank]
                                                              if device.startswith("cuda") else None)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_config(out, {"stage": "pretrain", **dataclasses.asdict(cfg), "num_images": len(dataset),
                           "lr": lr, "world_size": dist.world_size, "device": device})
        if not cfg.resume:
            write_mask_gallery(model, cfg, out / "mask_gallery" / "start.npz", device)
    log = JsonlLog(out / "log.jsonl", enabled=dist.is_main)
    record: dict[str, Any] = {}
    done = global_step >= total_steps
    train_loader = TrainLoader(dataset, batch_size=cfg.batch_size, seed=cfg.seed, shuffle=True, drop_last=True,
                               workers=cfg.workers)
    probe = None  # the saliency guard's fixed probe batch (built at the first epoch's end, rank 0)

    def save_last(epoch: int, position: dict[str, Any] | None) -> Path | None:
        """checkpoint-last.pth (rank 0; the per-rank RNG gather is a collective: every rank calls).
        ``position``: where inside ``epoch`` the run is, or None after the epoch's last step."""
        state = _checkpoint_state(cfg, model, optimizer, scaler, bank, policy, epoch - (position is not None),
                                  global_step, sal_bank)
        state["in_epoch"], state["guard"] = position, guard.state_dict()
        if not dist.is_main:
            return None
        if position is None and ((epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs or done):
            ckpt.save_atomic(state, out / f"checkpoint-{epoch}.pth")
        return ckpt.save_atomic(state, out / "checkpoint-last.pth")

    with StopSignals() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            if done:
                break
            model.train()
            # Log sums: loss x images, images (the progress bar reads them every PROGRESS_EVERY steps;
            # MRUS's bank update needs the per-image losses on the host anyway).
            tally = EpochTally(epoch, local_batches, 2, device, guard, in_epoch)
            sums = tally.sums
            loader = train_loader.epoch(epoch, tally.first_batch)
            bar = tqdm(loader, desc=f"pretrain {epoch + 1}/{cfg.epochs}",
                       disable=not (cfg.progress and dist.is_main), leave=False, dynamic_ncols=True)
            optimizer.zero_grad(set_to_none=True)
            for i, (imgs, _labels, indices) in enumerate(bar, start=tally.first_batch):
                views = wholes = None
                if sal_bank is not None:
                    imgs, views, wholes = imgs
                imgs = imgs.to(device, non_blocking=True)
                ratios = bank.ratios(indices) if policy.uses_ratio_bank else cfg.mask_ratio
                with autocast(device):
                    batch = policy.select(model, imgs, ratios, epoch, bank=sal_bank, indices=indices, views=views,
                                          wholes=wholes)
                    result = ddp_model(imgs, masked=(batch.visible, batch.selection), encoder=batch.encoder)
                stepped = False
                if guard.check(result.loss.detach(), f"epoch {epoch} batch {i}", stop):
                    (result.loss / cfg.accum).backward()
                    if batch.refreshed is not None:
                        _write_refreshed(sal_bank, batch.refreshed, device)
                    if policy.uses_ratio_bank:
                        all_idx = distributed.all_gather_cat(indices.to(device)).cpu()
                        all_loss = distributed.all_gather_cat(result.per_image_loss.detach().float()).cpu()
                        bank.update(all_idx, all_loss)
                    sums += torch.stack([result.loss.detach().double() * imgs.shape[0],
                                         sums.new_tensor(imgs.shape[0])])
                    if (i + 1) % cfg.accum == 0:
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        global_step += 1
                        stepped = True
                        scheduler.step_update(global_step)
                        policy.update_teacher(model)
                        if not bar.disable and global_step % PROGRESS_EVERY == 0:
                            bar.set_postfix(loss=f"{float(sums[0]) / max(float(sums[1]), 1):.4f}",
                                            lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                            ratio=f"{bank.summary()['mean']:.3f}")
                        done = global_step >= total_steps
                else:
                    optimizer.zero_grad(set_to_none=True)
                # Between optimizer steps and inside the epoch: a stop signal, or --save-every-steps.
                if (i + 1) % cfg.accum == 0 and i + 1 < local_batches and not done:
                    save_inside_epoch(stop, tally, i + 1, cfg.save_every_steps, stepped, global_step,
                                      partial(save_last, epoch), "pretrain")
                if done:
                    break
            elapsed = tally.seconds()
            totals = distributed.all_reduce_sum(sums).tolist()
            counts, edges = bank.histogram(10)
            summary = bank.summary()
            record = {
                "stage": "pretrain", "epoch": epoch, "step": global_step,
                "loss": totals[0] / max(totals[1], 1), "lr": optimizer.param_groups[0]["lr"],
                "mask_mode": cfg.mask_mode, "abmg_active": policy.uses_abmg(epoch),
                "ratio_mean": summary["mean"], "ratio_min": summary["min"], "ratio_max": summary["max"],
                "ratio_hist": {"edges": edges, "counts": counts},
                "images_per_s": totals[1] / max(elapsed, 1e-9), "skipped_steps": tally.skipped,
                "seconds": elapsed, "finished_at": time.time(),  # unix time; consecutive records -> an epoch's cost
            }
            if compiled_since is not None:
                from amgsn.engine.compile import stats_since

                record.update(stats_since(compiled_since))
            if sal_bank is not None:
                if probe is None and dist.is_main:
                    probe = _saliency_probe(dataset, cfg.seed, device)
                record.update({"saliency_refresh": cfg.saliency_refresh, "saliency_coverage": sal_bank.coverage(),
                               "saliency_agreement": saliency_agreement(policy, model, sal_bank, probe)
                               if dist.is_main else None})
            log.write(record)
            path = save_last(epoch, None)
            if dist.is_main and cfg.progress:
                tqdm.write(f"pretrain epoch {epoch}: loss {record['loss']:.4f}, ratio mean {summary['mean']:.3f}, "
                           f"{record['images_per_s']:.1f} img/s")
            if stop.agreed and not done and epoch + 1 < cfg.epochs:
                preempt(stop, lambda p=path: p, "pretrain", f"step {global_step} (the end of epoch {epoch})")
    if dist.is_main and record:
        write_mask_gallery(model, cfg, out / "mask_gallery" / "end.npz", device, sal_bank)
    distributed.barrier()
    return {**record, "out": str(out), "checkpoint": str(out / "checkpoint-last.pth"),
            "ratio_bank": bank.all_ratios, "rank": dist.rank,
            "saliency_bank": None if sal_bank is None else sal_bank.state_dict()}
