"""Test set-up: without CUDA, the Triton kernels run under the interpreter on CPU tensors.

``TRITON_INTERPRET`` must be in the environment before any ``@triton.jit`` module is imported,
which is why it is set here, at collection time, before the tests import ``fastpfc.kernels``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
