"""AMGSN fine-tuning (docs/method.md §4.3): CE + debiased center loss + SupCon over two augmented views.

``finetune(FinetuneConfig(...))`` is what ``amgsn finetune`` runs. The recipe is MAE's ViT
fine-tuning (AdamW from timm's factory with layer-wise lr decay, drop path, per-step cosine with
warm-up, RandAugment + random erasing) with the debiasing terms added:

    L = CE(label_smoothing) + λ_center · DebiasedCenterLoss(pooled) + λ_supcon · SupCon(projection)

A stratified validation split carved from the training split (deterministic in the seed) drives
model selection by mean class accuracy; the test split is never looked at here. Output folder:
``config.json``, ``log.jsonl`` (one line per epoch), ``checkpoint-<epoch>.pth``,
``checkpoint-last.pth`` and ``checkpoint-best.pth`` (all atomic). Resuming from any of them with
the same configuration reproduces the uninterrupted run exactly (bit for bit on the CPU).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
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
from amgsn.engine.inference import predict_dataset, prediction_loader
from amgsn.metrics import classification_metrics, confusion_matrix
from amgsn.models import ViTClassifier
from amgsn.models.sizes import DEFAULT_SIZE

WEIGHTINGS = ("inverse", "effective", "none")
# MAE's RandAugment policy, with the magnitude capped at 9: at magnitude 10 timm's "increasing"
# posterize asks Pillow for 0 bits, which Pillow >= 11 rejects (a crash on ~0.15 % of images).
RAND_AUGMENT = "rand-m9-mstd0.5-inc1-mmax9"


@dataclass
class FinetuneConfig:
    """Every knob of a fine-tuning run (the CLI flags map 1:1; see ``amgsn finetune --help``).

    ``model`` / ``img_size`` / ``patch_size`` / ``depth`` left at None mean "whatever ``init``
    holds" (or :data:`~amgsn.models.sizes.DEFAULT_SIZE` from scratch); given explicitly, ``init``'s
    weights are fitted to them (position / patch embeddings resampled, surplus blocks ignored,
    missing ones initialised); another width is an error.
    """

    data_dir: str
    out: str
    dataset: str = "synthetic"
    init: str | None = None
    model: str | None = None
    img_size: int | None = None
    patch_size: int | None = None
    depth: int | None = None
    global_pool: str = "avg"
    proj_dim: int = 128
    num_classes: int | None = None  # AffectNet / FERPlus: 7 or 8
    classes: list[str] | None = None  # the class list of a "folder" data set
    epochs: int = 30
    batch_size: int = 64
    blr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    drop_path: float = 0.1
    warmup_epochs: float = 1.0
    clip_grad: float | None = None
    label_smoothing: float = 0.1
    lambda_center: float = 0.01
    lambda_supcon: float = 0.1
    center_weighting: str = "inverse"
    center_alpha: float = 0.5
    temperature: float = 0.07
    auto_augment: str | None = RAND_AUGMENT
    re_prob: float = 0.25
    balanced_sampler: bool = False
    val_fraction: float = 0.1
    seed: int = 0
    save_every: int = 1
    save_every_steps: int | None = None  # also write checkpoint-last.pth every N optimizer steps
    max_steps: int | None = None
    workers: int = 2
    device: str = "auto"
    resume: str | None = None
    skip_bad: bool = False
    cache_images: bool = False
    progress: bool = True
    compile: bool = False  # regional torch.compile of the classifier's blocks (amgsn.engine.compile)
    compile_mode: str | None = None

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "save_every", "proj_dim", "max_steps", "save_every_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must lie in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must lie in [0, 1), got {self.label_smoothing}")
        for name in ("lambda_center", "lambda_supcon", "weight_decay", "min_lr", "warmup_epochs", "drop_path"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if not (self.blr > 0 and math.isfinite(self.blr)):
            raise ValueError(f"--blr must be > 0, got {self.blr}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"--layer-decay must lie in (0, 1], got {self.layer_decay}")
        if not 0.0 < self.center_alpha <= 1.0:
            raise ValueError(f"--center-alpha must lie in (0, 1], got {self.center_alpha}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.center_weighting not in WEIGHTINGS:
            raise ValueError(f"--center-weighting must be one of {WEIGHTINGS}, got {self.center_weighting!r}")
        if self.init is not None and self.resume is not None:
            raise ValueError("--init and --resume exclude each other: a resumed run takes its weights "
                             "from the checkpoint")
        from amgsn.engine.compile import validate_options

        validate_options(self.compile, self.compile_mode, "dynamic")


# --------------------------------------------------------------------------- data


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split sample indices into (train, val), each class in proportion ``fraction``.

    Per class with n samples: ``round(fraction * n)`` go to validation, at least 1 when n >= 2
    (so rare classes are validated at all) and at most n - 1 (so every class is still trained
    on). A class with one sample stays in training. Deterministic in ``seed``; both lists sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must lie in [0, 1), got {fraction}")
    labels = torch.as_tensor(list(targets), dtype=torch.int64)
    if fraction == 0.0 or labels.numel() == 0:
        return list(range(labels.numel())), []
    gen = torch.Generator().manual_seed(seed)
    val: list[int] = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        n = members.numel()
        if n < 2:
            continue
        k = min(max(1, round(fraction * n)), n - 1)
        val += members[torch.randperm(n, generator=gen)[:k]].tolist()
    val_set = set(val)
    return [i for i in range(labels.numel()) if i not in val_set], sorted(val)


class SplitView(Dataset):
    """Samples ``indices`` of a FER data set with their own transform: ``view[j] -> (image, label, j)``.

    Lets the training and validation parts of one split share a single (possibly cached) data set
    while using different transforms.
    """

    def __init__(self, base: Any, indices: Sequence[int], transform: Callable | None) -> None:
        self.base = base
        self.indices = list(indices)
        self.transform = transform
        self.classes = list(base.classes)
        self.targets = [base.targets[i] for i in self.indices]
        counts = torch.bincount(torch.as_tensor(self.targets, dtype=torch.int64), minlength=len(self.classes))
        self.class_counts = [int(c) for c in counts[: len(self.classes)]]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[Any, int, int]:
        img = self.base.load_image(self.indices[j])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[j], j


def _dataset_kwargs(cfg: FinetuneConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_classes": cfg.num_classes, "skip_bad": cfg.skip_bad}
    if cfg.dataset == "folder":
        kwargs["classes"] = cfg.classes
    if cfg.cache_images:
        kwargs["cache"] = True
    return kwargs


def _build_splits(cfg: FinetuneConfig, base: Any, img_size: int) -> tuple[SplitView, SplitView | None]:
    """(training view, validation view or None) of the untransformed training split ``base``."""
    from amgsn.data import TwoViewTransform, build_eval_transform, build_finetune_transform

    train_idx, val_idx = stratified_split(base.targets, cfg.val_fraction, cfg.seed)
    tf = build_finetune_transform(img_size, auto_augment=cfg.auto_augment, re_prob=cfg.re_prob)
    # With λ_supcon = 0 the second view would be computed for nothing: one view then.
    train_tf = TwoViewTransform(tf) if cfg.lambda_supcon > 0 else tf
    train = SplitView(base, train_idx, train_tf)
    val = SplitView(base, val_idx, build_eval_transform(img_size)) if val_idx else None
    return train, val


# --------------------------------------------------------------------------- model


def model_config(model: ViTClassifier) -> dict[str, Any]:
    """What :func:`amgsn.engine.inference.build_classifier_from_state` needs to rebuild ``model``."""
    return {"model": model.model_name, "img_size": model.img_size, "patch_size": model.patch_size,
            "depth": model.depth, "in_chans": model.in_chans, "global_pool": model.global_pool,
            "num_classes": model.num_classes, "proj_dim": model.proj_head[-1].out_features}


def _requested_size(cfg: FinetuneConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in ("model", "img_size", "patch_size", "depth") if getattr(cfg, k) is not None}


def build_model(cfg: FinetuneConfig, num_classes: int) -> ViTClassifier:
    """The classifier, from scratch or initialised from ``cfg.init`` (anything
    :func:`amgsn.models.pretrained.read_init` reads: an ``amgsn pretrain`` checkpoint, an MAE
    checkpoint, timm weights, ``timm:<name.tag>``, ``hf-hub:<repo>``); the load summary is printed on
    rank 0. ValueError on a wrong kind or an irreconcilable size."""
    common = {"global_pool": cfg.global_pool, "drop_path_rate": cfg.drop_path, "proj_dim": cfg.proj_dim}
    size = _requested_size(cfg)
    if cfg.init is None:
        size = {**DEFAULT_SIZE, **size}
        name = size.pop("model")
        return ViTClassifier(name, num_classes, **size, **common)
    model = ViTClassifier.from_init(cfg.init, num_classes, **size, **common, in_chans=3)  # the loaders give RGB
    if distributed.info().is_main:
        print(model.init_report.summary(), flush=True)
    return model


class _TrainForward(nn.Module):
    """One forward for DDP: pooled features, logits and (if SupCon is on) the projection."""

    def __init__(self, model: ViTClassifier, project: bool) -> None:
        super().__init__()
        self.model = model
        self.project = project

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        pooled, logits = self.model.forward_features_and_logits(x)
        return pooled, logits, self.model.project(pooled) if self.project else None


# --------------------------------------------------------------------------- loop pieces


def finetune_loss(
    model_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    labels: torch.Tensor,
    center: nn.Module | None,
    supcon: nn.Module | None,
    cfg: FinetuneConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective of one step (docs/method.md §4.3) from one :class:`_TrainForward` output.

    ``L = CE(label_smoothing) + λ_center · center(pooled) + λ_supcon · SupCon(projection)``.

    Args:
        model_out: (pooled (V·B, E), logits (V·B, C), projection (V·B, P) or None) of the V views
            stacked view-major (``torch.cat(views)``); V = 1 without SupCon.
        labels: (B,) int64, one per sample (every view has its sample's label).
        center: a :class:`~amgsn.losses.DebiasedCenterLoss` or None (term off).
        supcon: a :class:`~amgsn.losses.SupConLoss` or None (term off; ``projection`` may be None).
        cfg: gives ``label_smoothing``, ``lambda_center`` and ``lambda_supcon``.

    Returns:
        (total loss, {"ce", "center", "supcon"} 0-dim float32 terms, unweighted; 0 for a term off).
        Under DDP with equal per-rank batches, the ranks' averaged gradient equals the gradient
        of one process with the whole batch: CE is a mean over equal shares, and the center and
        SupCon modules work on the global batch (see their docstrings). The center and SupCon
        values are those of the global batch, CE is this rank's.
    """
    pooled, logits, proj = model_out
    b = labels.shape[0]
    if b == 0 or logits.shape[0] % b != 0:
        raise ValueError(f"model outputs have {logits.shape[0]} rows, not a multiple of the {b} labels")
    views = logits.shape[0] // b
    all_labels = labels.repeat(views)
    # CE and the center loss see every view.
    loss_ce = F.cross_entropy(logits.float(), all_labels, label_smoothing=cfg.label_smoothing)
    loss = loss_ce
    zero = torch.zeros((), device=logits.device)
    loss_center = loss_supcon = zero
    if center is not None:
        loss_center = center(pooled.float(), all_labels)
        loss = loss + cfg.lambda_center * loss_center
    if supcon is not None:
        if proj is None:
            raise ValueError("SupCon is on but the model output holds no projection")
        # Re-normalised in float32: under bf16 autocast the head's normalisation is only ~1e-2 exact.
        z = F.normalize(proj.float(), dim=-1).view(views, b, -1).transpose(0, 1)  # (B, V, D)
        loss_supcon = supcon(z, labels)
        loss = loss + cfg.lambda_supcon * loss_supcon
    return loss, {"ce": loss_ce, "center": loss_center, "supcon": loss_supcon}


