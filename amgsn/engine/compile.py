"""Compiled training (``--compile``, docs/method.md §9.3): regional ``torch.compile`` of the step's
repeated regions (:mod:`amgsn.models.regions`), with a bounded number of compiles over a run.

Each region — a packed encoder block's two token-wise halves, a teacher block, the decoder's entry
(with ``amgsn::scatter_visible`` inside the graph), a decoder block, the decoder's tail + loss, a
classifier block — is one function compiled once with ``fullgraph=True`` and shared by every block
of that shape: the block is an argument and its weights are graph inputs, so the 12 encoder blocks
run one graph. The variable-length attention between an encoder block's halves runs uncompiled
(Flash varlen / padded SDPA: already one kernel). Nothing is wrapped: state dicts keep their names,
checkpoints load in eager runs and back.

Shapes. The packed encoder's row count T + B changes every step under per-image ratios:

* ``dynamic`` (default): the varying dimension is marked dynamic before the first call, so each region
  compiles once for every T (``maybe_mark_dynamic``; from the first call, not after a recompile, so
  a resumed run runs the same kernels as the uninterrupted one);
* ``bucket``: the rows are padded up to one of :data:`NUM_BUCKETS` sizes that cover the run's whole
  ratio range (:func:`bucket_sizes`), held as extra sequences that attention and the loss never see;
  each bucket is compiled for its static size (at most 3 compiles per region), at the price of the
  padded rows' compute.

The teacher and classifier blocks see several batch sizes (the batch, a saliency bank's refreshed
images, the mask gallery, the probe, a last validation batch): their batch dimension is dynamic too.

Counting: every graph a region compiles is counted (:func:`compile_stats`), with the wall time of
the calls that compiled (Dynamo, AOTAutograd, Inductor and the C++ / Triton build; much shorter
with a warm Inductor cache) plus a backward compiled at its first use. Pre-training writes them
to ``log.jsonl``, ``amgsn bench-step`` to its JSON.

``AMGSN_COMPILE_BACKEND=aot_eager`` (a test knob) keeps Dynamo and AOTAutograd — the graphs, their
guards and so the compile counts are the same — but runs them with eager kernels instead of
Inductor's: the tests that check counting and plumbing, not Inductor's numerics, skip the C++ build.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from typing import Any

import torch

from amgsn.models.regions import PACKED_REGIONS, REGIONS, Regions

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SHAPES = ("dynamic", "bucket")
NUM_BUCKETS = 3
BACKEND_ENV = "AMGSN_COMPILE_BACKEND"
BACKENDS = ("inductor", "aot_eager")
ROW_ALIGN = 16  # bucket sizes are multiples of this


def validate_options(compile: bool, mode: str | None, shapes: str) -> None:
    """ValueError naming the flag for an unknown ``--compile-mode`` / ``--compile-shapes``, or either
    without ``--compile``."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"--compile-mode must be one of {MODES}, got {mode!r}")
    if shapes not in SHAPES:
        raise ValueError(f"--compile-shapes must be one of {SHAPES}, got {shapes!r}")
    if not compile and (mode is not None or shapes != "dynamic"):
        raise ValueError("--compile-mode and --compile-shapes need --compile")


# ------------------------------------------------------------------------------------- counting


class _Tally:
    """Process-wide: graphs compiled and seconds spent compiling, per region."""

    def __init__(self) -> None:
        self.compiles: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        self.local = threading.local()  # the region whose call is running (a compile inside it is its own)


_TALLY = _Tally()


def compile_stats() -> dict[str, Any]:
    """A snapshot of the process's counts: ``{"compiles": {region: graphs}, "seconds": {region: s}}``."""
    return {"compiles": dict(_TALLY.compiles), "seconds": dict(_TALLY.seconds)}


def stats_since(before: dict[str, Any]) -> dict[str, Any]:
    """What was compiled since the snapshot ``before`` (:func:`compile_stats`): ``{"compiles": {region:
    graphs compiled}, "recompiles": graphs beyond each region's first, "compile_s": seconds}``."""
    now = compile_stats()
    compiles = {k: v - before["compiles"].get(k, 0) for k, v in sorted(now["compiles"].items())}
    compiles = {k: v for k, v in compiles.items() if v}
    seconds = sum(now["seconds"].values()) - sum(before["seconds"].values())
    return {"compiles": compiles, "recompiles": sum(max(v - 1, 0) for v in compiles.values()),
            "compile_s": round(seconds, 3)}


class _Backend:
    """Inductor (with ``mode``'s options) that counts the graphs it compiles for one region, and times
    a backward graph compiled later, at its first use."""

    def __init__(self, region: str, mode: str | None, backend: str) -> None:
        self.region, self.mode, self.backend = region, mode, backend

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        _TALLY.compiles[self.region] += 1
        if self.backend == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager

            return aot_eager(gm, example_inputs)
        patches = list_mode_options(self.mode) if self.mode not in (None, "default") else None
        return compile_fx(gm, example_inputs, inner_compile=self._inner, config_patches=patches)

    def _inner(self, *args: Any, **kwargs: Any) -> Any:
        from torch._inductor.compile_fx import compile_fx_inner

        if getattr(_TALLY.local, "region", None) is not None:  # inside a region's call: timed there
            return compile_fx_inner(*args, **kwargs)
        start = time.perf_counter()
        try:
            return compile_fx_inner(*args, **kwargs)
        finally:
            _TALLY.seconds[self.region] += time.perf_counter() - start


