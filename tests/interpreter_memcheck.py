"""A memory checker for Triton kernels run by the interpreter (TRITON_INTERPRET=1) — the CPU-side
stand-in for ``compute-sanitizer --tool memcheck`` (issue 22). Not a test module itself.

A masked load whose mask is too wide can still produce the right output: the extra elements it reads
are discarded by the store's mask, so comparing outputs never sees it, yet on a GPU it reads past an
allocation. The interpreter runs every ``tl.load`` / ``tl.store`` / atomic as a NumPy gather/scatter
on raw host addresses (``InterpreterBuilder.create_masked_load`` / ``create_masked_store`` /
``create_atomic_rmw`` / ``create_atomic_cas``; the unmasked forms and tensor-descriptor accesses go
through the masked ones), and every pointer argument is the ``data_ptr()`` of the launch's host copy
of a tensor argument (``GridExecutor._init_args_hst``; for a CPU tensor that is the tensor itself).
:class:`Memcheck` wraps those calls and checks that every address accessed under a true mask is an
element of one of the launch's tensor arguments:

* inside the *view* — ``[data_ptr, data_ptr + extent)`` with ``extent`` the last element the sizes
  and strides reach, not the whole storage (a view sliced out of a larger buffer is checked against
  its own elements);
* on an element of it — for a non-overlapping strided view (e.g. ``x[:, ::2]``) the address must be
  ``data_ptr + element_size * sum(i_k * stride_k)`` with ``0 <= i_k < size_k``, so a read of a gap
  column is caught too; views whose strides do not nest, and accesses whose width differs from the
  tensor's element size (a reinterpreted pointer), fall back to the extent check.

Pointer provenance is not tracked: an address that runs off one argument into another one's elements
passes. Tests that want a guaranteed catch hand the kernel a view sliced out of a larger buffer, so the
elements right past its end belong to no argument (:func:`padded`).

A violation raises :class:`OutOfBoundsAccess` at once (the interpreter re-raises it as an
``InterpreterError`` with this message), naming the kernel, the source line of the access, the program
id, how many addresses were bad and where the first lies relative to the nearest argument; it is also
kept in :attr:`Memcheck.violations`, so a test that swallowed the error still fails
(:meth:`Memcheck.assert_clean`).
"""

from __future__ import annotations

import os
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Memcheck", "OutOfBoundsAccess", "Violation", "interpreter_on", "memcheck", "padded"]


class OutOfBoundsAccess(AssertionError):
    """A Triton kernel accessed memory outside its tensor arguments (under the interpreter)."""


@dataclass
class _Arg:
    """One tensor argument of a launch: its name, address range and (if exact checks apply) layout."""

    name: str
    desc: str
    lo: int
    hi: int  # one past the last byte of the view's last element
    elem: int  # element size in bytes
    dims: list[tuple[int, int]] | None  # (size, stride in elements), strides descending; None: extent only

    def contains(self, addr: np.ndarray, width: int) -> np.ndarray:
        ok = (addr >= self.lo) & (addr + width <= self.hi)
        if self.dims is None or width != self.elem or not ok.any():
            return ok
        off = addr[ok] - self.lo
        exact = off % self.elem == 0
        idx = off // self.elem
        for size, stride in self.dims:
            q = idx // stride
            exact &= q < size
            idx = idx - q * stride
        exact &= idx == 0
        ok[np.flatnonzero(ok)[~exact]] = False
        return ok


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} strides {tuple(t.stride())}"


def _tensor_arg(name: str, t: torch.Tensor) -> _Arg | None:
    from triton.runtime.jit import TensorWrapper

    if isinstance(t, TensorWrapper):
        t = t.base
    elem = t.element_size()
    if t.numel() == 0:
        return _Arg(name, _describe(t), t.data_ptr(), t.data_ptr(), elem, None)
    strides = [int(s) for s in t.stride()]
    if any(s < 0 for s in strides):  # not made by torch today; check the extent it could span, loosely
        return None
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, strides))
    dims = sorted(((int(n), s) for n, s in zip(t.shape, strides) if n > 1), key=lambda d: -d[1])
    nested = all(s > 0 for _, s in dims) and all(
        dims[k][1] >= dims[k + 1][0] * dims[k + 1][1] for k in range(len(dims) - 1)
    )
    lo = t.data_ptr()
    return _Arg(name, _describe(t), lo, lo + extent * elem, elem, dims if nested else None)


