"""A few training steps of a tiny model with PartialFCLoss, alone or sharded under torchrun.

    python examples/distributed_demo.py                        # one process, the global batch
    torchrun --nproc_per_node=2 examples/distributed_demo.py   # 2 ranks: DDP backbone, sharded classes

Both print the same losses: each rank takes its slice of the same global batch, the class centers
are split between the ranks, and DDP's averaged backbone gradient equals the single-process one.
"""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastpfc import CosFace, PartialFCLoss

BATCH, STEPS, NUM_CLASSES = 64, 5, 1000


def train(rank: int, world_size: int, device: torch.device) -> None:
    torch.manual_seed(0)  # the same backbone on every rank
    backbone = torch.nn.Linear(32, 16).to(device)
    if world_size > 1:
        backbone = DistributedDataParallel(backbone)
    loss_fn = PartialFCLoss(16, NUM_CLASSES, margin=CosFace(s=16.0, m=0.2), seed=1).to(device)
    optimizer = torch.optim.SGD([*backbone.parameters(), *loss_fn.parameters()], lr=0.5)

    data = torch.Generator().manual_seed(2)
    for step in range(STEPS):
        images = torch.randn(BATCH, 32, generator=data)
        labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=data)
        mine = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
        loss = loss_fn(backbone(images[mine].to(device)), labels[mine].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0:
            print(f"step {step} loss {loss.item():.6f}", flush=True)


def main() -> None:
    distributed = "RANK" in os.environ  # set by torchrun
    device = torch.device("cpu")
    if distributed:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    train(rank, world_size, device)  # returns with DDP and the loss freed, before the group goes
    if distributed:
        dist.barrier()  # no rank tears the group down while another is still using it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