def _balanced_sampler(train: SplitView, cfg: FinetuneConfig, epoch: int):
    from amgsn.data import build_balanced_sampler

    dist = distributed.info()
    # A fresh generator per (seed, epoch, rank): the draws of epoch e are the same after a resume,
    # and each rank draws its own share.
    gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch) * 1_009 + dist.rank)
    return build_balanced_sampler(train.targets, len(train) // dist.world_size, generator=gen,
                                  num_classes=len(train.classes))


@torch.no_grad()
def _validate(
    model: ViTClassifier, val: SplitView | None, val_loader: DataLoader | None, cfg: FinetuneConfig, device: str
) -> dict[str, Any]:
    if val is None:
        return {"val_accuracy": None, "val_mean_class_accuracy": None, "val_std_per_class_ddof0": None}
    pred = predict_dataset(model, val, device=device, progress=cfg.progress, desc="validate", loader=val_loader)
    m = classification_metrics(confusion_matrix(pred.labels, pred.preds, len(val.classes)), val.classes)
    return {"val_accuracy": m["accuracy"], "val_mean_class_accuracy": m["mean_class_accuracy"],
            "val_std_per_class_ddof0": m["std_per_class_ddof0"]}


def _checkpoint_state(cfg, model, optimizer, center, classes, num_images, epoch, global_step, best) -> dict[str, Any]:
    return {
        "kind": "finetune",
        "args": dataclasses.asdict(cfg),
        "model_config": model_config(model),
        "classes": list(classes),
        "num_images": num_images,  # of the training split, validation part included
        "epoch": epoch,
        "global_step": global_step,  # the schedule is a function of the step: this is its whole state
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "center_loss": center.state_dict() if center is not None else None,
        "best_metric": best["metric"],
        "best_epoch": best["epoch"],
        **ckpt.rng_entries(),
    }


