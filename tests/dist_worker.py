"""Worker processes for the distributed tests (gloo on CPU), and the problem they share.

Each worker joins a file-rendezvous process group, runs every scenario on its shard and its slice
of the global batch, and saves what it computed for the parent test to compare.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

import fastpfc.distributed as distributed
from fastpfc import ArcFace, PartialFCLoss
from fastpfc.distributed import (
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    shard_bounds,
    sharded_partial_fc_loss,
)
from fastpfc.optim import SparseAdamW

NUM_CLASSES, DIM = 53, 24
MARGIN = ArcFace(s=16.0, m=0.4)
FILTER = 0.15  # inter-class filtering threshold: random cosines at D=24 exceed it often enough
BATCH_SIZES = {2: [7, 12], 3: [5, 11, 0]}  # unequal, and one rank with no rows at all


def problem(world_size: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The global batch, centers and a fixed sample set, the same in every process."""
    gen = torch.Generator().manual_seed(world_size)
    batch = sum(BATCH_SIZES[world_size])
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return {
        "x": torch.randn(batch, DIM, generator=gen, dtype=dtype),
        "w": torch.randn(NUM_CLASSES, DIM, generator=gen, dtype=dtype),
        "labels": labels,
        "index": torch.unique(torch.cat([labels, torch.randperm(NUM_CLASSES, generator=gen)[:20]])),
        "full_state": torch.randn(NUM_CLASSES, DIM, generator=gen),
        "full_optimizer_state": {
            "state": {0: {"exp_avg": torch.randn(NUM_CLASSES, DIM, generator=gen),
                          "exp_avg_sq": torch.rand(NUM_CLASSES, DIM, generator=gen),
                          "row_step": torch.randint(0, 9, (NUM_CLASSES,), generator=gen, dtype=torch.int32)}},
            "param_groups": [{"lr": 0.05, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "params": [0]}],
        },
    }


def _rows(world_size: int, rank: int) -> slice:
    sizes = BATCH_SIZES[world_size]
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def _loss_and_grads(p, world_size, rank, backend, dtype, fixed_sample, reduction, filter_threshold=0.0):
    start, stop = shard_bounds(NUM_CLASSES, world_size, rank)
    x = p["x"][_rows(world_size, rank)].to(dtype).requires_grad_()
    w = p["w"][start:stop].to(dtype).requires_grad_()
    index = None
    if fixed_sample:
        index = p["index"][(p["index"] >= start) & (p["index"] < stop)] - start
    loss = sharded_partial_fc_loss(x, w, p["labels"][_rows(world_size, rank)], MARGIN, start, index=index,
                                   reduction=reduction, backend=backend,
                                   interclass_filtering_threshold=filter_threshold)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * weights).sum().backward()
    return {"loss": loss.detach(), "grad_x": x.grad, "grad_w": w.grad}


