"""Benchmark set-up: CUDA cases skip without a GPU; a ratio summary is printed at the end."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run by benchmarks/gpu_check.sh)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    from _ratio import SUMMARY

    if SUMMARY:
        terminalreporter.section("ours vs reference (median ratio)")
        for line in SUMMARY:
            terminalreporter.write_line(line)