def _check_resume(state: dict[str, Any], cfg: FinetuneConfig, classes: list[str], num_train_images: int) -> None:
    src = cfg.resume
    if list(state["classes"]) != list(classes):
        raise ValueError(f"{src} was trained on classes {state['classes']}, the data set has {classes}")
    mc = state["model_config"]
    bad = [f"{k}: checkpoint {mc[k]!r}, requested {v!r}" for k, v in _requested_size(cfg).items() if mc.get(k) != v]
    args = state.get("args", {})
    # The validation split is a function of (seed, val_fraction, data set): all must be the same.
    for key in ("seed", "val_fraction", "lambda_supcon", "lambda_center"):
        if key in args and args[key] != getattr(cfg, key):
            bad.append(f"{key}: checkpoint {args[key]!r}, requested {getattr(cfg, key)!r}")
    if state.get("num_images") not in (None, num_train_images):
        bad.append(f"training images: checkpoint {state['num_images']}, data set {num_train_images}")
    if bad:
        raise ValueError(f"cannot resume from {src}: " + "; ".join(bad))


# --------------------------------------------------------------------------- the run


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume) fine-tuning; returns a summary: the last epoch's log record plus ``out``,
    ``checkpoint`` (best), ``checkpoint_last``, ``best_metric``, ``best_epoch`` and ``rank`` (this
    process's, so that only rank 0 reports under torchrun)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    dist = distributed.init(device)
    if device == "cuda" and dist.enabled:
        device = f"cuda:{dist.local_rank}"
    out = Path(cfg.out)
    ckpt.seed_everything(cfg.seed + dist.rank)

    state = ckpt.load_checkpoint(cfg.resume, kind="finetune") if cfg.resume else None
    # The data set is read first (untransformed: the views add the transforms), because its
    # number of classes sizes the head and the model's image size sizes the transforms.
    from amgsn.data import build_dataset

    base = build_dataset(cfg.dataset, cfg.data_dir, "train", **_dataset_kwargs(cfg))
    classes = list(base.classes)
    if state is not None:
        from amgsn.engine.inference import build_classifier_from_state

        model = build_classifier_from_state(state, drop_path_rate=cfg.drop_path)
    else:
        model = build_model(cfg, len(classes))
    train, val = _build_splits(cfg, base, model.img_size)
    if state is not None:
        _check_resume(state, cfg, classes, len(base))
    model.to(device)
    compiled_since = None  # the compile counts at the start (--compile)
    if cfg.compile:
        from amgsn.engine.compile import compile_classifier, compile_stats

        compile_classifier(model, mode=cfg.compile_mode)
        compiled_since = compile_stats()

    from amgsn.losses import DebiasedCenterLoss, SupConLoss

    embed_dim = model.vit.embed_dim
    center = None
    if cfg.lambda_center > 0:
        # Weights from the part of the split that is trained on (validation samples excluded).
        # check_finite off: a non-finite loss is the NonFiniteGuard's to skip, not a hard error
        # (and it saves a host sync per step on CUDA).
        center = DebiasedCenterLoss(len(classes), embed_dim, class_counts=train.class_counts,
                                    weighting=cfg.center_weighting, alpha=cfg.center_alpha,
                                    check_finite=False).to(device)
    supcon = SupConLoss(temperature=cfg.temperature) if cfg.lambda_supcon > 0 else None

    from timm.optim import create_optimizer_v2

    lr = effective_lr(cfg.blr, cfg.batch_size, 1, dist.world_size)
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=cfg.weight_decay,
                                    layer_decay=cfg.layer_decay)
    steps_per_epoch = len(train) // (cfg.batch_size * dist.world_size)
    if steps_per_epoch < 1:
        raise ValueError(f"the training part of the split ({len(train)} images after carving "
                         f"{0 if val is None else len(val)} for validation) is smaller than one batch "
                         f"({cfg.batch_size} x {dist.world_size} ranks): lower --batch-size")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = cosine_scheduler(optimizer, total_steps, round(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr)

    start_epoch, global_step = 0, 0
    best: dict[str, Any] = {"metric": None, "epoch": None}
    guard = NonFiniteGuard()
    in_epoch: dict[str, Any] | None = None  # where a run stopped inside an epoch (preemption)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if center is not None:
            if state.get("center_loss") is None:
                raise ValueError(f"{cfg.resume} holds no center-loss state")
            center.load_state_dict(state["center_loss"])
        ckpt.restore_rng(state)
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        best = {"metric": state.get("best_metric"), "epoch": state.get("best_epoch")}
        in_epoch = resume_inside_epoch(state, guard, cfg.batch_size, cfg.resume)
        if in_epoch is not None:
            start_epoch = in_epoch["epoch"]
        del state

    step_fn: nn.Module = _TrainForward(model, project=supcon is not None)
    if dist.enabled:
        step_fn = nn.parallel.DistributedDataParallel(
            step_fn, device_ids=[dist.local_rank] if device.startswith("cuda") else None,
            find_unused_parameters=supcon is None)  # the projection head is idle without SupCon
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_config(out, {"stage": "finetune", **dataclasses.asdict(cfg), "classes": classes,
                           "model_config": model_config(model), "num_train": len(train),
                           "num_val": 0 if val is None else len(val), "train_class_counts": train.class_counts,
                           "lr": lr, "world_size": dist.world_size, "device": device})
    log = JsonlLog(out / "log.jsonl", enabled=dist.is_main)
    record: dict[str, Any] = {}
    done = global_step >= total_steps
    # Both loaders keep their worker processes for the whole run.
    val_loader = None if val is None else prediction_loader(val, device=device, batch_size=cfg.batch_size,
                                                            workers=cfg.workers, persistent=True)
    balanced = partial(_balanced_sampler, train, cfg) if cfg.balanced_sampler else None
    train_loader = TrainLoader(train, batch_size=cfg.batch_size, seed=cfg.seed, shuffle=True, drop_last=True,
                               workers=cfg.workers, sampler_for_epoch=balanced)

    def save(epoch: int, position: dict[str, Any] | None, improved: bool = False) -> Path | None:
        """checkpoint-last.pth (+ -<epoch> / -best at an epoch's end) on rank 0; every rank calls
        (the per-rank RNG gather is a collective). ``position``: where inside ``epoch`` the run is."""
        snap = _checkpoint_state(cfg, model, optimizer, center, classes, len(base), epoch - (position is not None),
                                 global_step, best)
        snap["in_epoch"], snap["guard"] = position, guard.state_dict()
        if not dist.is_main:
            return None
        if position is None:
            if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs or done:
                ckpt.save_atomic(snap, out / f"checkpoint-{epoch}.pth")
            if improved:
                ckpt.save_atomic(snap, out / "checkpoint-best.pth")
        return ckpt.save_atomic(snap, out / "checkpoint-last.pth")

    with StopSignals() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            if done:
                break
            model.train()
            # Log sums: loss, ce, center, supcon (sample-weighted), images — on the device, so a step costs
            # no host sync beyond the non-finite check (the progress bar reads them every PROGRESS_EVERY).
            tally = EpochTally(epoch, steps_per_epoch, 5, device, guard, in_epoch)
            sums = tally.sums
            loader = train_loader.epoch(epoch, tally.first_batch)
            bar = tqdm(loader, desc=f"finetune {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                       disable=not (cfg.progress and dist.is_main))
            for i, (imgs, labels, _idx) in enumerate(bar, start=tally.first_batch):
                # Two views -> one 2B batch through the encoder; CE and center loss see both views.
                x = torch.cat(imgs) if isinstance(imgs, (list, tuple)) else imgs
                x = x.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                b = labels.shape[0]
                scheduler.step_update(global_step)
                with autocast(device):
                    out_step = step_fn(x)
                loss, parts = finetune_loss(out_step, labels, center, supcon, cfg)
                optimizer.zero_grad(set_to_none=True)
                stepped = guard.check(loss, f"epoch {epoch} batch {i}", stop)
                if stepped:
                    loss.backward()
                    if cfg.clip_grad:
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    optimizer.step()
                    if center is not None:
                        # After the optimiser step (docs/method.md §4.3); all-reduced across ranks inside.
                        pooled = out_step[0]
                        center.update_centers(pooled.detach().float(), labels.repeat(pooled.shape[0] // b))
                    global_step += 1
                    terms = [loss, parts["ce"], parts["center"], parts["supcon"]]
                    sums += torch.cat([torch.stack(terms).detach().to(sums) * b, sums.new_tensor([b])])
                    if not bar.disable and i % PROGRESS_EVERY == 0:
                        bar.set_postfix(loss=f"{float(sums[0]) / max(float(sums[4]), 1):.4f}",
                                        lr=f"{max(g['lr'] for g in optimizer.param_groups):.2e}")
                    done = global_step >= total_steps
                # Inside the epoch: a stop signal, or --save-every-steps.
                if i + 1 < steps_per_epoch and not done:
                    save_inside_epoch(stop, tally, i + 1, cfg.save_every_steps, stepped, global_step,
                                      partial(save, epoch), "finetune")
                if done:
                    break
            elapsed = tally.seconds()
            totals = distributed.all_reduce_sum(sums).tolist()
            n = max(totals[4], 1.0)
            metrics = _validate(model, val, val_loader, cfg, device)
            record = {
                "stage": "finetune", "epoch": epoch, "step": global_step,
                "loss": totals[0] / n, "loss_ce": totals[1] / n, "loss_center": totals[2] / n,
                "loss_supcon": totals[3] / n, "lr": max(g["lr"] for g in optimizer.param_groups),
                **metrics, "images_per_s": totals[4] / max(elapsed, 1e-9),
                "skipped_steps": tally.skipped, "seconds": elapsed,
                "finished_at": time.time(),  # unix time; consecutive records -> an epoch's whole cost
            }
            if compiled_since is not None:
                from amgsn.engine.compile import stats_since

                record.update(stats_since(compiled_since))
            score = metrics["val_mean_class_accuracy"]
            # Strictly better only: on a tie the earlier (less trained) epoch stays the best.
            improved = score is None or best["metric"] is None or score > best["metric"]
            if improved:
                best = {"metric": score, "epoch": epoch}
            record["best_epoch"] = best["epoch"]
            log.write(record)
            path = save(epoch, None, improved)
            if dist.is_main and cfg.progress:
                val_txt = "" if score is None else (f", val acc {metrics['val_accuracy']:.3f}, "
                                                    f"val mean class acc {score:.3f}")
                tqdm.write(f"finetune epoch {epoch}: loss {record['loss']:.4f}{val_txt}, "
                           f"{record['images_per_s']:.1f} img/s")
            if stop.agreed and not done and epoch + 1 < cfg.epochs:
                preempt(stop, lambda p=path: p, "finetune", f"step {global_step} (the end of epoch {epoch})")
    distributed.barrier()
    return {**record, "out": str(out), "checkpoint": str(out / "checkpoint-best.pth"),
            "checkpoint_last": str(out / "checkpoint-last.pth"), "best_metric": best["metric"],
            "best_epoch": best["epoch"], "classes": classes, "rank": dist.rank}
