"""Pieces every training loop shares: device and autocast, deterministic per-epoch loaders,
the per-step cosine schedule (timm), JSON-lines logs, and the non-finite-loss guard."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from amgsn.engine import distributed

# Training loops refresh the progress bar's loss every this many steps: reading it is a host sync.
PROGRESS_EVERY = 10
MAX_BAD_STEPS = 5  # consecutive non-finite losses before a run stops


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return device


def autocast(device: str):
    """bf16 autocast on CUDA (no loss scaling needed); full precision on the CPU."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def epoch_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    epoch: int,
    seed: int,
    shuffle: bool,
    drop_last: bool,
    workers: int,
    sampler: Any = None,
    collate_fn: Any = None,
) -> DataLoader:
    """A loader whose order and augmentation draws depend only on (seed, epoch, rank).

    That is what makes resume exact: epoch e after a resume sees the same batches and the same
    worker seeds as epoch e of an uninterrupted run. Under torchrun a DistributedSampler splits
    the data (set_epoch reshuffles it every epoch).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    dist = distributed.info()
    if sampler is None:
        if dist.enabled:
            sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=shuffle,
                                         seed=seed, drop_last=drop_last)
            sampler.set_epoch(epoch)
        elif shuffle:
            sampler = RandomSampler(dataset, generator=gen)
        else:
            sampler = SequentialSampler(dataset)
    elif hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        generator=gen,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        collate_fn=collate_fn,
    )


def cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float = 0.0):
    """timm's per-step cosine schedule with a linear warm-up prefix (MAE's recipe).

    Stateless given the step: ``step_update(global_step)`` sets the lr, so resume needs only the
    step count.
    """
    from timm.scheduler import CosineLRScheduler

    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )


class JsonlLog:
    """Appends one JSON object per line (per epoch), flushed and fsync'd: nothing lost on a crash."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
            f.flush()


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class NonFiniteGuard:
    """Counts skipped steps; raises after ``MAX_BAD_STEPS`` non-finite losses in a row."""

    def __init__(self, limit: int = MAX_BAD_STEPS) -> None:
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def check(self, loss: torch.Tensor, where: str) -> bool:
        """True if the step may proceed; False to skip it.

        Under torch.distributed the loss is summed over ranks first (finite iff finite on every
        rank), so all ranks take the same decision: a rank that skipped its backward alone would
        leave the others waiting in DDP's gradient all-reduce until the collective timeout.
        """
        loss = distributed.all_reduce_sum(loss.detach().float().clone())
        if bool(torch.isfinite(loss)):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"{self.in_a_row} non-finite losses in a row at {where}: stopping. The last checkpoint "
                "(checkpoint-last.pth) is the last good state; lower --blr or check the data."
            )
        return False


def write_config(out: Path, config: dict[str, Any]) -> None:
    from amgsn.engine.checkpoint import write_text_atomic

    write_text_atomic(json.dumps(config, indent=2, sort_keys=True, default=_jsonable) + "\n", out / "config.json")


def effective_lr(blr: float, batch_size: int, accum: int, world_size: int) -> float:
    """MAE's linear scaling: lr = blr × effective batch / 256."""
    return blr * batch_size * accum * world_size / 256

