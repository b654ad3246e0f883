"""Runs the ``amgsn`` CLI and sends this process a real signal right after its K-th optimizer step,
the way a cluster preempts a job (tests/test_preemption.py). Not a test module itself.

Environment: SIGNAL_AT_STEP=K, SIGNAL_NAME=SIGTERM|SIGUSR1 (default SIGTERM), SIGNAL_RANK=R (under
torchrun only rank R signals itself; default 0). Arguments: those of ``amgsn``.
"""

import os
import signal
import sys

from torch.optim.optimizer import register_optimizer_step_post_hook

from amgsn.cli import main

_steps = 0


def _after_step(optimizer, args, kwargs) -> None:
    global _steps
    _steps += 1
    if _steps == int(os.environ["SIGNAL_AT_STEP"]) and os.environ.get("RANK", "0") == os.environ.get("SIGNAL_RANK",
                                                                                                       "0"):
        os.kill(os.getpid(), getattr(signal, os.environ.get("SIGNAL_NAME", "SIGTERM")))


if __name__ == "__main__":
    if "SIGNAL_AT_STEP" in os.environ:
        register_optimizer_step_post_hook(_after_step)
    sys.exit(main(sys.argv[1:]))