def run(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors: the Triton backend runs in the interpreter
    # A collective left waiting (a regression) fails the test after a minute instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    p = problem(world_size)
    results = {}
    for backend, dtype in (("torch", torch.float64), ("triton", torch.float32)):
        for fixed_sample in (False, True):
            for reduction in ("mean", "sum", "none"):
                key = f"{backend}-{'fixed' if fixed_sample else 'full'}-{reduction}"
                results[key] = _loss_and_grads(p, world_size, rank, backend, dtype, fixed_sample, reduction)

    results["filtered"] = _loss_and_grads(p, world_size, rank, "torch", torch.float64, True, "mean", FILTER)

    # A step in which every rank's batch is empty: a zero loss, zero gradients, no hang.
    start, stop = shard_bounds(NUM_CLASSES, world_size, rank)
    w = p["w"][start:stop].clone().requires_grad_()
    empty = sharded_partial_fc_loss(p["x"][:0].requires_grad_(), w, p["labels"][:0], MARGIN, start)
    empty.backward()
    results["all_empty"] = {"loss": empty.detach(), "grad_w": w.grad}

    # The module: initial centers and the loss do not depend on the world size.
    module = PartialFCLoss(DIM, NUM_CLASSES, margin=MARGIN, seed=7)
    x = p["x"][_rows(world_size, rank)].float().requires_grad_()
    loss = module(x, p["labels"][_rows(world_size, rank)])
    loss.backward()
    results["module"] = {"weight": module.weight.detach().clone(), "loss": loss.detach(), "grad_x": x.grad,
                         "grad_w": module.weight.grad.clone()}

    # Sampling: rank-distinct streams, positives kept on their owner; the loss is the single-process
    # loss over the union of the ranks' samples.
    sampled = PartialFCLoss(DIM, NUM_CLASSES, margin=MARGIN, sample_rate=0.3, seed=7)
    seed = sampled._sampler().initial_seed()
    loss = sampled(p["x"][_rows(world_size, rank)].float(), p["labels"][_rows(world_size, rank)])
    loss.backward()
    results["sampled"] = {"rows": (sampled.weight.grad.abs().sum(dim=1) > 0).nonzero().flatten(),
                          "loss": loss.detach(), "seed": seed}

    # A state_dict is tied to its rank's classes: loading another rank's is refused before any copy.
    states = [None] * world_size
    dist.all_gather_object(states, module.state_dict())
    weight_before = module.weight.detach().clone()
    try:
        module.load_state_dict(states[(rank + 1) % world_size])
        results["wrong_rank_load"] = "loaded"
    except ValueError as error:
        results["wrong_rank_load"] = str(error)
    results["weight_kept"] = torch.equal(module.weight, weight_before)
    module.load_state_dict(states[rank])

    # One rank's bad input raises on every rank instead of leaving the others in a collective.
    x = p["x"][_rows(world_size, rank)].float()
    if rank == 1:
        x = torch.full((3, DIM), float("nan"))
    try:
        module(x, p["labels"][: x.shape[0]])
        results["bad_input"] = "no error"
    except (ValueError, RuntimeError) as error:
        results["bad_input"] = f"{type(error).__name__}: {error}"

    # Any exception in one rank's input check, of any type (uint16 labels once raised
    # NotImplementedError, which escaped the check), reaches every rank instead of a hang.
    real_check = distributed.check_values
    if rank == 1:
        def unsupported(*args, **kwargs):
            raise NotImplementedError("labels of an unsupported kind")
        distributed.check_values = unsupported
    try:
        module(p["x"][_rows(world_size, rank)].float(), p["labels"][_rows(world_size, rank)])
        results["odd_error"] = "no error"
    except (NotImplementedError, RuntimeError) as error:
        results["odd_error"] = f"{type(error).__name__}: {error}"
    distributed.check_values = real_check

    # Ranks that differ in the embeddings' dtype or in the margin: every rank raises, naming it,
    # instead of a gloo abort (dtype) or a silently mixed loss (margin).
    start, stop = shard_bounds(NUM_CLASSES, world_size, rank)
    x = p["x"][_rows(world_size, rank)].float()
    shard = p["w"][start:stop].float()
    for name, (x_rank, margin_rank) in {"dtype": (x.half() if rank == 1 else x, MARGIN),
                                        "margin": (x, ArcFace(s=32.0, m=0.4) if rank == 1 else MARGIN)}.items():
        try:
            sharded_partial_fc_loss(x_rank, shard, p["labels"][_rows(world_size, rank)], margin_rank, start)
            results[f"differ_{name}"] = "no error"
        except ValueError as error:
            results[f"differ_{name}"] = str(error)

    # Ranks may differ on whether their embeddings need a gradient; backward still completes.
    x = p["x"][_rows(world_size, rank)].float()
    if rank != 1:
        x.requires_grad_()
    loss = module(x, p["labels"][_rows(world_size, rank)])
    loss.backward()
    results["mixed_grad"] = {"loss": loss.detach(), "grad_x": x.grad}

    # Checkpoints: gather the full centers, and load a full state saved at another world size.
    results["full_state"] = full_state_dict(module)["weight"]
    load_full_state_dict(module, {"weight": p["full_state"], "num_classes": NUM_CLASSES,
                                  "embedding_size": DIM, "seed": 7})
    results["loaded_shard"] = module.weight.detach().clone()

    # Row-sparse gradients and a row-sparse optimizer on the shards: two steps at sample rate 1
    # (the single-process twin is in the test), then the optimizer state gathered and reloaded.
    sparse = PartialFCLoss(DIM, NUM_CLASSES, margin=MARGIN, seed=7, sparse_grad=True).double()
    optimizer = SparseAdamW(sparse.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        sparse(p["x"][_rows(world_size, rank)], p["labels"][_rows(world_size, rank)]).backward()
        optimizer.step()
    results["sparse_trained"] = {"weight": full_state_dict(sparse)["weight"],
                                 "optimizer": full_optimizer_state_dict(optimizer, sparse)}
    load_full_optimizer_state_dict(optimizer, sparse, p["full_optimizer_state"])
    results["sparse_loaded"] = dict(optimizer.state[sparse.weight])
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
