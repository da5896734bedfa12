"""Benchmarks run on CUDA when present, else on the CPU (Triton kernels are not benchmarked there)."""

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
