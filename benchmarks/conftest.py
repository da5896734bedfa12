"""Benchmarks run on CUDA when present, else on the CPU (Triton kernels are not benchmarked there).

At the end of the run a compact summary (``benchmarks/summary.py``) says, per case, how fastpfc and
each peer compare with the reference; pytest-benchmark's own tables list the cases in numeric order.
"""

import pytest
import torch

from benchmarks import summary
from fastpfc.profiling import track_cpu_allocations

track_cpu_allocations()  # before any case allocates: CPU peak memory sees every large buffer


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.hookimpl(hookwrapper=True)
def pytest_benchmark_group_stats(config, benchmarks, group_by):
    outcome = yield
    outcome.force_result(sorted(outcome.get_result(), key=lambda group: summary.natural_key(group[0] or "")))


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables: the last thing printed
def pytest_terminal_summary(terminalreporter):
    rows = summary.lines()
    if rows:
        terminalreporter.write_sep("=", "fastpfc against the reference and its peers")
        for row in rows:
            terminalreporter.write_line(row)
