"""`amgsn kernels` (docs/method.md §9.1): every Triton kernel compiles ahead of time for sm_80-sm_90 without a
GPU, within its budgets — no spills anywhere, at least 2 CTAs per SM on sm_90 for every kernel launched at the
benchmark shapes — and the compiled extension's CUDA kernels are reported too.

The table comes from `make kernels` (runs/kernels.json, which `make test` writes first) when it was made from
the current sources and Triton; otherwise this module runs the command itself (Triton's cache keeps it short).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import amgsn.ops  # noqa: F401  (loads amgsn._C, whose schemas the extension test looks for)
from amgsn.engine import kernel_report as kr

ROOT = Path(__file__).resolve().parents[1]
ARCHS = [80, 86, 89, 90]


def _triton_kernels_in_package() -> set[str]:
    """Every @triton.jit function of kernels/ that is launched (a `*_kernel`), read from the source."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                if any("jit" in ast.unparse(d) for d in node.decorator_list):
                    names.add(node.name)
    return names


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    made = ROOT / "runs" / "kernels.json"
    if made.exists():
        table = json.loads(made.read_text())
        if table.get("source_hash") == kr.source_hash() and table.get("archs") == ARCHS:
            return table
    out = tmp_path_factory.mktemp("kernels") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "AMGSN_TRITON_ON_CPU")}
    res = subprocess.run([sys.executable, "-m", "amgsn", "kernels", "--arch", ",".join(map(str, ARCHS)),
                          "--json", str(out), "--allow-spills"], capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return json.loads(out.read_text())


def test_every_triton_kernel_compiles_for_every_arch(report):
    rows = [r for r in report["rows"] if r["ops"] != ["center loss (amgsn._C)"]]
    failed = [f"{r['kernel']} [{r['specialization']}] {r['arch']}: {r['error']}" for r in rows if not r["compiled"]]
    assert not failed, failed
    for arch in ARCHS:
        compiled = {r["kernel"] for r in rows if r["arch"] == f"sm_{arch}"}
        assert compiled == _triton_kernels_in_package(), f"sm_{arch}: {compiled ^ _triton_kernels_in_package()}"
    # bf16, fp16, fp32 and fp64 specialisations of the fused op's kernels were all compiled
    probs = {r["specialization"].split()[0] for r in rows if r["kernel"] == "_head_probs_kernel"}
    assert probs == {"bf16/fp32", "fp16/fp32", "fp32", "fp64"}


def test_no_kernel_spills_on_any_arch(report):
    spills = [f"{r['kernel']} [{r['specialization']}] {r['arch']}: {r['spill_bytes']} B" for r in report["rows"]
              if r["compiled"] and r["spill_bytes"] != 0]
    assert not spills, spills


def test_masking_kernels_fit_two_ctas_per_sm_on_sm90(report):
    rows = [r for r in report["rows"] if r["arch"] == "sm_90" and r["ops"] != ["center loss (amgsn._C)"]]
    assert rows
    tight = [f"{r['kernel']} [{r['specialization']}]: {r['registers']} registers, {r['ctas_per_sm']} CTA/SM"
             for r in rows if r["ctas_per_sm"] < 2]
    assert not tight, tight
    # the grid at the headline shape: the fused op's head kernel runs B x H programs
    head = next(r for r in rows if r["kernel"] == "_head_probs_kernel")
    assert head["grid"] == [kr.B, kr.H, 1] and head["waves"] >= 1


def test_extension_kernels_are_reported_per_built_arch(report):
    if not hasattr(torch.ops.amgsn, "cuda_arch_list"):
        assert os.environ.get("FORCE_CUDA") != "1", "FORCE_CUDA=1 but amgsn._C has no CUDA kernels"
        pytest.skip("a CPU-only build of amgsn._C has no CUDA kernels to report")
    rows = [r for r in report["rows"] if r["ops"] == ["center loss (amgsn._C)"]]
    for arch in ARCHS:
        names = {r["kernel"] for r in rows if r["arch"] == f"sm_{arch}"}
        assert {"loss_forward_kernel", "backward_kernel", "class_column_kernel", "segment_kernel",
                "segment_column_kernel", "apply_kernel"} <= names, (arch, names)
    assert all(r["registers"] > 0 and r["spill_bytes"] == 0 for r in rows)


def test_occupancy_arithmetic():
    h100, a10 = kr.ARCHS[90], kr.ARCHS[86]
    # registers: 128 per thread at 8 warps is exactly 2 CTAs (32 K registers each); 141 rounds to 144 -> 1
    assert kr.ctas_per_sm(h100, 128, 8, 0) == 2
    assert kr.ctas_per_sm(h100, 141, 8, 0) == 1
    assert kr.ctas_per_sm(h100, 64, 8, 0) == 4
    # warps: 48 resident on sm_86, so at most 6 CTAs of 8 warps however few registers
    assert kr.ctas_per_sm(a10, 16, 8, 0) == 6
    # the CTA limit, and shared memory (+1 KiB reserved per CTA)
    assert kr.ctas_per_sm(h100, 16, 1, 0) == 32
    assert kr.ctas_per_sm(h100, 32, 4, 100 * 1024) == 2
    assert kr.waves([256, 12, 1], h100, 4) == 6
    assert kr.waves([256, 12, 1], h100, 0) is None


def test_archs_are_validated():
    assert kr.parse_archs("90,sm_80, 8.9") == [80, 89, 90]
    with pytest.raises(ValueError, match="--arch: unknown architecture '75'"):
        kr.parse_archs("80,75")


_BROKEN = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def fine_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


    @triton.jit
    def broken_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.undefined_function(offs), mask=offs < n)


    @triton.jit
    def heavy_kernel(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs[:, None] * BLOCK + offs[None, :]).to(tl.float64)
        tl.store(x_ptr + offs[:, None] * BLOCK + offs[None, :], tl.sort(v, 1).to(tl.float32))
