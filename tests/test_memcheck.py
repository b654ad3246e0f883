"""The interpreter memcheck itself (tests/interpreter_memcheck.py, issue 22): it sees a read past a
tensor's end that a store mask hides from every output, a read of a strided view's gap, a write past
the end and a swallowed error; it passes correct kernels; conftest turns it on for every test."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from interpreter_memcheck import Memcheck, OutOfBoundsAccess, padded

from amgsn import kernels as K


@triton.jit
def _copy_kernel(x_ptr, sx, out_ptr, n, BLOCK: tl.constexpr, MASK_LOAD: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    if MASK_LOAD:
        v = tl.load(x_ptr + offs * sx, mask=ok)
    else:
        v = tl.load(x_ptr + offs * sx)  # reads BLOCK elements: past the end when n < BLOCK
    tl.store(out_ptr + offs, v, mask=ok)  # ... yet out is right: the extra lanes are never stored


@triton.jit
def _fill_kernel(out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.zeros([BLOCK], tl.float32), mask=offs <= n)  # one too many


@pytest.fixture
def mc(interpreter_memcheck):
    """The active checker (conftest's, or a private one with AMGSN_MEMCHECK=0); violations these tests
    provoke on purpose are taken out again so the test's teardown stays clean."""
    if interpreter_memcheck is not None:
        yield interpreter_memcheck
        return
    with Memcheck() as own:
        yield own


def _provoke(mc: Memcheck, launch) -> str:
    """Run ``launch``, expect the memcheck's error, return its message and forget the violation."""
    before = len(mc.violations)
    with pytest.raises(Exception, match="OutOfBoundsAccess") as err:
        launch()
    assert len(mc.violations) == before + 1
    del mc.violations[before:]
    return str(err.value)


def test_a_read_past_the_end_hidden_by_the_store_mask_is_caught(mc):
    x, out = padded(torch.arange(5.0)), torch.zeros(5)
    _copy_kernel[(1,)](x, 1, out, 5, BLOCK=8, MASK_LOAD=True)  # correct: passes
    assert torch.equal(out, torch.arange(5.0))
    msg = _provoke(mc, lambda: _copy_kernel[(1,)](x, 1, out, 5, BLOCK=8, MASK_LOAD=False))
    assert torch.equal(out, torch.arange(5.0))  # the output never showed it
    assert "_copy_kernel: out-of-bounds load at" in msg and "test_memcheck.py:" in msg and "tl.load(x_ptr" in msg
    assert "3 of 8 addresses" in msg and "0 bytes past the end of `x_ptr` (5,) float32" in msg


def test_a_strided_views_gap_is_not_an_element(mc):
    base = padded(torch.arange(10.0))
    x, out = base[::2], torch.zeros(5)  # elements 0, 2, 4, 6, 8 of the buffer
    _copy_kernel[(1,)](x, 2, out, 5, BLOCK=8, MASK_LOAD=True)
    assert torch.equal(out, torch.arange(0.0, 10.0, 2.0))
    # Stride 1 instead of 2: every address lies inside x's extent (elements 0..8), half on no element.
    msg = _provoke(mc, lambda: _copy_kernel[(1,)](x, 1, out, 5, BLOCK=8, MASK_LOAD=True))
    assert "2 of 5 addresses" in msg and "on no element" in msg


def test_a_write_past_the_end_is_caught(mc):
    out = padded(torch.ones(6))
    _fill_kernel[(1,)](out, 5, BLOCK=8)  # writes 0..5: the whole tensor, fine
    msg = _provoke(mc, lambda: _fill_kernel[(1,)](out[:5], 5, BLOCK=8))
    assert "out-of-bounds store" in msg and "1 of 6 addresses" in msg and "past the end of `out_ptr` (5,)" in msg


def test_a_caught_error_still_fails_the_test(mc):
    x, out = padded(torch.arange(5.0)), torch.zeros(5)
    before = len(mc.violations)
    with pytest.raises(Exception, match="OutOfBoundsAccess"):  # a test that swallows the error ...
        _copy_kernel[(1,)](x, 1, out, 5, BLOCK=8, MASK_LOAD=False)
    with pytest.raises(OutOfBoundsAccess, match="1 out-of-bounds accesses"):  # ... fails at teardown
        mc.assert_clean()
    del mc.violations[before:]


def test_conftest_checks_every_interpreted_launch(interpreter_memcheck):
    if interpreter_memcheck is None:
        pytest.skip("AMGSN_MEMCHECK=0")
    n, accesses = interpreter_memcheck.launches.get("_gather_kernel", 0), interpreter_memcheck.accesses
    ids, cu = torch.tensor([0, 2, 1]), torch.tensor([0, 2, 3], dtype=torch.int32)
    K.gather_visible(torch.randn(2, 3, 37), ids, cu)
    assert interpreter_memcheck.launches["_gather_kernel"] == n + 1 and interpreter_memcheck.accesses > accesses
    with pytest.raises(RuntimeError, match="already active"):
        Memcheck().__enter__()
