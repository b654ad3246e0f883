"""pytest-benchmark glue: time ours with pytest-benchmark and the reference in the same test,
store both medians and the ratio in ``extra_info`` (shown by ``--benchmark-columns`` and saved in
``--benchmark-json``), and print a one-line summary per case at the end of the session."""

from __future__ import annotations

from collections.abc import Callable

from amgsn.benchmarking import median_ms, sync

SUMMARY: list[str] = []


def compare(benchmark, ours: Callable[[], object], reference: Callable[[], object], *, device: str = "cpu",
            rounds: int = 20, label: str = "", target: float | None = None) -> float | None:
    """Benchmark ``ours`` (pytest-benchmark) and ``reference`` (same rounds); return ref/ours."""

    def run():
        ours()
        sync(device)

    ref_ms = median_ms(reference, device, rounds=rounds)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=3, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test
        return None
    ours_ms = benchmark.stats.stats.median * 1e3
    ratio = ref_ms / ours_ms
    benchmark.extra_info.update(
        {"reference_median_ms": ref_ms, "ours_median_ms": ours_ms, "ratio": ratio, "target": target}
    )
    verdict = "" if target is None else f" (target >= {target:.1f}x: {'met' if ratio >= target else 'NOT met'})"
    SUMMARY.append(f"{label}: ours {ours_ms:.3f} ms, reference {ref_ms:.3f} ms, ratio {ratio:.2f}x{verdict}")
    return ratio
