"""Model-parallel PartialFC over ``torch.distributed``: class centers sharded, embeddings gathered.

Each rank owns a contiguous slice of the classes (the remainder goes to the lowest ranks) and sees
the whole global batch: embeddings and labels are all-gathered, each rank computes the per-row
log-sum-exp over its own classes with the fused kernels, and only those B numbers (plus the B
target logits) cross the network. The backward sends the embedding gradients back to their ranks
(one reduce-scatter) and nothing else.

Gradient contract. Every rank returns the same loss, the loss of a single process on the global
batch, and every rank must call ``backward`` on the same function of it. Then:

* ``weight.grad`` on each rank equals the single-process gradient of that rank's rows;
* the embeddings of each rank receive ``embedding_grad_scale`` times their single-process
  gradient. The default scale is the world size, because DDP on the backbone *averages* gradients
  over ranks: the averaged backbone gradient then equals the single-process one.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from .functional import empty_batch_loss, margin_softmax, reduce_loss
from .margins import Margin
from .sampling import sample_centers
from .validation import check_shapes, check_values, flat_labels

ProcessGroup = dist.ProcessGroup | None


def world(group: ProcessGroup = None) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group``; ``(1, 0)`` when torch.distributed is not initialised."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def shard_bounds(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of the classes owned by ``rank``: contiguous, remainder to the lowest ranks."""
    if num_classes < world_size:
        raise ValueError(f"num_classes ({num_classes}) must be at least the world size ({world_size})")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _code(value: object) -> int:
    """A number that stands for ``value`` the same way in every process (``hash`` of a string is not)."""
    return zlib.crc32(repr(value).encode())


def agree_on_inputs(
    embeddings: torch.Tensor, labels: torch.Tensor, weight_shard: torch.Tensor, num_classes: int | None,
    validate: bool, group: ProcessGroup = None, settings: dict[str, object] | None = None,
) -> tuple[list[int], bool]:
    """Check this rank's inputs, then tell every rank what every rank has (one small all-gather).

    Returns every rank's row count and whether any rank's embeddings need a gradient. If any rank's
    inputs were rejected, or the ranks differ in the embeddings' dtype, the embedding size or any
    of ``settings`` (name -> value: the margin, the sample rate, ...), every rank raises (a rejected
    rank its own error), so none is left waiting in a collective or mixing different losses.
    """
    error = None
    try:
        check_shapes(embeddings, labels, weight_shard)
        if validate and num_classes is not None and labels.numel() > 0:
            check_values(embeddings, labels, num_classes)
    except Exception as rejected:  # noqa: BLE001 - whatever the check raised, every rank must learn of it
        error = rejected
    shared = {"embeddings' dtype": embeddings.dtype, "embedding size": weight_shard.shape[1], **(settings or {})}
    codes = [_code(value) for value in shared.values()]
    mine = [0, 1, 0] if error is not None else [embeddings.shape[0], 0, int(embeddings.requires_grad)]
    world_size, _ = world(group)
    status = [torch.empty(3 + len(codes), dtype=torch.int64, device=weight_shard.device) for _ in range(world_size)]
    dist.all_gather(status, torch.tensor(mine + codes, dtype=torch.int64, device=weight_shard.device), group=group)
    table = torch.stack(status).tolist()
    if error is not None:
        raise error
    failed = [rank for rank, row in enumerate(table) if row[1]]
    if failed:
        raise RuntimeError(f"rank(s) {failed} rejected their inputs (see the error raised there); "
                           "no rank computed the loss")
    differing = [name for i, name in enumerate(shared) if len({row[3 + i] for row in table}) > 1]
    if differing:  # every rank sees the same table, so every rank is here: gather the values to name them
        values = [None] * world_size
        dist.all_gather_object(values, {name: repr(shared[name]) for name in differing}, group=group)
        detail = "; ".join(f"{name}: " + ", ".join(f"rank {r} {v[name]}" for r, v in enumerate(values))
                           for name in differing)
        raise ValueError(f"the ranks must agree on the loss's settings and inputs, but they differ in {detail}")
    return [row[0] for row in table], any(row[2] for row in table)


def _all_gather_rows(local: torch.Tensor, sizes: list[int], group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's rows (``sizes[r]`` of them) in rank order: [sum(sizes), ...]."""
    longest = max(sizes)
    padded = local.new_zeros(longest, *local.shape[1:])
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(gathered, sizes, strict=True)])


