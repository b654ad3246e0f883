"""Checkpoints that survive crashes, and the RNG state that makes resume exact.

``save_atomic`` writes to a temporary file in the same folder, fsyncs it, then ``os.replace``s it
over the target: a reader sees the old file or the new one, never half of one. Every checkpoint
holds ``kind`` ("pretrain" | "finetune"), ``args``, ``epoch`` (the last finished epoch, 0-based),
the model/optimiser/scaler states and ``rng`` (Python, NumPy, torch CPU and CUDA generators).
Everything in a checkpoint is a tensor or a plain Python type, so it loads with
``weights_only=True`` (:func:`amgsn.safe_load.safe_torch_load`): a file that needs more is refused.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amgsn.engine import distributed
from amgsn.safe_load import safe_torch_load

KINDS = ("pretrain", "finetune")


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename in the same folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a small text file (JSON, config) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def rng_state() -> dict[str, Any]:
    """Every generator a training step draws from, as tensors and plain types (safe to load)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),  # (version, tuple of ints, float | None)
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` (or the NumPy tuple that checkpoints held before safe loading)."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_state_per_rank() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order: a collective under torchrun (call it on every
    rank), ``[rng_state()]`` in one process. Ranks draw different noise (each is seeded with
    seed + rank), so an exact resume needs each rank's own generators back."""
    state = rng_state()
    if not distributed.info().enabled:
        return [state]
    import torch.distributed as dist

    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def rng_entries() -> dict[str, Any]:
    """A checkpoint's RNG entries: ``rng`` (this rank's) and ``rng_ranks`` (every rank's; a collective)."""
    per_rank = rng_state_per_rank()
    return {"rng": per_rank[distributed.info().rank], "rng_ranks": per_rank}


def restore_rng(state: dict[str, Any]) -> None:
    """Put back this rank's generators from a checkpoint's ``rng_ranks`` (or ``rng``, the only entry
    of checkpoints written before per-rank states, or by a run of another world size)."""
    info = distributed.info()
    per_rank = state.get("rng_ranks")
    set_rng_state(per_rank[info.rank] if per_rank and len(per_rank) == info.world_size else state["rng"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_checkpoint(path: str | os.PathLike, *, kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint on the CPU; ``kind`` checks it is a ``pretrain``/``finetune`` one.

    Raises FileNotFoundError / ValueError naming the file and what is wrong with it
    (:class:`~amgsn.safe_load.UnsafeFileError` for a file that would run code: nothing in it runs).
    """
    path = Path(path)
    state = safe_torch_load(path, what="amgsn checkpoint")
    if not isinstance(state, dict) or "kind" not in state or "model" not in state:
        raise ValueError(f"{path} is not an amgsn checkpoint (no 'kind'/'model' entries)")
    if kind is not None and state["kind"] != kind:
        raise ValueError(f"{path} is a {state['kind']!r} checkpoint, expected a {kind!r} one")
    return state
