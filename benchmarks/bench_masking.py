"""Masking ops vs the MAE/AttMask-style references (docs/method.md §9). Cases live in amgsn.benchmarking.

CPU:  .venv/bin/pytest benchmarks/bench_masking.py --benchmark-enable -q
CUDA: benchmarks/gpu_check.sh (the ``cuda`` cases)
"""

import pytest
from _ratio import compare

from amgsn.benchmarking import MASKING_CASES

PARAMS = [
    pytest.param(case, device, id=f"{case.op}-{device}", marks=[pytest.mark.cuda] if device == "cuda" else [])
    for case in MASKING_CASES
    for device in case.devices
]


@pytest.mark.parametrize("case,device", PARAMS)
def test_masking(benchmark, case, device):
    ours, reference, _ = case.build(device)
    benchmark.group = case.op
    compare(benchmark, ours, reference, device=device, label=f"{case.op} [{device}] {case.shape}",
            target=case.target)
