"""Load torch files a user passes without running any code in them (docs/method.md §10).

A ``.pth`` is a pickle, and unpickling can call any function the file names. ``torch.load(...,
weights_only=True)`` only rebuilds tensors and plain Python types; everything amgsn itself writes
fits that (RNG states are stored as tensors and ints). Checkpoints written by amgsn before that
change held NumPy's RNG state as an ``ndarray``: the exact NumPy globals needed to rebuild one
uint32 array are allow-listed one by one (:data:`LEGACY_NUMPY_GLOBALS`) — nothing broader. A file
that names any other global is refused with :class:`UnsafeFileError` before anything in it runs.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch


class UnsafeFileError(ValueError):
    """A torch file that would need more than tensors and plain types to load (it may run code)."""


def _legacy_numpy_globals() -> list[Any]:
    # numpy >= 2 pickles `numpy._core.multiarray._reconstruct`, numpy 1.x `numpy.core.multiarray...`:
    # the same function under both names, so an old checkpoint loads whichever NumPy wrote it.
    reconstruct = np.ndarray.__reduce__(np.zeros(1, np.uint32))[0]
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            (reconstruct, "numpy._core.multiarray._reconstruct"),
            (reconstruct, "numpy.core.multiarray._reconstruct")]


LEGACY_NUMPY_GLOBALS = _legacy_numpy_globals()
"""What an amgsn checkpoint written before safe loading needs beyond tensors: a uint32 ndarray."""


def safe_torch_load(path: str | os.PathLike, *, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    ``what`` names the file's role in messages (e.g. ``"--init file"``). Raises FileNotFoundError
    for a missing file, :class:`UnsafeFileError` (a ValueError) naming the file and the globals it
    asks for when it is not a safe file — nothing in it has run then — and ValueError when it is
    not a readable torch file at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(LEGACY_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # get_unsafe_globals_in_checkpoint reads the pickle's opcodes; it does not execute them.
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 — a file too broken to scan: say what weights_only said
            names = []
        allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in LEGACY_NUMPY_GLOBALS}
        names = [n for n in names if n not in allowed]
        needs = f"it would call {', '.join(names)}" if names else str(exc).splitlines()[-1].strip() or "refused"
        raise UnsafeFileError(
            f"{path} is not a safe {what}: loading it would run code ({needs}); amgsn loads only "
            "tensors and plain Python types (weights_only=True), so it was refused and nothing in it ran"
        ) from None
    except Exception as exc:  # truncated, not a torch file, ...
        raise ValueError(f"{path} is not a readable {what} ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