@dataclass
class _Launch:
    kernel: str
    grid: Any
    args: list[_Arg] = field(default_factory=list)


@dataclass
class Violation:
    kernel: str
    op: str
    where: str
    program: tuple[int, ...]
    bad: int
    accessed: int
    detail: str

    def __str__(self) -> str:
        return (f"{self.kernel}: out-of-bounds {self.op} at {self.where}, program {self.program}: {self.bad} of "
                f"{self.accessed} addresses under a true mask lie in no tensor argument; {self.detail}")


def _kernel_frame() -> str:
    """file:line of the innermost frame outside Triton, NumPy and this module (the kernel's source)."""
    skip = ("/triton/", "/numpy/", str(Path(__file__).resolve()))
    for frame in reversed(traceback.extract_stack()):
        fname = str(Path(frame.filename).resolve())
        if not any(s in fname for s in skip):
            return f"{frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`"
    return "?"


class Memcheck:
    """Context manager: while active, every interpreted Triton launch has its accesses checked."""

    _active: Memcheck | None = None

    def __init__(self, raise_at_once: bool = True) -> None:
        self.raise_at_once = raise_at_once
        self.violations: list[Violation] = []
        self.launches: dict[str, int] = {}
        self.accesses = 0  # memory operations checked (not addresses)
        self._launch: _Launch | None = None
        self._saved: list[tuple[Any, str, Any]] = []

    # ------------------------------------------------------------------ patching

    def __enter__(self) -> Memcheck:
        if Memcheck._active is not None:
            raise RuntimeError("a Memcheck is already active")
        from triton.runtime import interpreter as I  # noqa: N812

        b = I.interpreter_builder
        check = self._check

        orig_load, orig_store = b.create_masked_load, b.create_masked_store
        orig_rmw, orig_cas = b.create_atomic_rmw, b.create_atomic_cas

        def masked_load(ptrs, mask, other, *a, **k):
            check("load", ptrs, mask)
            return orig_load(ptrs, mask, other, *a, **k)

        def masked_store(ptrs, value, mask, *a, **k):
            check("store", ptrs, mask)
            return orig_store(ptrs, value, mask, *a, **k)

        def atomic_rmw(op, ptr, val, mask, *a, **k):
            check("atomic", ptr, mask)
            return orig_rmw(op, ptr, val, mask, *a, **k)

        def atomic_cas(ptr, cmp, val, *a, **k):
            check("atomic", ptr, None)
            return orig_cas(ptr, cmp, val, *a, **k)

        for name, fn in (("create_masked_load", masked_load), ("create_masked_store", masked_store),
                         ("create_atomic_rmw", atomic_rmw), ("create_atomic_cas", atomic_cas)):
            self._patch(b, name, fn)

        grid_executor = I.GridExecutor
        orig_init, orig_call = grid_executor._init_args_hst, grid_executor.__call__
        me = self

        def init_args_hst(executor, args_dev, kwargs):
            args_hst, kwargs_hst = orig_init(executor, args_dev, kwargs)
            me._begin(executor, args_hst, kwargs_hst)
            return args_hst, kwargs_hst

        def call(executor, *args, **kwargs):
            try:
                return orig_call(executor, *args, **kwargs)
            finally:
                me._launch = None

        self._patch(grid_executor, "_init_args_hst", init_args_hst)
        self._patch(grid_executor, "__call__", call)
        Memcheck._active = self
        return self

    def _patch(self, owner: Any, name: str, fn: Any) -> None:
        had = name in vars(owner)
        self._saved.append((owner, name, vars(owner)[name] if had else None))
        setattr(owner, name, fn)

    def __exit__(self, *exc: Any) -> None:
        for owner, name, old in reversed(self._saved):
            if old is None:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
        self._saved.clear()
        Memcheck._active = None

    # ------------------------------------------------------------------ checking

    def _begin(self, executor: Any, args_hst: list, kwargs_hst: dict) -> None:
        kernel = getattr(executor.fn, "__name__", str(executor.fn))
        launch = _Launch(kernel, executor.grid)
        named = list(zip(executor.arg_names, args_hst)) + list(kwargs_hst.items())

        def add(name: str, value: Any) -> None:
            if isinstance(value, tuple):
                for i, v in enumerate(value):
                    add(f"{name}[{i}]", v)
            elif hasattr(value, "base") and hasattr(value, "block_shape"):  # TensorDescriptor
                add(f"{name}.base", value.base)
            elif hasattr(value, "data_ptr"):
                arg = _tensor_arg(name, value)
                if arg is not None:
                    launch.args.append(arg)

        for name, value in named:
            add(name, value)
        self.launches[kernel] = self.launches.get(kernel, 0) + 1
        self._launch = launch

    def _check(self, op: str, ptrs: Any, mask: Any) -> None:
        launch = self._launch
        if launch is None:  # a load outside a launch (not expected): nothing to check against
            return
        self.accesses += 1
        addr = np.asarray(ptrs.data)
        if mask is not None:
            addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)]
        addr = np.unique(addr.reshape(-1)).astype(np.int64)
        if addr.size == 0:
            return
        bits = getattr(ptrs.get_element_ty(), "primitive_bitwidth", 8)
        width = max(1, bits // 8)
        ok = np.zeros(addr.shape, dtype=bool)
        for arg in launch.args:
            ok |= arg.contains(addr, width)
            if ok.all():
                return
        bad = addr[~ok]
        from triton.runtime.interpreter import interpreter_builder

        program = tuple(int(i) for i in (interpreter_builder.grid_idx or ()))
        violation = Violation(launch.kernel, op, _kernel_frame(), program, int(bad.size), int(addr.size),
                              self._explain(int(bad[0]), width, launch))
        self.violations.append(violation)
        if self.raise_at_once:
            raise OutOfBoundsAccess(str(violation))

    @staticmethod
    def _explain(a: int, width: int, launch: _Launch) -> str:
        if not launch.args:
            return f"first at {a:#x}; the launch has no tensor arguments"

        def distance(arg: _Arg) -> int:
            return 0 if arg.lo <= a < arg.hi else min(abs(a - arg.lo), abs(a - arg.hi))

        near = min(launch.args, key=distance)
        if a >= near.hi:
            where = f"{a - near.hi} bytes past the end of"
        elif a < near.lo:
            where = f"{near.lo - a} bytes before"
        else:
            where = f"inside the extent but on no element ({width}-byte access) of"
        return f"first at {a:#x}, {where} `{near.name}` {near.desc}"

    def assert_clean(self) -> None:
        if self.violations:
            lines = "\n".join(str(v) for v in self.violations[:10])
            more = f"\n... and {len(self.violations) - 10} more" if len(self.violations) > 10 else ""
            raise OutOfBoundsAccess(f"{len(self.violations)} out-of-bounds accesses:\n{lines}{more}")


@contextmanager
def memcheck(raise_at_once: bool = True):
    """``with memcheck() as mc:`` — check every interpreted launch inside; fail at the end if any access
    was out of bounds (also when the test caught the error raised at the access)."""
    if Memcheck._active is not None:  # nested (e.g. the autouse fixture is on): share the active checker
        yield Memcheck._active  # an exception from the body propagates as it is: it already failed
        Memcheck._active.assert_clean()
        return
    with Memcheck(raise_at_once) as mc:
        yield mc
    mc.assert_clean()


def padded(t: torch.Tensor, pad: int = 1024) -> torch.Tensor:
    """A copy of ``t`` (same shape and strides) placed at the start of a larger buffer: the ``pad``
    elements right past its last element belong to no tensor argument, so a kernel that runs past the
    end of ``t`` is caught whatever the allocator put next to it."""
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
    buf = torch.zeros(extent + pad, dtype=t.dtype, device=t.device)
    view = buf.as_strided(t.shape, t.stride(), 0)
    view.copy_(t)
    return view


def interpreter_on() -> bool:
    """Whether Triton runs kernels through the interpreter in this process (TRITON_INTERPRET set)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