_COMPILED: dict[tuple[str, str | None, bool, str], Any] = {}


def _backend_name() -> str:
    name = os.environ.get(BACKEND_ENV, "inductor")
    if name not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {name!r}")
    return name


def _compiled(region: str, mode: str | None, static: bool = False) -> Any:
    """One ``torch.compile`` of a region's function per (region, mode, static, backend) and process: every
    model, run and variant in the process shares its graphs (same code, same backend object: cache hits).
    ``static``: never dynamic (the buckets: a new size is a new static graph, not a dynamic one)."""
    key = (region, mode, static, _backend_name())
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(REGIONS[region][0], backend=_Backend(region, mode, key[3]), fullgraph=True,
                                       dynamic=False if static else None)
    return _COMPILED[key]


# ------------------------------------------------------------------------------------- shapes


def _keep(ratio: float, num_patches: int) -> int:
    """Patches one image keeps at ``ratio`` (as amgsn.ops.abmg_select plans it)."""
    return min(max(math.floor((1.0 - ratio) * num_patches + 1e-4), 1), num_patches)


def bucket_sizes(batch: int, num_patches: int, ratio_range: tuple[float, float],
                 buckets: int = NUM_BUCKETS) -> tuple[int, ...]:
    """The packed encoder's row counts (T + B: visible + CLS) that ``--compile-shapes bucket`` pads to, for
    ``batch`` images of ``num_patches`` patches at ratios in ``ratio_range``: ``buckets`` sizes (multiples
    of :data:`ROW_ALIGN`) evenly spaced up to the most rows the range allows; one size when it allows
    only one row count."""
    lo_ratio, hi_ratio = ratio_range
    least = batch * (1 + _keep(hi_ratio, num_patches))
    most = batch * (1 + _keep(lo_ratio, num_patches))
    if least == most:
        return (most,)
    sizes = {least + math.ceil((most - least) * i / buckets) for i in range(1, buckets + 1)}
    return tuple(sorted({-(-s // ROW_ALIGN) * ROW_ALIGN for s in sizes}))


class CompiledRegions(Regions):
    """Runs each region compiled (see the module docstring); ``buckets``: the row counts the packed
    encoder pads to (``shapes="bucket"``)."""

    compiled = True

    def __init__(self, mode: str | None = None, shapes: str = "dynamic", buckets: tuple[int, ...] = ()) -> None:
        validate_options(True, mode, shapes)
        if shapes == "bucket" and not buckets:
            raise ValueError("--compile-shapes bucket needs the bucket sizes")
        # Under DDP, Dynamo would split a region's graph at DDP's bucket boundaries (to overlap the all-reduce
        # with a backward inside the graph); a region is a block, and DDP's hooks fire as its gradients come
        # out anyway: one graph per region. (Process-wide; read when a graph compiles, so set it here rather
        # than per call, which costs ~0.1 ms a call.)
        torch._dynamo.config.optimize_ddp = False
        self.mode, self.shapes, self.buckets = mode, shapes, tuple(sorted(buckets))

    def padded_rows(self, rows: int) -> int:
        if self.shapes != "bucket":
            return rows
        for size in self.buckets:
            if rows <= size:
                return size
        # More rows than the run's range allows (another batch size or ratio): whole top buckets.
        top = self.buckets[-1]
        return -(-rows // top) * top

    def run(self, name: str, *args: Any) -> Any:
        static = self.shapes == "bucket" and name in PACKED_REGIONS
        if not static:
            for i in REGIONS[name][1]:
                if isinstance(args[i], torch.Tensor):
                    torch._dynamo.maybe_mark_dynamic(args[i], 0)
        fn = _compiled(name, self.mode, static)
        local = _TALLY.local
        outer, local.region = getattr(local, "region", None), name
        before = _TALLY.compiles[name]
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            local.region = outer
            if _TALLY.compiles[name] != before:  # this call compiled: its wall time is compile time
                _TALLY.seconds[name] += time.perf_counter() - start


def compile_mae(model: torch.nn.Module, *, mode: str | None = None, shapes: str = "dynamic",
                batch_size: int | None = None, ratio_range: tuple[float, float] | None = None) -> CompiledRegions:
    """Run ``model``'s (a :class:`~amgsn.models.MaskedAutoencoderViT`) regions compiled from now on.
    ``shapes="bucket"`` needs the per-process ``batch_size`` and the run's ``ratio_range`` (the MRUS
    bounds, or a fixed ratio twice) to size the buckets."""
    buckets: tuple[int, ...] = ()
    if shapes == "bucket":
        if batch_size is None or ratio_range is None:
            raise ValueError("--compile-shapes bucket needs the batch size and the ratio range")
        buckets = bucket_sizes(batch_size, model.num_patches, ratio_range)
    model.regions = CompiledRegions(mode, shapes, buckets)
    return model.regions


def compile_classifier(model: torch.nn.Module, *, mode: str | None = None) -> CompiledRegions:
    """Run a :class:`~amgsn.models.ViTClassifier`'s blocks compiled from now on."""
    model.regions = CompiledRegions(mode, "dynamic")
    return model.regions