''')

_SCRIPT = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    import broken
    from amgsn.engine import kernel_report as kr
    x = torch.zeros(4096)
    launches = [kr.Launch(broken.fine_kernel, (x, 100), {"BLOCK": 128}, (1, 1, 1), "fine"),
                kr.Launch(broken.broken_kernel, (x, 100), {"BLOCK": 128}, (1, 1, 1), "broken"),
                kr.Launch(broken.heavy_kernel, (x,), {"BLOCK": 32, "num_warps": 1, "maxnreg": 32}, (1, 1, 1), "heavy")]
    rows = [kr.compile_row(launch, 90) for launch in launches]
    for row in rows:
        print(row["kernel"], row["compiled"], row["registers"], row["spill_bytes"], repr(row["error"]))
    for line in kr.problems(rows):
        print("PROBLEM", line)
    kr.triton_rows = lambda archs, jobs=1: rows
    print("EXIT", kr._child_main(["--arch", "90", "--no-extension"]))
''')


def test_a_failed_compile_is_a_row_and_a_spill_is_a_problem(tmp_path):
    (tmp_path / "broken.py").write_text(_BROKEN)
    script = tmp_path / "script.py"
    script.write_text(_SCRIPT)
    child = kr._CHILD.replace("from amgsn.engine.kernel_report import _child_main\n", "").replace(
        "sys.exit(_child_main(sys.argv[1:]))\n", f"exec(open({str(script)!r}).read())\n")
    res = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    fine, broken, heavy = (line.split() for line in lines[:3])
    assert fine[:2] == ["fine_kernel", "True"] and fine[3] == "0"
    assert broken[:2] == ["broken_kernel", "False"] and "undefined_function" in lines[1]
    assert heavy[:2] == ["heavy_kernel", "True"] and int(heavy[3]) > 0  # maxnreg=32 forces spills
    problems = [line for line in lines if line.startswith("PROBLEM")]
    assert any("broken_kernel" in p and "did not compile" in p for p in problems)
    assert any("heavy_kernel" in p and "spills" in p for p in problems)
    assert not any("fine_kernel" in p for p in problems)
    assert lines[-1] == "EXIT 1"
