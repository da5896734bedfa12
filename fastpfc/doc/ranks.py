"""The processes of a run and the cores each has: joining ``torchrun``'s process group, DataLoader
workers and step threads per rank, and decisions every rank takes together."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import TrainConfig


def start_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when started by ``torchrun``."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # rank 0 evaluates while the others wait: allow more than NCCL's default 10 minutes
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size(), device


def cores_per_rank() -> int:
    """The CPU cores this process may use, shared among the ranks of its machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def loader_workers(config: TrainConfig, device: torch.device) -> int:
    """DataLoader workers of this rank: ``--workers``, or by default its cores (at most 8) when a
    GPU computes the steps; when the CPU does, the cores the step threads leave plus one (see
    :func:`set_step_threads`)."""
    if config.workers >= 0:
        return config.workers
    cores = cores_per_rank()
    return min(8, cores) if device.type == "cuda" else cores - max(1, cores // 2) + 1


def set_step_threads(workers: int, device: torch.device) -> int:
    """On the CPU, compute the training steps with the cores the ``workers`` leave plus one (at
    least one thread), and return the thread count to restore afterwards. One process more than
    cores: a loader that is ahead waits on its full prefetch queue and the OS gives its core to
    the steps, so neither side idles. On 2 cores, two loaders and one thread trained at a median
    of 235-251 images/s against 211-227 for one of each (three interleaved pairs of 150-step runs);
    with as many threads as cores beside as many loaders the two contend (142 against 151 images/s
    for one of each, five 60-step runs each, interleaved)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, cores_per_rank() - workers + 1))
    return threads


def agree(values: list[int], world: int, device: torch.device) -> list[int]:
    """Each value's maximum over the ranks (for flags: OR), so that every rank takes the same decision."""
    if world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.int64, device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()