class _GatherRows(torch.autograd.Function):
    """All-gather of rows whose backward sums each row's gradient over ranks and returns it home."""

    @staticmethod
    def forward(ctx, local, sizes, group, grad_scale):
        ctx.sizes, ctx.group, ctx.grad_scale = sizes, group, grad_scale
        return _all_gather_rows(local, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, (_, rank) = ctx.sizes, world(ctx.group)
        padded = grad.new_zeros(len(sizes), max(sizes), *grad.shape[1:],
                                dtype=torch.promote_types(grad.dtype, torch.float32))
        for r, part in enumerate(grad.split(sizes)):
            padded[r, : part.shape[0]] = part
        mine = torch.empty_like(padded[0])
        dist.reduce_scatter(mine, list(padded.unbind()), op=dist.ReduceOp.SUM, group=ctx.group)  # fp32 or wider
        return (mine[: sizes[rank]] * ctx.grad_scale).to(grad.dtype), None, None, None


class _GatherReplicated(torch.autograd.Function):
    """All-gather into [world, ...] for a computation every rank repeats identically.

    Each rank's copy of the downstream gradient is the gradient of the one shared loss, so the
    backward keeps this rank's slice and communicates nothing.
    """

    @staticmethod
    def forward(ctx, local, group):
        world_size, ctx.rank = world(group)
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local.contiguous(), group=group)
        return torch.stack(gathered)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None


def sharded_partial_fc_loss(
    embeddings: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    margin: Margin,
    class_start: int,
    num_classes: int | None = None,
    index: torch.Tensor | None = None,
    sample_rate: float = 1.0,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    group: ProcessGroup = None,
    embedding_grad_scale: float | None = None,
    validate: bool = True,
    memory_budget: int = 0,
    sparse_grad: bool = False,
    interclass_filtering_threshold: float = 0.0,
) -> torch.Tensor:
    """PartialFC loss with the class centers sharded over the ranks of ``group``.

    Args:
        embeddings: this rank's [b_r, D]; ranks may hold different numbers of rows.
        weight_shard: [C_r, D], the centers of classes ``class_start .. class_start + C_r - 1``.
        labels: this rank's int64 [b_r], global class ids.
        margin: a :class:`fastpfc.margins.Margin`.
        class_start: the first class id of this rank's shard.
        num_classes: the total number of classes, for the label check (skipped when ``None``).
        index: int64 sorted unique rows of ``weight_shard`` to use (shard-local ids) holding every
            label of the global batch that falls in this shard; ``None`` uses the whole shard, or
            a sample of it when ``sample_rate < 1``.
        sample_rate, generator: PartialFC sampling within the shard: the shard's positives of the
            global batch plus uniform negatives drawn with ``generator`` (give each rank its own
            stream).
        reduction: ``'mean'``/``'sum'`` over the global batch, or ``'none'`` for the global
            batch's [B] per-row losses (in rank order). The same value on every rank.
        embedding_grad_scale: factor on the embeddings' gradient; ``None`` means the world size
            (right for a backbone under DDP, see the module docstring).
        validate: check shapes, and with ``num_classes`` the label range and finite embeddings; a
            rejection on any rank raises on every rank.
        memory_budget: bytes this rank's backward may keep from its forward (see
            :func:`fastpfc.functional.margin_softmax`).
        sparse_grad: a row-sparse gradient for ``weight_shard`` (the rows used on this rank).
        interclass_filtering_threshold: inter-class filtering of each shard's non-target cosines
            (see :func:`fastpfc.functional.margin_softmax`).
    """
    world_size, _ = world(group)
    labels = flat_labels(labels)
    settings = {"margin": margin, "sample rate": sample_rate, "reduction": reduction, "number of classes": num_classes,
                "interclass_filtering_threshold": interclass_filtering_threshold}
    sizes, any_needs_grad = agree_on_inputs(embeddings, labels, weight_shard, num_classes, validate, group, settings)
    if any_needs_grad and not embeddings.requires_grad:  # every rank must join the backward's reduce-scatter
        embeddings = embeddings.detach().requires_grad_()
    labels = labels.long()
    if sum(sizes) == 0:
        return empty_batch_loss(embeddings, weight_shard, reduction, sparse_grad)
    scale = float(world_size) if embedding_grad_scale is None else embedding_grad_scale
    all_embeddings = _GatherRows.apply(embeddings, sizes, group, scale)
    local = _all_gather_rows(labels, sizes, group) - class_start
    in_shard = (local >= 0) & (local < weight_shard.shape[0])
    if index is None and sample_rate < 1.0:
        index, _ = sample_centers(local[in_shard], weight_shard.shape[0], sample_rate, generator)
    position = local if index is None else torch.searchsorted(index, local.clamp(0, weight_shard.shape[0] - 1))
    target_pos = torch.where(in_shard, position, -1)
    lse, target_logit = margin_softmax(all_embeddings, weight_shard, index, target_pos, margin, backend,
                                       memory_budget, sparse_grad, interclass_filtering_threshold)
    parts = _GatherReplicated.apply(torch.stack([lse, target_logit]), group)  # [world, 2, B]
    loss = torch.logsumexp(parts[:, 0], dim=0) - parts[:, 1].sum(dim=0)
    return reduce_loss(loss, reduction)


