"""Loads the compiled extension ``amgsn._C`` once, with a helpful error when it is missing."""

from __future__ import annotations

import torch


def load() -> None:
    """Import ``amgsn._C`` (registers ``torch.ops.amgsn.*``). Raises ImportError with a fix."""
    try:
        from amgsn import _C  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised only on a broken install
        raise ImportError(
            "amgsn._C (the compiled extension) could not be loaded: "
            f"{exc}. Build it against the torch you run ({torch.__version__}) with "
            "`pip install --no-build-isolation -e .` in the source tree (or `make setup`)."
        ) from exc


load()
