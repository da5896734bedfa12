"""Test set-up: without CUDA, the Triton kernels run under the interpreter on CPU tensors.

``TRITON_INTERPRET`` must be in the environment before any ``@triton.jit`` module is imported,
which is why it is set here, at collection time, before the tests import ``fastpfc.kernels``.

The README's command runs the suite in two pytest-xdist workers (``-n 2``); each then keeps to
one intra-op thread, so that the two do not fight over the cores (two threads per worker made the
training tests 2-5x slower on a 2-core machine). No test depends on the thread count.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)

from fastpfc.profiling import track_cpu_allocations  # noqa: E402 - after TRITON_INTERPRET is set

track_cpu_allocations()  # before any test allocates: CPU peak memory sees every large buffer
