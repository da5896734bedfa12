"""Peak-memory measurement for tests and benchmarks, on CUDA and on the CPU.

CUDA: the delta of ``torch.cuda.max_memory_allocated`` over the call. CPU (Linux): the process's
peak resident set size over the call, read from ``/proc/self/status`` after resetting it through
``/proc/self/clear_refs``. For that to see every large tensor, glibc is asked (once, process-wide)
to serve allocations of 64 KiB and more with their own mappings, which go back to the system
when freed, instead of recycling heap pages that are already resident. Large blocks freed before
that request stay on the heap and are reused first: set it at the start of the process
(:func:`track_cpu_allocations`; the test and benchmark conftests do), before anything allocates.
Each measurement also hands every arena's free pages back to the system (``malloc_trim``) first.
Without both, a 50 MB buffer measured as 8 MB after 100 MB of heap had been freed earlier.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import re
import sys
from collections.abc import Callable

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_BYTES = 64 * 1024


@functools.cache
def track_cpu_allocations() -> ctypes.CDLL | None:
    """Have glibc map every allocation of 64 KiB or more on its own and unmap it when freed, so
    that the CPU peak memory measured here sees it (process-wide, once; call it before anything
    large is allocated). Returns libc, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)
    libc.mallopt(_M_TRIM_THRESHOLD, _MMAP_BYTES)
    return libc


def _release_free_heap() -> None:
    """Hand every arena's free pages back to the system, so that reusing them shows in the
    resident set."""
    track_cpu_allocations().malloc_trim(0)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1)) * 1024


def allocated_memory(device: torch.device) -> int:
    """Bytes allocated now: by the CUDA caching allocator, or the process's resident set (CPU)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    _release_free_heap()
    return _status_bytes("VmRSS")


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[object, int]:
    """Run ``fn()`` and return ``(its result, peak bytes allocated above the level before it)``."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - base
    if not sys.platform.startswith("linux"):
        raise NotImplementedError("CPU peak memory is measured through /proc, on Linux only")
    _release_free_heap()
    base = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    result = fn()
    return result, _status_bytes("VmHWM") - base
