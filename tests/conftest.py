"""Test-suite set-up. TRITON_INTERPRET must be set before triton / amgsn are imported, so the
Triton kernels run eagerly on CPU tensors (docs/method.md §3.5)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from interpreter_memcheck import Memcheck, interpreter_on  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # CUDA tests are collected everywhere but only run where a GPU exists (benchmarks/gpu_check.sh).
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run by benchmarks/gpu_check.sh)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def triton_interpreter_on() -> bool:
    """Whether amgsn's Triton kernels are the interpreter's (TRITON_INTERPRET=1 at their import)."""
    from amgsn.kernels import abmg, gather
    from triton.runtime.interpreter import InterpretedFunction

    return any(isinstance(k, InterpretedFunction) for k in (abmg._rank_kernel, gather._gather_kernel))


def require_compiled_kernels(item) -> None:
    """A `cuda` test must exercise the compiled kernels: under the interpreter it would silently re-test
    the interpreter on GPU tensors (benchmarks/_gpu_env.sh sets TRITON_INTERPRET=0 for them)."""
    if "cuda" in item.keywords and triton_interpreter_on():
        pytest.fail("a cuda-marked test ran with the Triton interpreter on: run it with TRITON_INTERPRET=0")


def pytest_runtest_setup(item):
    if torch.cuda.is_available():  # elsewhere the cuda tests are skipped (above)
        require_compiled_kernels(item)


CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


@pytest.fixture(autouse=True)
def interpreter_memcheck(request):
    """Every Triton launch the interpreter runs in a test is bounds-checked: an access outside the
    launch's tensor arguments fails the test, naming the kernel line (tests/interpreter_memcheck.py,
    the CPU stand-in for compute-sanitizer's memcheck). Yields the checker (None without the interpreter)."""
    if not interpreter_on() or os.environ.get("AMGSN_MEMCHECK") == "0":  # AMGSN_MEMCHECK=0: off (to time it)
        yield None
        return
    with Memcheck() as mc:
        yield mc
    if not request.node.stash.get(CALL_FAILED, False):  # a failed test already said (the error is raised at once)
        mc.assert_clean()  # a test that caught the error still fails


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed on failure through the test id's fixture value)."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """A tiny synthetic FER set in the RAF-DB layout (64 train / 28 test images, 32 px)."""
    from amgsn.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("syn") / "set", 64, 28, image_size=32, workers=0, progress=False)
