"""``PartialFCLoss``: the drop-in loss module that owns, samples and trains the class centers."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .distributed import ProcessGroup, shard_bounds, sharded_partial_fc_loss, world
from .functional import (
    BACKENDS,
    REDUCTIONS,
    check_filter_threshold,
    check_memory_budget,
    partial_fc_loss,
    reduce_loss,
)
from .margins import CosFace, Margin
from .sampling import sample_centers
from .validation import check_constructor_arguments, check_shapes, check_values, flat_labels

#: Rows per independently seeded block of the initial weight (see ``init_centers``).
_INIT_BLOCK_ROWS = 1 << 16
_SEED_RANGE = 2**62


def _mix(seed: int, stream: int, salt: int) -> int:
    """A seed for stream ``stream`` derived from ``seed`` (distinct streams, reproducible)."""
    return (seed * 6364136223846793005 + (stream + 1) * 1442695040888963407 + salt) % _SEED_RANGE


def init_centers(start: int, stop: int, dim: int, seed: int) -> torch.Tensor:
    """Rows ``start:stop`` of an N(0, 0.01) [num_classes, dim] matrix determined by ``seed`` alone.

    Each block of ``_INIT_BLOCK_ROWS`` rows has its own generator, so every sharding of the classes
    over any number of ranks starts from the same centers as a single process.
    """
    out = torch.empty(stop - start, dim)
    first, last = start // _INIT_BLOCK_ROWS, (stop - 1) // _INIT_BLOCK_ROWS
    for block in range(first, last + 1):
        block_start = block * _INIT_BLOCK_ROWS
        rows = torch.randn(_INIT_BLOCK_ROWS, dim, generator=torch.Generator().manual_seed(_mix(seed, block, 1)))
        lo, hi = max(start, block_start), min(stop, block_start + _INIT_BLOCK_ROWS)
        out[lo - start: hi - start] = rows[lo - block_start: hi - block_start] * 0.01
    return out


class PartialFCLoss(nn.Module):
    """Margin softmax (ArcFace, CosFace, ...) over many classes with PartialFC center sampling.

    Example::

        loss_fn = PartialFCLoss(embedding_size=512, num_classes=1_300_000,
                                margin=CosFace(s=64.0, m=0.4), sample_rate=0.3)
        loss = loss_fn(embeddings, labels)  # embeddings [B, 512] fp32/fp16/bf16, labels [B] int64
        loss.backward()                     # grads reach the embeddings and loss_fn.weight

    Args:
        embedding_size: D, the embedding dimension.
        num_classes: C, the number of classes.
        margin: the target-logit margin; default ``CosFace(s=64, m=0.4)``.
        sample_rate: fraction of classes used per call. Every class present in the batch is kept
            and the other slots are uniform random negatives, ``max(int(rate * C), #positives)``
            in all (per shard when sharded). ``1.0`` is the exact full softmax, with no sampling
            work at all.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        backend: ``'auto'`` (Triton for fp32/fp16/bf16 CUDA tensors, torch otherwise: the CPU,
            float64), ``'triton'`` or ``'torch'``.
        validate: check label range and finite embeddings on every call (one host sync), and that
            the loss is finite (a second one), naming the centers with NaN/Inf if they are the cause.
        seed: seeds the initial centers and the sampling generator; ``None`` draws one from the
            global RNG (from rank 0's, when sharded). The generator state is part of
            ``state_dict()``, so a resumed run samples exactly what the uninterrupted run would have.
        process_group: shard the classes over this group; by default over the default group when
            ``torch.distributed`` is initialised with more than one rank. See
            :mod:`fastpfc.distributed` for the sharded semantics (the loss is the global batch's,
            the same on every rank).
        ddp_backbone: when sharded, scale the embeddings' gradient by the world size, so that a
            backbone under DDP (which averages gradients) gets the single-process gradient.
        memory_budget: bytes the backward may keep from the forward (the softmax numerators of as
            many class blocks as fit, a third less backward matmul work for them); 0, the
            default, keeps nothing ``[B, C]``-sized. See :func:`fastpfc.functional.margin_softmax`.
        interclass_filtering_threshold: 0 (off), or a cosine in (0, 1]: non-target classes whose
            cosine exceeds it count as cosine 0 with no gradient, as insightface's option of that
            name (see :func:`fastpfc.functional.margin_softmax`).
        sparse_grad: give ``weight`` a row-sparse gradient holding only the sampled rows (like
            ``nn.Embedding(sparse=True)``): no dense ``[C, D]`` gradient, and, with
            :class:`fastpfc.optim.SparseSGD` or :class:`fastpfc.optim.SparseAdamW`, an update that
            touches only the sampled rows and their optimizer state.

    Attributes:
        weight: ``nn.Parameter`` [num_classes, embedding_size] (this rank's shard
            [class_stop - class_start, embedding_size] when sharded), fp32, N(0, 0.01).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: Margin | None = None,
        sample_rate: float = 1.0,
        reduction: str = "mean",
        backend: str = "auto",
        validate: bool = True,
        seed: int | None = None,
        process_group: ProcessGroup = None,
        ddp_backbone: bool = True,
        memory_budget: int = 0,
        sparse_grad: bool = False,
        interclass_filtering_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        check_constructor_arguments(embedding_size, num_classes, margin, sample_rate)
        check_memory_budget(memory_budget)
        check_filter_threshold(interclass_filtering_threshold)
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(f"embedding_size and num_classes must be positive, got {embedding_size}, {num_classes}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.margin = margin if margin is not None else CosFace()
        self.sample_rate, self.reduction, self.backend, self.validate = sample_rate, reduction, backend, validate
        self.process_group, self.ddp_backbone, self.memory_budget = process_group, ddp_backbone, memory_budget
        self.sparse_grad, self.interclass_filtering_threshold = sparse_grad, interclass_filtering_threshold
        self.world_size, self.rank = world(process_group)
        self.class_start, self.class_stop = shard_bounds(num_classes, self.world_size, self.rank)
        self.seed = seed if seed is not None else self._shared_random_seed()
        self.weight = nn.Parameter(init_centers(self.class_start, self.class_stop, embedding_size, self.seed))
        self._generator: torch.Generator | None = None
        self._saved_generator_state: dict[str, Any] | None = None

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def _shared_random_seed(self) -> int:
        seed = [int(torch.randint(_SEED_RANGE, ()).item())]
        if self.sharded:
            src = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
            dist.broadcast_object_list(seed, src=src, group=self.process_group)
        return seed[0]

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of ``embeddings`` [B, D] with class ids ``labels`` [B]: scalar, or [B] fp32 for 'none'.

        When sharded, ``B`` is this rank's batch and the result is the global batch's loss.
        Labels of shape ``[B, 1]`` are taken as ``[B]``. With ``validate``, a loss that is not
        finite although the inputs were raises a ``ValueError`` naming the class centers at fault.
        """
        labels = flat_labels(labels)
        options = {"backend": self.backend, "memory_budget": self.memory_budget, "sparse_grad": self.sparse_grad,
                   "interclass_filtering_threshold": self.interclass_filtering_threshold}
        if self.sharded:  # checks there: a rejection on one rank raises on all of them
            losses = sharded_partial_fc_loss(
                embeddings, self.weight, labels, self.margin, self.class_start, self.num_classes,
                sample_rate=self.sample_rate, generator=self._sampler() if self.sample_rate < 1.0 else None,
                reduction="none", group=self.process_group, validate=self.validate,
                embedding_grad_scale=float(self.world_size) if self.ddp_backbone else 1.0, **options)
        else:
            check_shapes(embeddings, labels, self.weight)
            if self.validate and labels.numel() > 0:
                check_values(embeddings, labels, self.num_classes)
            labels = labels.long()
            index = target_pos = None
            if self.sample_rate < 1.0 and labels.numel() > 0:
                index, target_pos = sample_centers(labels, self.num_classes, self.sample_rate, self._sampler())
            losses = partial_fc_loss(embeddings, self.weight, labels, self.margin, index, target_pos, "none",
                                     validate=False, **options)  # checked above
        if self.validate and losses.numel() > 0 and not bool(torch.isfinite(losses).all()):
            raise self._non_finite_loss_error(losses)
        return reduce_loss(losses, self.reduction)

    def _non_finite_loss_error(self, losses: torch.Tensor) -> ValueError:
        """What made a loss non-finite when the embeddings and labels were checked: the centers
        (their rows with NaN/Inf, on this rank's shard), or else the margin's arithmetic."""
        rows = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        bad = (~torch.isfinite(self.weight.detach()).all(dim=1)).nonzero().flatten() + self.class_start
        if bad.numel() > 0:
            shown = bad[:10].tolist()
            return ValueError(f"the class centers (loss_fn.weight) contain NaN or Inf in the rows of classes "
                              f"{shown}{' ...' if bad.numel() > 10 else ''} ({bad.numel()} rows); the loss of batch "
                              f"rows {rows[:10]} is not finite. The centers diverged or were loaded so: restore "
                              "them from a checkpoint")
        return ValueError(f"the loss of batch rows {rows[:10]} is not finite although the embeddings, labels "
                          f"and this rank's class centers are (margin {self.margin})")

    def _sampler(self) -> torch.Generator:
        """This rank's sampling generator on the weight's device, created (and restored) on first use."""
        device = self.weight.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            saved = self._saved_generator_state
            if saved is not None and saved["device_type"] == device.type:
                self._generator.set_state(saved["state"])
            else:
                self._generator.manual_seed(_mix(self.seed, self.rank, 2))
        return self._generator

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Refuse, before anything is copied, a state saved for other classes (another rank's shard).
        A plain ``{"weight": ...}`` (insightface's ``PartialFC_V2``, :meth:`plain_state_dict`) loads
        with a warning: it holds no sampling state, so sampling restarts from this module's seed."""
        if prefix + "weight" in state_dict and prefix + "_extra_state" not in state_dict:
            warnings.warn("loading a state without fastpfc's sampling state (a plain {'weight': ...}, e.g. "
                          "insightface's): sampling restarts from this module's seed", stacklevel=4)
            state_dict[prefix + "_extra_state"] = {**self.get_extra_state(), "generator": None}
        extra = state_dict.get(prefix + "_extra_state")
        mine = [self.class_start, self.class_stop, self.num_classes]
        if isinstance(extra, dict) and "classes" in extra and list(extra["classes"]) != mine:
            start, stop, total = extra["classes"]
            raise ValueError(f"this state holds classes [{start}, {stop}) of {total}, but this module owns "
                             f"[{mine[0]}, {mine[1]}) of {mine[2]}: load a world-size-independent checkpoint "
                             "with fastpfc.distributed.load_full_state_dict")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"weight": [C, D] (this rank's shard when sharded)}``, a copy: the layout of
        insightface's ``PartialFC_V2.state_dict()`` at the same world size and rank (its shards
        split the classes as fastpfc's do), without fastpfc's sampling state."""
        return {"weight": self.weight.detach().clone()}

    def get_extra_state(self) -> dict[str, Any]:
        state = {"seed": self.seed, "world_size": self.world_size, "rank": self.rank,
                 "classes": [self.class_start, self.class_stop, self.num_classes],
                 "generator": self._saved_generator_state}
        if self._generator is not None:
            state["generator"] = {"device_type": self._generator.device.type, "state": self._generator.get_state()}
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self._generator = None
        self._saved_generator_state = state["generator"]
        if (state["world_size"], state["rank"]) != (self.world_size, self.rank):
            self._saved_generator_state = None
            warnings.warn("sampling state saved at another world size or rank: sampling restarts from the seed",
                          stacklevel=2)

    def extra_repr(self) -> str:
        shard = f", classes [{self.class_start}, {self.class_stop}) of rank {self.rank}" if self.sharded else ""
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, margin={self.margin}, "
                f"sample_rate={self.sample_rate}, reduction={self.reduction!r}, backend={self.backend!r}, "
                f"memory_budget={self.memory_budget}, sparse_grad={self.sparse_grad}, "
                f"interclass_filtering_threshold={self.interclass_filtering_threshold}{shard}")
