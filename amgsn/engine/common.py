"""Pieces every training loop shares: device and autocast, deterministic per-epoch loaders,
the per-step cosine schedule (timm), JSON-lines logs, the non-finite-loss guard, and the stop
signals (SIGTERM / SIGUSR1) that end a run after a step with a checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    get_worker_info,
)

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


def _item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one item's augmentation in one epoch of the run seeded ``seed``."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededItems(Dataset):
    """``dataset`` indexed by ``(epoch, index)``; the random generators a transform draws from
    (Python's, NumPy's and torch's CPU generator) are seeded from (run seed, epoch, index) first.

    An item's augmentation then depends on nothing else: not on how many loader workers there are,
    which of them fetched it, or what they fetched before. That is what lets the workers live for the
    whole run and a resumed run still draw exactly what the uninterrupted one drew. In the main
    process (``workers=0``) the training loop's own generator states are put back afterwards.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        item_seed = _item_seed(self.seed, epoch, index)
        in_main = get_worker_info() is None
        if in_main:
            saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(item_seed)
        np.random.seed(item_seed & 0xFFFF_FFFF)
        torch.default_generator.manual_seed(item_seed)  # not torch.manual_seed: CUDA's stream stays
        try:
            return self.dataset[index]
        finally:
            if in_main:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class _EpochKeys(Sampler):
    """The indices ``sampler_for_epoch(epoch)`` draws, as ``(epoch, index)`` keys for SeededItems,
    without the first ``skip`` of them (a run resumed inside the epoch)."""

    def __init__(self, sampler_for_epoch: Callable[[int], Sampler]) -> None:
        self.sampler_for_epoch = sampler_for_epoch
        self.set_epoch(0)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.sampler, self.skip = epoch, self.sampler_for_epoch(epoch), skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, int(i)) for i in itertools.islice(self.sampler, self.skip, None))

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


class TrainLoader:
    """One DataLoader for a whole training run; ``loader.epoch(e)`` gives the batches of epoch ``e``.

    Order and augmentation depend only on (seed, epoch): the order on a generator seeded per epoch
    (or ``sampler_for_epoch(e)``, which must be deterministic too), each item's augmentation on
    SeededItems. Resume is exact, the result does not depend on ``workers``, and the worker processes
    persist across epochs instead of starting anew each time. Under torchrun a DistributedSampler
    splits the data (reshuffled every epoch).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        workers: int,
        sampler_for_epoch: Callable[[int], Sampler] | None = None,
        collate_fn: Any = None,
    ) -> None:
        self._keys = _EpochKeys(sampler_for_epoch or partial(_default_sampler, dataset, seed, shuffle, drop_last))
        self._loader = DataLoader(
            SeededItems(dataset, seed),
            batch_size=batch_size,
            sampler=self._keys,
            num_workers=workers,
            drop_last=drop_last,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            # Its own generator for the workers' base seed (each iteration draws one): the run's
            # global generator must not advance with the number of epochs the loader served.
            generator=torch.Generator().manual_seed(seed),
            collate_fn=collate_fn,
        )

    def epoch(self, epoch: int, start_batch: int = 0) -> DataLoader:
        """The batches of epoch ``epoch`` from batch ``start_batch`` on (the earlier ones are not
        loaded: the order is a function of the epoch, so skipping them is exact)."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self._keys.set_epoch(epoch, skip=start_batch * self._loader.batch_size)
        return self._loader