def gather_shards(shard: torch.Tensor, num_classes: int, group: ProcessGroup = None) -> torch.Tensor:
    """The full [num_classes, ...] tensor from every rank's shard (weights or their optimizer state).

    Every rank receives the full tensor; call it on every rank.
    """
    world_size, _ = world(group)
    if world_size == 1:
        return shard.detach().clone()
    sizes = [stop - start for start, stop in (shard_bounds(num_classes, world_size, r) for r in range(world_size))]
    return _all_gather_rows(shard.detach(), sizes, group)


def take_shard(full: torch.Tensor, num_classes: int, group: ProcessGroup = None) -> torch.Tensor:
    """This rank's rows of a full [num_classes, ...] tensor (a copy), for any world size."""
    if full.shape[0] != num_classes:
        raise ValueError(f"expected {num_classes} rows, got {full.shape[0]}")
    start, stop = shard_bounds(num_classes, *world(group))
    return full[start:stop].clone()


def full_state_dict(loss_fn) -> dict:
    """A world-size-independent checkpoint of a ``PartialFCLoss``: the full centers [C, D] and seed.

    Call on every rank (the shards are all-gathered); save it from one rank. The optimizer state
    of the centers goes with :func:`full_optimizer_state_dict`.
    """
    return {"weight": gather_shards(loss_fn.weight, loss_fn.num_classes, loss_fn.process_group),
            "num_classes": loss_fn.num_classes, "embedding_size": loss_fn.embedding_size, "seed": loss_fn.seed}


def load_full_state_dict(loss_fn, state: dict) -> None:
    """Load :func:`full_state_dict` output into a ``PartialFCLoss`` on any number of ranks.

    Each rank copies its own rows; the sampling streams restart from the saved seed.
    """
    expected = (loss_fn.num_classes, loss_fn.embedding_size)
    if tuple(state["weight"].shape) != expected:
        raise ValueError(f"checkpoint holds centers of shape {tuple(state['weight'].shape)}, "
                         f"this loss has [num_classes, embedding_size] = {list(expected)}")
    with torch.no_grad():
        loss_fn.weight.copy_(take_shard(state["weight"], loss_fn.num_classes, loss_fn.process_group))
    loss_fn.set_extra_state({"seed": state["seed"], "generator": None,
                             "world_size": loss_fn.world_size, "rank": loss_fn.rank})


def _weight_state_id(optimizer: torch.optim.Optimizer, loss_fn) -> int:
    """The id of ``loss_fn.weight`` in ``optimizer.state_dict()`` (parameters are numbered in group order)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for position, param in enumerate(params):
        if param is loss_fn.weight:
            return position
    raise ValueError("the optimizer does not hold this loss's weight")


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer, loss_fn) -> dict:
    """``optimizer.state_dict()`` with the per-class state of ``loss_fn.weight`` (every state tensor
    with one row per class of the shard: momentum, Adam moments, per-row step counts) gathered into
    ``[num_classes, ...]``: world-size independent, like :func:`full_state_dict`.

    Works for any optimizer holding the centers (``fastpfc.optim`` or ``torch.optim``). Call on
    every rank; save it from one rank.
    """
    state = optimizer.state_dict()
    weight_id, rows = _weight_state_id(optimizer, loss_fn), loss_fn.weight.shape[0]
    per_class = state["state"].get(weight_id, {})
    for key, value in sorted(per_class.items()):  # the same order on every rank: the gathers pair up
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows:
            per_class[key] = gather_shards(value, loss_fn.num_classes, loss_fn.process_group)
    return state


def load_full_optimizer_state_dict(optimizer: torch.optim.Optimizer, loss_fn, state: dict) -> None:
    """Load :func:`full_optimizer_state_dict` output on any number of ranks: each rank keeps its
    own rows of the per-class state, then ``optimizer.load_state_dict`` takes it."""
    weight_id = _weight_state_id(optimizer, loss_fn)
    state = {**state, "state": dict(state["state"])}
    per_class = dict(state["state"].get(weight_id, {}))
    for key, value in per_class.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == loss_fn.num_classes:
            per_class[key] = take_shard(value, loss_fn.num_classes, loss_fn.process_group)
    if per_class:
        state["state"][weight_id] = per_class
    optimizer.load_state_dict(state)
