"""``amgsn kernels``: compile every Triton kernel of the package ahead of time for named GPU architectures —
no GPU and no CUDA driver needed — and report registers, spills, shared memory, occupancy and grid
(docs/method.md §9.1).

How: the public ops (``amgsn.ops``) are called at the benchmark shapes on CPU tensors through their Triton
route (``AMGSN_TRITON_ON_CPU``), with ``JITFunction.run`` replaced by a recorder — so every launch is the
launchers' own (arguments, strides, dtypes, constexprs, ``num_warps``, grid), and nothing executes. Each
distinct specialisation is then bound and compiled for each ``GPUTarget("cuda", arch, 32)`` the way Triton's
runtime would (``create_function_from_signature`` + ``JITFunction._pack_args`` + ``triton.compile``; the
one runtime call that needs libcuda, ``driver.active.get_current_target()``, is not made). Registers, stack
and static shared memory come from the cubin (``cuobjdump --dump-resource-usage``), spill bytes from
``ptxas -v`` on the same PTX, both tools from the Triton wheel. Triton's own cache keeps compiles: a second
run takes seconds. The compiled center-loss kernels of ``amgsn._C`` are read from the extension's cubins.

Occupancy is CUDA's occupancy-calculator arithmetic for the architecture: registers are allocated per warp
in units of 256 (warp granularity 4), shared memory per CTA plus the 1 KiB the driver reserves per CTA on
sm_80 and newer; waves = ceil(grid / (CTAs per SM x SMs)) on the reference GPU of each architecture.

This module runs in its own process (:func:`run` spawns ``python -m amgsn.engine.kernel_report``):
Triton must be imported *not* interpreting, while ``amgsn.ops`` must route CPU tensors to the launchers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------
# Architectures (per-SM limits: CUDA C Programming Guide, "Technical Specifications per Compute
# Capability") and the GPU whose SM count the waves are counted on.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    gpu: str
    sms: int
    max_warps: int  # resident warps per SM
    max_ctas: int  # resident CTAs per SM
    smem: int  # shared memory per SM usable by CTAs (bytes)
    regs: int = 65536  # 32-bit registers per SM
    reserved_smem: int = 1024  # reserved by the driver per CTA (sm_80+)


ARCHS: dict[int, Arch] = {
    80: Arch("A100", 108, 64, 32, 167936),
    86: Arch("A10", 72, 48, 16, 102400),
    89: Arch("L40S", 142, 48, 24, 102400),
    90: Arch("H100 SXM", 132, 64, 32, 233472),
    100: Arch("B200", 148, 64, 32, 233472),
    120: Arch("RTX PRO 6000", 188, 48, 24, 102400),
}
DEFAULT_ARCHS = (80, 86, 89, 90)

# The benchmark shapes (README / RESULTS.md): ViT-B/16 at 224 px, batch 256.
B, H, N, HEAD_DIM = 256, 12, 196, 64
D_FUSED, D_SELECT, D_SCATTER = 768, 192, 512
BANK_IMAGES = 12271  # RAF-DB's training set: one saliency map per image on the 14 x 14 grid
GRID_SIDE = 14

ROW_KEYS = ("kernel", "specialization", "arch", "gpu", "registers", "spill_bytes", "stack_bytes", "shared_bytes",
            "num_warps", "ctas_per_sm", "warps_per_sm", "grid", "waves", "ops", "compiled", "error")


def ctas_per_sm(arch: Arch, registers: int, num_warps: int, shared_bytes: int) -> int:
    """Resident CTAs per SM: the least of the warp, CTA, register and shared-memory limits."""
    by_warps = arch.max_warps // num_warps
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    warps_by_regs = (arch.regs // regs_per_warp) // 4 * 4  # warp allocation granularity 4
    by_regs = warps_by_regs // num_warps
    by_smem = arch.smem // (shared_bytes + arch.reserved_smem)
    return max(0, min(by_warps, arch.max_ctas, by_regs, by_smem))


def waves(grid: Sequence[int], arch: Arch, ctas: int) -> float | None:
    if ctas <= 0:
        return None
    return math.ceil(math.prod(grid) / (ctas * arch.sms))


# ---------------------------------------------------------------------------------------------------
# Recording the launches (runs in the child process, see the module docstring)
# ---------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    kernel: Any  # triton JITFunction
    args: tuple
    kwargs: dict
    grid: tuple[int, ...]
    op: str


@dataclass
class Recorder:
    launches: list[Launch] = field(default_factory=list)
    op: str = ""

    def __enter__(self) -> Recorder:
        from triton.runtime.jit import JITFunction

        self._saved = JITFunction.run
        recorder = self

        def run(kernel, *args, grid, warmup, **kwargs):
            g = grid(dict(zip(kernel.arg_names, args))) if callable(grid) else grid
            g = tuple(int(v) for v in g) + (1,) * (3 - len(g))
            recorder.launches.append(Launch(kernel, args, dict(kwargs), g, recorder.op))
            return None  # nothing runs: the launchers never read device results on the host

        JITFunction.run = run
        return self

    def __exit__(self, *exc) -> None:
        from triton.runtime.jit import JITFunction

        JITFunction.run = self._saved


_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def record_launches(dtypes: Sequence[str] = ("bf16", "fp16", "fp32", "fp64")) -> list[Launch]:
    """Call every public op that has a Triton route, forward and backward, at the benchmark shapes: in the
    training dtypes, and in float64 (the drop-in ops compute in their input's precision, docs/method.md §3.9)."""
    import torch

    from amgsn import ops

    gen = torch.Generator().manual_seed(0)
    rec = Recorder()

    def r(*shape, dtype=torch.float32):
        return torch.rand(*shape, generator=gen).to(dtype)

    ratios = 0.5 + 0.4 * r(B)  # MRUS: per-image ratios in [0.5, 0.9]
    with rec:
        noises = ((None, False, ""), ("abs", False, " + noise"), ("rel", True, " + relative noise"))
        for name in dtypes:
            dt = getattr(torch, _DTYPES[name])
            q = r(B, H, HEAD_DIM, dtype=dt)
            k = r(B, H, N + 1, HEAD_DIM, dtype=dt)
            noise = r(B, N)
            rec.op = f"cls_attention_scores {name}"
            scores = ops.cls_attention_scores(q, k)
            for ratio, ratio_name in ((ratios, "per-image ratios"), (0.75, "one ratio")):
                for nz, rel, noise_name in noises:
                    rec.op = f"abmg_mask_and_gather {name}, {ratio_name}{noise_name}"
                    x = r(B, N, D_FUSED, dtype=dt).requires_grad_()
                    visible, _ = ops.abmg_mask_and_gather(q, k, x, ratio, noise=None if nz is None else noise,
                                                          relative_noise=rel)
                    rec.op = f"abmg_mask_and_gather backward {name}"
                    visible.backward(torch.ones_like(visible))
            for nz, rel, noise_name in noises:
                rec.op = f"abmg_select{noise_name}"
                sel = ops.abmg_select(scores, ratios, noise=None if nz is None else noise, relative_noise=rel)
            x = r(B, N, D_SELECT, dtype=dt).requires_grad_()
            rec.op = f"gather_visible {name}"
            visible = ops.gather_visible(x, sel.ids_keep, sel.cu_seqlens)
            rec.op = f"gather_visible backward {name}"
            visible.backward(torch.ones_like(visible))
            y = r(sel.ids_keep.shape[0], D_SCATTER, dtype=dt).requires_grad_()
            token = r(D_SCATTER, dtype=dt).requires_grad_()
            rec.op = f"scatter_visible {name}"
            out = ops.scatter_visible(y, sel.ids_keep, sel.cu_seqlens, token, N)
            rec.op = f"scatter_visible backward {name}"
            out.backward(torch.ones_like(out))
        bank = r(BANK_IMAGES, GRID_SIDE, GRID_SIDE, dtype=torch.float16)
        indices = torch.randperm(BANK_IMAGES, generator=gen)[:B]
        boxes = torch.cat([0.2 * r(B, 2), 0.5 + 0.3 * r(B, 2)], dim=1)
        flips = r(B) < 0.5
        rec.op = "saliency_bank_read"
        ops.saliency_bank_read(bank, indices, boxes, flips)
        rec.op = "saliency_bank_write_"
        ops.saliency_bank_write_(bank, indices, r(B, N), boxes, flips, torch.zeros(B, dtype=torch.bool), 0.5)
    return rec.launches


# ---------------------------------------------------------------------------------------------------
# Compiling one specialisation for one architecture
# ---------------------------------------------------------------------------------------------------


def _ptxas(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(arch).path  # Triton >= 3.7 picks a ptxas per architecture
    except TypeError:
        return get_ptxas().path


def _tool(name: str) -> str:
    """A CUDA binary utility shipped beside ptxas in the Triton wheel (cuobjdump)."""
    return str(Path(_ptxas(90)).with_name(name))


def _bind(launch: Launch, arch: int):
    """(src, options, key, label) as JITFunction.run would build them for this target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, debug=launch.kwargs.get("debug", fn.debug) or False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    key = (fn.fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())), repr(attrs),
           repr(sorted(options.__dict__.items())))
    return target, src, options, key, _label(signature, constexprs, options)


def _label(signature: dict, constexprs: dict, options) -> str:
    """A short name for the specialisation: pointer dtypes, constexpr values, warps."""
    dtypes = []
    for ty in signature.values():
        if isinstance(ty, str) and ty.startswith("*") and ty[1:] not in ("i1", "u8", "i8", "i32", "i64"):
            if ty[1:] not in dtypes:
                dtypes.append(ty[1:])
    params = [f"{name}={constexprs[(i,)]}" for i, name in enumerate(signature) if (i,) in constexprs
              and signature[name] == "constexpr"]
    extra = [] if options.enable_fp_fusion else ["no-fma"]
    return " ".join(["/".join(dtypes) or "-", *params, f"w{options.num_warps}", *extra])


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", fh.name], capture_output=True,
                             text=True, check=True).stdout
    m = _RES.search(out)
    if not m:
        raise RuntimeError(f"cuobjdump printed no resource usage: {out.strip()[:200]}")
    return {"registers": int(m[1]), "stack": int(m[2]), "static_shared": int(m[3]), "local": int(m[4])}


_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _spill_bytes(ptx: str, arch: int, fp_fusion: bool) -> int:
    """Spill stores + loads reported by ptxas -v for the kernel's PTX (the flags Triton's make_cubin uses)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2"] + ([] if fp_fusion else ["--fmad=false"])
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([_ptxas(arch), *flags, f"--gpu-name={sm_arch_from_capability(arch)}", str(src),
                              "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True)
    if res.returncode != 0:  # an older ptxas without --regAllocOptLevel: the cubin's numbers still stand
        return -1
    found = _SPILL.findall(res.stdout + res.stderr)
    return sum(int(s) + int(ld) for s, ld in found)


def compile_row(launch: Launch, arch: int) -> dict[str, Any]:
    """One row of the table: compile ``launch``'s specialisation for ``arch`` (errors become the row's)."""
    import triton

    spec = ARCHS[arch]
    row: dict[str, Any] = {"kernel": launch.kernel.fn.__name__, "specialization": "", "arch": f"sm_{arch}",
                           "gpu": spec.gpu, "registers": None, "spill_bytes": None, "stack_bytes": None,
                           "shared_bytes": None, "num_warps": launch.kwargs.get("num_warps", 4),
                           "ctas_per_sm": None, "warps_per_sm": None, "grid": list(launch.grid), "waves": None,
                           "ops": [launch.op], "compiled": False, "error": None}
    try:
        target, src, options, _, label = _bind(launch, arch)
        row["specialization"] = label
        row["num_warps"] = options.num_warps
        compiled = triton.compile(src, target=target, options=options.__dict__)
        usage = _resource_usage(compiled.asm["cubin"])
        shared = int(compiled.metadata.shared) + usage["static_shared"]
        ctas = ctas_per_sm(spec, usage["registers"], options.num_warps, shared)
        row.update(registers=usage["registers"], stack_bytes=usage["stack"], shared_bytes=shared,
                   spill_bytes=_spill_bytes(compiled.asm["ptx"], arch, options.enable_fp_fusion),
                   ctas_per_sm=ctas, warps_per_sm=ctas * options.num_warps,
                   waves=waves(launch.grid, spec, ctas), compiled=True)
    except Exception as err:  # noqa: BLE001 — a failed compile is a row, not a crash
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
    return row


def distinct(launches: Sequence[Launch]) -> list[Launch]:
    """One launch per specialisation (first seen, i.e. at the op's headline shape), with every op that uses it."""
    seen: dict[tuple, Launch] = {}
    for launch in launches:
        key = _bind(launch, 90)[3]
        if key in seen:
            if launch.op not in seen[key].op.split("; "):
                seen[key].op += f"; {launch.op}"
        else:
            seen[key] = Launch(launch.kernel, launch.args, launch.kwargs, launch.grid, launch.op)
    return list(seen.values())


def triton_rows(archs: Sequence[int], jobs: int = 1) -> list[dict[str, Any]]:
    launches = distinct(record_launches())
    work = [(i, arch) for arch in archs for i in range(len(launches))]
    if jobs > 1:
        import multiprocessing as mp

        global _WORK
        _WORK = launches
        with mp.get_context("fork").Pool(jobs) as pool:
            rows = pool.starmap(_compile_indexed, work)
    else:
        rows = [compile_row(launches[i], arch) for i, arch in work]
    for row, (i, _) in zip(rows, work):
        row["ops"] = launches[i].op.split("; ")
    return rows


_WORK: list[Launch] = []


def _compile_indexed(i: int, arch: int) -> dict[str, Any]:
    return compile_row(_WORK[i], arch)


# ---------------------------------------------------------------------------------------------------
# The compiled extension's CUDA kernels (center loss)
# ---------------------------------------------------------------------------------------------------

# Warps per CTA of the extension's kernels (csrc/cuda/center_loss.cu: kThreads = 256, segment_kernel 1024).
_EXTENSION_WARPS = {"segment_kernel": 32}
_FUNC = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ARCH_LINE = re.compile(r"arch = sm_(\d+)")


def _demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def _short_kernel_name(demangled: str) -> tuple[str, str]:
    """'void amgsn::(anonymous namespace)::class_column_kernel<float, float, float, true>(...)' ->
    ('class_column_kernel', 'float, float, float, true')."""
    head = demangled.replace("(anonymous namespace)::", "").split("(", 1)[0]
    m = re.search(r"(\w+)<(.*)>$", head)
    if m:
        return m[1], m[2]
    return head.split("::")[-1].replace("void ", ""), ""


def extension_rows(archs: Sequence[int]) -> list[dict[str, Any]]:
    """Registers / spills / shared memory of every CUDA kernel in amgsn._C, per architecture it was built for."""
    import importlib.util

    spec = importlib.util.find_spec("amgsn._C")
    if spec is None or spec.origin is None:
        return [{"kernel": "amgsn._C", "arch": "-", "compiled": False, "error": "amgsn._C is not built"}]
    res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", spec.origin], capture_output=True, text=True)
    if res.returncode != 0:
        text = (res.stderr or res.stdout).strip()
        if "does not contain device code" in text:
            return []  # a CPU-only build: nothing to report
        return [{"kernel": "amgsn._C", "arch": "-", "compiled": False, "error": f"cuobjdump: {text[:200]}"}]
    rows: list[dict[str, Any]] = []
    arch = None
    entries = []
    for block in re.split(r"(?=arch = sm_\d+)", res.stdout):
        m = _ARCH_LINE.search(block)
        if m:
            arch = int(m[1])
        if arch is None or arch not in archs:
            continue
        for fm in _FUNC.finditer(block):
            entries.append((arch, fm))
    names = _demangle([fm[1] for _, fm in entries])
    # One row per kernel and architecture: the worst of its template instantiations (dtypes, modes).
    worst: dict[tuple[str, int], dict[str, Any]] = {}
    for (arch, fm), name in zip(entries, names):
        kernel, _ = _short_kernel_name(name)
        regs, stack, shared, local = (int(fm[i]) for i in range(2, 6))
        row = worst.setdefault((kernel, arch), {
            "kernel": kernel, "specialization": "", "arch": f"sm_{arch}",
            "gpu": ARCHS[arch].gpu if arch in ARCHS else "", "registers": 0, "spill_bytes": 0, "stack_bytes": 0,
            "shared_bytes": 0, "num_warps": _EXTENSION_WARPS.get(kernel, 8), "ctas_per_sm": None,
            "warps_per_sm": None, "grid": None, "waves": None, "ops": ["center loss (amgsn._C)"], "compiled": True,
            "error": None, "instantiations": 0})
        row["instantiations"] += 1
        row["specialization"] = f"worst of {row['instantiations']} instantiation(s)"
        row["registers"] = max(row["registers"], regs)
        row["spill_bytes"] = max(row["spill_bytes"], local)
        row["stack_bytes"] = max(row["stack_bytes"], stack)
        row["shared_bytes"] = max(row["shared_bytes"], shared)
    for (_, arch), row in sorted(worst.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if arch in ARCHS:
            row["ctas_per_sm"] = ctas_per_sm(ARCHS[arch], row["registers"], row["num_warps"], row["shared_bytes"])
            row["warps_per_sm"] = row["ctas_per_sm"] * row["num_warps"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("kernel", "specialisation", "arch", "regs", "spill", "smem", "warps", "CTAs/SM", "warps/SM", "grid",
            "waves")
    lines = []
    for r in rows:
        grid = "x".join(str(g) for g in r["grid"]) if r.get("grid") else "-"
        if not r.get("compiled"):
            lines.append((r["kernel"], r.get("specialization", ""), r["arch"], "FAILED", "", "", "", "", "", grid,
                          r.get("error") or ""))
            continue
        lines.append((r["kernel"], r["specialization"], r["arch"], str(r["registers"]),
                      str(r["spill_bytes"]), str(r["shared_bytes"]), str(r["num_warps"]),
                      "-" if r["ctas_per_sm"] is None else str(r["ctas_per_sm"]),
                      "-" if r["warps_per_sm"] is None else str(r["warps_per_sm"]), grid,
                      "-" if r["waves"] is None else str(r["waves"])))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)])


def problems(rows: Sequence[dict[str, Any]], fail_on_spill: bool = True) -> list[str]:
    out = []
    for r in rows:
        where = f"{r['kernel']} [{r.get('specialization', '')}] on {r['arch']}"
        if not r.get("compiled"):
            out.append(f"{where}: did not compile: {r.get('error')}")
        elif fail_on_spill and (r.get("spill_bytes") or 0) > 0:
            out.append(f"{where}: spills {r['spill_bytes']} bytes")
    return out


def source_hash() -> str:
    """What the table depends on: the Triton version and the sources of the kernels and of the ops that launch
    them (a JSON written from other sources is stale)."""
    import hashlib
    import importlib.util

    import triton

    digest = hashlib.sha256(triton.__version__.encode())
    for package in ("amgsn.kernels", "amgsn.ops"):
        folder = Path(importlib.util.find_spec(package).origin).parent
        for path in sorted(folder.glob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def parse_archs(text: str) -> list[int]:
    archs = []
    for part in text.split(","):
        part = part.strip().lower().removeprefix("sm_").replace(".", "")
        if not part.isdigit() or int(part) not in ARCHS:
            known = ", ".join(str(a) for a in ARCHS)
            raise ValueError(f"--arch: unknown architecture {part!r} (known: {known})")
        archs.append(int(part))
    return sorted(set(archs))


def _child_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="amgsn kernels")
    p.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)))
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--allow-spills", action="store_true")
    p.add_argument("--no-extension", action="store_true")
    args = p.parse_args(argv)
    archs = parse_archs(args.arch)
    rows = triton_rows(archs, jobs=args.jobs)
    if not args.no_extension:
        rows += extension_rows(archs)
    print(format_table(rows))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        import triton

        Path(args.json_out).write_text(json.dumps({"archs": archs, "triton": triton.__version__,
                                                   "source_hash": source_hash(), "rows": rows}, indent=1) + "\n")
    bad = problems(rows, fail_on_spill=not args.allow_spills)
    for line in bad:
        print(f"amgsn kernels: {line}", file=sys.stderr)
    return 1 if bad else 0


def local_arch() -> int | None:
    """The visible GPU's architecture (e.g. 90), or None without one."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return major * 10 + minor
    except Exception:  # noqa: BLE001 — no driver is the normal case here
        return None
    return None


# The child's entry: Triton's standard library must be built compiled (not interpreted), so Triton is imported
# with interpretation off *before* amgsn; then amgsn.ops is told to route CPU tensors to the launchers (its
# import check wants TRITON_INTERPRET=1; the knob set in Python overrides the variable for Triton itself).
_CHILD = (
    "import os, sys\n"
    "os.environ.pop('TRITON_INTERPRET', None)\n"
    "import triton\n"
    "triton.knobs.runtime.interpret = False\n"
    "os.environ['TRITON_INTERPRET'] = '1'\n"
    "os.environ['AMGSN_TRITON_ON_CPU'] = '1'\n"
    "from amgsn.engine.kernel_report import _child_main\n"
    "sys.exit(_child_main(sys.argv[1:]))\n"
)


def run(argv: Sequence[str]) -> int:
    """Run the report in a child process (see ``_CHILD``); returns its exit status."""
    return subprocess.call([sys.executable, "-c", _CHILD, *argv])