def _default_sampler(dataset: Dataset, seed: int, shuffle: bool, drop_last: bool, epoch: int) -> Sampler:
    dist = distributed.info()
    if dist.enabled:
        sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=shuffle,
                                     seed=seed, drop_last=drop_last)
        sampler.set_epoch(epoch)
        return sampler
    if shuffle:
        return RandomSampler(dataset, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return SequentialSampler(dataset)


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


class StopSignals:
    """SIGTERM / SIGUSR1 (cluster preemption) while a training loop runs: remember, don't die.

    A ``with StopSignals() as stop:`` block routes both signals to a flag (previous handlers come
    back on exit). The loop reports the flag through :meth:`NonFiniteGuard.check`, which sums it
    over ranks with the loss it already all-reduces, so every rank learns of a signal that reached
    any of them at the same step (:attr:`agreed`), at no extra collective. The loop then finishes
    that optimizer step, writes its checkpoint and raises :class:`Preempted`.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received = 0  # the first signal this process got (0: none)
        self.agreed = 0  # the signal all ranks agreed to stop for (0: none yet)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum

    def flags(self) -> list[float]:
        """One 0/1 entry per signal in :data:`SIGNALS`: what this rank received."""
        return [float(self.received == sig) for sig in self.SIGNALS]

    def agree(self, counts: list[float]) -> None:
        """Take the ranks' summed :meth:`flags`; the first signal any rank got becomes :attr:`agreed`."""
        if not self.agreed:
            self.agreed = next((sig for sig, n in zip(self.SIGNALS, counts) if n > 0), 0)


class Preempted(SystemExit):
    """A run stopped by SIGTERM / SIGUSR1 after writing ``checkpoint-last.pth``: exits the process
    with status 128 + the signal number unless caught (the shell's convention for a signal)."""

    def __init__(self, signum: int, checkpoint: str) -> None:
        super().__init__(128 + signum)
        self.signum, self.checkpoint = signum, checkpoint


def preempt(stop: StopSignals, write: Callable[[], Path | None], stage: str, where: str) -> NoReturn:
    """End a run for the signal ``stop`` agreed on: ``write`` the checkpoint (rank 0 returns its
    path, the others None), wait until it is on disk on every rank, say where in one line, and raise
    :class:`Preempted` (exit status 128 + signal)."""
    path = write()
    distributed.barrier()
    if path is not None:
        print(f"amgsn {stage}: {signal.Signals(stop.agreed).name} received, stopped after {where}; saved {path} "
              f"(continue with --resume {path})", file=sys.stderr, flush=True)
    raise Preempted(stop.agreed, str(path))


class EpochTally:
    """One epoch's log sums (on the device: no host sync per step), skipped steps and seconds —
    carried across a stop inside the epoch.

    ``saved`` is a checkpoint's ``in_epoch`` entry when this is the epoch the run stopped in: the
    loader then starts at :attr:`first_batch`, rank 0 starts from the saved sums (they are over all
    ranks) and the other ranks from zero, so the epoch's log record comes out as if never stopped.
    """

    def __init__(self, epoch: int, batches_per_epoch: int, width: int, device: str, guard: NonFiniteGuard,
                 saved: dict[str, Any] | None = None) -> None:
        saved = saved if saved is not None and saved["epoch"] == epoch else None
        self.epoch, self.batches_per_epoch, self.guard = epoch, batches_per_epoch, guard
        self.first_batch = saved["batches"] if saved else 0
        self.sums = torch.zeros(width, dtype=torch.float64, device=device)
        self.skipped_before, self.seconds_before = guard.total, 0.0
        if saved:
            if distributed.info().is_main:
                self.sums += torch.tensor(saved["sums"], dtype=torch.float64, device=device)
            self.skipped_before -= saved["skipped"]
            self.seconds_before = saved["seconds"]
        self.start = time.perf_counter()

    @property
    def skipped(self) -> int:
        return self.guard.total - self.skipped_before

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.start

    def position(self, batches: int) -> dict[str, Any]:
        """The ``in_epoch`` entry of a checkpoint after ``batches`` batches (a collective)."""
        return {"epoch": self.epoch, "batches": batches, "sums": distributed.all_reduce_sum(self.sums.clone()).tolist(),
                "skipped": self.skipped, "seconds": self.seconds(), "world_size": distributed.info().world_size}


def resume_inside_epoch(state: dict[str, Any], guard: NonFiniteGuard, batch_size: int, source: str
                        ) -> dict[str, Any] | None:
    """A checkpoint's position inside an epoch (None if it was written at an epoch's end), with the
    guard's state restored. The batches already done are counted in batches of this size over this
    many ranks, so both must be the checkpoint's: ValueError naming ``source`` otherwise."""
    position = state.get("in_epoch")
    if position is None:
        return None
    world = distributed.info().world_size
    was = (state["args"]["batch_size"], position.get("world_size", world))
    if was != (batch_size, world):
        raise ValueError(f"cannot resume from {source}: it stopped inside epoch {position['epoch']} with batch size "
                         f"{was[0]} x {was[1]} processes, this run has {batch_size} x {world}; resume with the same "
                         "--batch-size and number of processes")
    guard.load_state_dict(state["guard"])
    return position


def save_inside_epoch(stop: StopSignals, tally: EpochTally, batches: int, every_steps: int | None,
                      stepped: bool, global_step: int, save: Callable[[dict[str, Any]], Path | None],
                      where: str) -> None:
    """At an optimizer-step boundary inside an epoch: on an agreed stop signal write the checkpoint
    and :func:`preempt`; every ``every_steps`` optimizer steps just write it. ``save(position)``
    writes checkpoint-last.pth (every rank calls it: collectives), ``where`` names the stage."""
    periodic = stepped and every_steps is not None and global_step % every_steps == 0
    if not (stop.agreed or periodic):
        return
    position = tally.position(batches)
    if stop.agreed:
        preempt(stop, lambda: save(position), where,
                f"step {global_step} (epoch {tally.epoch}, batch {batches} of {tally.batches_per_epoch})")
    save(position)


class NonFiniteGuard:
    """Counts skipped steps; raises after ``MAX_BAD_STEPS`` non-finite losses in a row."""

    def __init__(self, limit: int = MAX_BAD_STEPS) -> None:
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.total = int(state["in_a_row"]), int(state["total"])

    def check(self, loss: torch.Tensor, where: str, stop: StopSignals | None = None) -> bool:
        """True if the step may proceed; False to skip it.

        Under torch.distributed the loss is summed over ranks first (finite iff finite on every
        rank), so all ranks take the same decision: a rank that skipped its backward alone would
        leave the others waiting in DDP's gradient all-reduce until the collective timeout.
        ``stop``'s signal flags travel in the same all-reduce (see :class:`StopSignals`).
        """
        loss = loss.detach().float().reshape(1)
        if stop is None:
            flags = loss.new_empty(0)
        elif stop.received:  # a host-to-device copy only once a signal came; zeros are made on the device
            flags = loss.new_tensor(stop.flags())
        else:
            flags = loss.new_zeros(len(stop.SIGNALS))
        packed = torch.cat([loss, flags])  # a copy: the all-reduce works in place
        values = distributed.all_reduce_sum(packed).tolist()  # the step's one host sync
        if stop is not None:
            stop.agree(values[1:])
        if math.isfinite(values[0]):
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

