"""Issue 18 item 2: the whole CUDA op path — public ops, planning, launchers, in-kernel checks — on CPU
tensors. tests/triton_route_cases.py runs in a subprocess with AMGSN_TRITON_ON_CPU=1 and
TRITON_INTERPRET=1 (both must be set before amgsn is imported; this session imports it without them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_public_ops_through_the_triton_route():
    env = {**os.environ, "AMGSN_TRITON_ON_CPU": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(TESTS / "triton_route_cases.py")],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_normal_session_is_not_on_the_route():
    from amgsn.ops import masking

    assert not masking.TRITON_ON_CPU


def test_route_needs_the_interpreter():
    env = {**os.environ, "AMGSN_TRITON_ON_CPU": "1", "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", "import amgsn.ops"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "TRITON_INTERPRET=1" in proc.stderr


