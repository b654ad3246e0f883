"""Checkpoints that survive crashes, and the RNG state that makes resume exact.

``save_atomic`` writes to a temporary file in the same folder, fsyncs it, then ``os.replace``s it
over the target: a reader sees the old file or the new one, never half of one. Every checkpoint
holds ``kind`` ("pretrain" | "finetune"), ``args``, ``epoch`` (the last finished epoch, 0-based),
the model/optimiser/scaler states and ``rng`` (Python, NumPy, torch CPU and CUDA generators).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    """Every generator a training step draws from."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_checkpoint(path: str | os.PathLike, *, kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint on the CPU; ``kind`` checks it is a ``pretrain``/``finetune`` one.

    Raises FileNotFoundError / ValueError naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or not a torch file
        raise ValueError(f"{path} is not a readable amgsn checkpoint ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(state, dict) or "kind" not in state or "model" not in state:
        raise ValueError(f"{path} is not an amgsn checkpoint (no 'kind'/'model' entries)")
    if kind is not None and state["kind"] != kind:
        raise ValueError(f"{path} is a {state['kind']!r} checkpoint, expected a {kind!r} one")
    return state
