"""Functional entry points: the fused margin softmax and the PartialFC loss.

A backend is a module with three functions (see ``torch_backend`` and ``triton_backend``):

* ``check_tensors(x, weight)``: raise a clear error for inputs it cannot take;
* ``forward_lse(x, weight, index, x_inv_norm, target_pos, target_logit, scale, memory_budget,
  filter_threshold)`` -> ``(lse, saved)``, where ``memory_budget`` is the bytes the backend may
  keep for the backward and ``filter_threshold`` (``None``: off) the inter-class filter: a
  non-target cosine above it counts as 0, with no gradient (the budget is then 0);
* ``backward(x, weight, index, x_inv_norm, saved, target_pos, lse, grad_lse, grad_target_cos, scale,
  need_x, need_weight, weight_rows, filter_threshold)`` -> ``(grad of x / ||x||, grad of weight)``,
  either ``None`` when not needed; with ``weight_rows`` the latter is only the used rows,
  ``[C, D]`` in the order of ``index``.

:class:`MarginSoftmax` does the part every backend shares, in PyTorch on B values: the target
cosines, the margin and its exact gradient (by autograd on those B values), the backward of the
embedding normalization.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import ModuleType

import torch

from .margins import Margin
from .normalize import inv_norms, normalize_backward
from .validation import TRITON_DTYPES, check_sample, check_shapes, check_values, flat_labels

#: Backend name -> module; imported on first use, so the torch backend works without Triton.
BACKENDS: dict[str, str] = {"torch": "fastpfc.torch_backend", "triton": "fastpfc.triton_backend"}
REDUCTIONS = ("mean", "sum", "none")


def resolve_backend(backend: str, device: torch.device, *dtypes: torch.dtype) -> str:
    """``'auto'`` is Triton for CUDA tensors whose ``dtypes`` are all fp32/fp16/bf16, and torch
    otherwise (the CPU, and float64 anywhere); other names are checked."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and all(d in TRITON_DTYPES for d in dtypes) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    return backend


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """Rows are addressed by stride; the embedding dimension must be contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


@dataclass(frozen=True)
class StepOptions:
    """How a step runs, beyond its tensors (see :func:`margin_softmax` for each)."""

    memory_budget: int = 0
    sparse_grad: bool = False
    filter_threshold: float | None = None


class MarginSoftmax(torch.autograd.Function):
    """``(lse, target_logit)`` of the margin logits; see :func:`margin_softmax`."""

    @staticmethod
    def forward(ctx, x, weight, index, target_pos, margin: Margin, backend: ModuleType, options: StepOptions):
        ctx.options = options
        with torch.autocast(x.device.type, enabled=False):  # precision is decided here, not by autocast
            return MarginSoftmax._forward(ctx, x, weight, index, target_pos, margin, backend)

    @staticmethod
    def backward(ctx, grad_lse, grad_target_logit):
        with torch.autocast(grad_lse.device.type, enabled=False):
            return MarginSoftmax._backward(ctx, grad_lse, grad_target_logit)

    @staticmethod
    def _forward(ctx, x, weight, index, target_pos, margin, backend):
        backend.check_tensors(x, weight)
        x, weight = _row_major(x), _row_major(weight)
        target_pos = target_pos.contiguous()  # the kernels read both as flat arrays
        index = None if index is None else index.contiguous()
        x_c = x.to(torch.promote_types(x.dtype, torch.float32))
        x_inv_norm = inv_norms(x_c, rescale=True)  # embeddings may be of any size
        has_target = target_pos >= 0
        target_rows = target_pos.clamp_min(0)  # rows without a target (-1) read row 0, then mask it
        if index is not None:
            target_rows = index[target_rows] if index.numel() > 0 else torch.zeros_like(target_rows)
        w_target = weight[target_rows].to(x_c.dtype)
        cos_target = (x_c * x_inv_norm[:, None] * w_target).sum(dim=1) * inv_norms(w_target)
        target_logit = torch.where(has_target, margin(cos_target), 0.0)
        lse, saved = backend.forward_lse(x, weight, index, x_inv_norm, target_pos, target_logit, margin.scale,
                                         ctx.options.memory_budget, ctx.options.filter_threshold)
        ctx.save_for_backward(x, weight, index, target_pos, x_inv_norm, cos_target, target_logit, lse, *saved)
        ctx.margin, ctx.backend = margin, backend
        return lse, target_logit

    @staticmethod
    def _backward(ctx, grad_lse, grad_target_logit):
        x, weight, index, target_pos, x_inv_norm, cos_target, target_logit, lse, *saved = ctx.saved_tensors
        has_target = target_pos >= 0
        # The target logit feeds the LSE (softmax weight of the target) and the output itself.
        grad_logit = torch.where(has_target, grad_lse * torch.exp(target_logit - lse) + grad_target_logit, 0.0)
        with torch.enable_grad():
            cos = cos_target.detach().requires_grad_()
            (grad_target_cos,) = torch.autograd.grad(ctx.margin(cos), cos, grad_logit)
        grad_unit_x, grad_weight = ctx.backend.backward(
            x, weight, index, x_inv_norm, saved, target_pos, lse, grad_lse, grad_target_cos, ctx.margin.scale,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.options.sparse_grad, ctx.options.filter_threshold)
        if grad_weight is not None and ctx.options.sparse_grad and index is not None:
            grad_weight = torch.sparse_coo_tensor(index[None], grad_weight, weight.shape, is_coalesced=True,
                                                  check_invariants=False)  # sorted unique rows
        grad_x = None
        if grad_unit_x is not None:
            x_unit = x.to(x_inv_norm.dtype) * x_inv_norm[:, None]
            grad_x = normalize_backward(grad_unit_x, x_unit, x_inv_norm).to(x.dtype)
        return grad_x, grad_weight, None, None, None, None, None


def margin_softmax(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor | None,
    target_pos: torch.Tensor,
    margin: Margin,
    backend: str = "auto",
    memory_budget: int = 0,
    sparse_grad: bool = False,
    interclass_filtering_threshold: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp of the margin logits over the used classes, and the target logits.

    ``logit[b, c] = margin(cos(x_b, W[index[c]]))`` at ``c == target_pos[b]`` and
    ``margin.scale * cos(x_b, W[index[c]])`` elsewhere. No [B, C] buffer is allocated.
    Differentiable (both outputs) in ``embeddings`` and ``weight``.

    Args:
        embeddings: [B, D] fp32/fp16/bf16 (fp64 on the torch backend), not normalized.
        weight: [C_total, D] class centers, not normalized.
        index: int64 [C] sorted unique rows of ``weight`` to use, or ``None`` for all of them.
            Not checked here (``partial_fc_loss`` checks it): duplicates give wrong gradients.
        target_pos: int64 [B], each row's target position among the used classes, or -1 for none
            (a row whose class lives on another rank).
        margin: a :class:`fastpfc.margins.Margin`.
        backend: ``'auto'``, ``'triton'`` or ``'torch'``.
        memory_budget: bytes the backward may keep from the forward: the softmax numerators of as
            many leading class blocks as fit (``B`` values per class; fp32, or bf16 for fp16/bf16
            embeddings on the Triton backend), whose gradients then need two matmuls instead of
            three (cosines not recomputed). 0 keeps nothing ``[B, C]``-sized.
        sparse_grad: give ``weight`` a row-sparse gradient (a sparse COO tensor of the rows
            ``index``, see :mod:`fastpfc.optim`) instead of a dense one: nothing ``[C_total, D]``
            is allocated. With ``index=None`` every row is used and the gradient stays dense.
        interclass_filtering_threshold: 0 (off), or a threshold in (0, 1]: every non-target
            cosine above it counts as 0 (logit 0, still in the softmax) and gets no gradient, as
            insightface's ``interclass_filtering_threshold`` (its ``*_filter04`` configs use 0.4):
            classes that look like near-duplicates of the target are taken for label noise. Rows
            without a target (``target_pos`` -1) filter every column. Keeps nothing for the
            backward (``memory_budget`` is not used).

    Returns:
        ``lse``: [B] fp32 (fp64 for fp64 inputs), the per-row LSE over these classes. Over shards
        of the classes, ``torch.logsumexp`` of the shards' ``lse`` is the LSE over all of them.
        ``target_logit``: [B], same dtype, 0 where ``target_pos`` is -1.
    """
    check_memory_budget(memory_budget)
    check_filter_threshold(interclass_filtering_threshold)
    name = resolve_backend(backend, embeddings.device, embeddings.dtype, weight.dtype)
    module = importlib.import_module(BACKENDS[name])
    # With filtering nothing is stored: a stored numerator cannot tell the backward it was filtered.
    filtering = interclass_filtering_threshold > 0
    options = StepOptions(0 if filtering else memory_budget, sparse_grad, interclass_filtering_threshold or None)
    return MarginSoftmax.apply(embeddings, weight, index, target_pos, margin, module, options)


def check_memory_budget(memory_budget: int) -> None:
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0:
        raise ValueError(f"memory_budget must be a number of bytes >= 0, got {memory_budget!r}")


def check_filter_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold) \
            or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"interclass_filtering_threshold must be 0 (off) or a cosine in (0, 1], got {threshold!r}")


def empty_batch_loss(embeddings: torch.Tensor, weight: torch.Tensor, reduction: str,
                     sparse_grad: bool = False) -> torch.Tensor:
    """The loss of an empty batch: zero (``[0]`` for ``'none'``), connected to both inputs so that
    backward gives them zero gradients (a sparse one without rows for ``sparse_grad``)."""
    no_rows = torch.empty(0, dtype=torch.int64, device=weight.device)
    centers = torch.nn.functional.embedding(no_rows, weight, sparse=True) if sparse_grad else weight[:0]
    empty = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)).sum(dim=1) + centers.sum()
    return empty if reduction == "none" else empty.sum()


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``'mean'``, ``'sum'`` or ``'none'`` to per-row losses [B] (the mean of no rows is 0)."""
    if reduction == "mean":
        return loss.mean() if loss.numel() > 0 else loss.sum()
    if reduction == "sum":
        return loss.sum()
    return loss


def partial_fc_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: Margin,
    index: torch.Tensor | None = None,
    target_pos: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = True,
    memory_budget: int = 0,
    sparse_grad: bool = False,
    interclass_filtering_threshold: float = 0.0,
) -> torch.Tensor:
    """Margin softmax cross entropy over the classes ``index`` (all classes when ``None``).

    ``loss[b] = logsumexp_c logit[b, c] - margin(cos(x_b, W[labels[b]]))``.

    Args:
        embeddings: [B, D] fp32/fp16/bf16; not normalized (that happens inside).
        weight: [C_total, D] class centers.
        labels: [B] (or [B, 1]) class ids in ``[0, C_total)``, any integer dtype; every label must be
            in ``index``.
        margin: a :class:`fastpfc.margins.Margin`.
        index: int64 [C] sorted unique class ids, e.g. from :func:`fastpfc.sampling.sample_centers`.
        target_pos: int64 [B], ``labels``' positions in ``index`` (computed when ``None``).
        reduction: ``'mean'``, ``'sum'`` or ``'none'`` (then [B], fp32).
        backend: ``'auto'``, ``'triton'`` or ``'torch'``.
        validate: check shapes, label range, finite embeddings, that ``index`` is sorted, unique
            and holds every label, and that ``target_pos`` points at them (one host sync);
            ``False`` skips it.
        memory_budget: bytes the backward may keep from the forward (see :func:`margin_softmax`).
        sparse_grad: a row-sparse gradient for ``weight`` (see :func:`margin_softmax`).
        interclass_filtering_threshold: inter-class filtering (see :func:`margin_softmax`).

    An empty batch gives a zero loss (an empty [0] tensor for ``'none'``) that still
    back-propagates (zero gradients) to ``embeddings`` and ``weight``.
    """
    labels = flat_labels(labels)
    if validate:
        check_shapes(embeddings, labels, weight)
        check_sample(index, target_pos, labels)
        if labels.numel() > 0:
            check_values(embeddings, labels, weight.shape[0], index, target_pos)
    # Any integer dtype in, int64 to the kernels (a narrow or unsigned dtype would be read wrongly).
    labels = labels.to(torch.int64).contiguous()
    index = None if index is None else index.to(torch.int64).contiguous()
    target_pos = None if target_pos is None else target_pos.to(torch.int64).contiguous()
    if embeddings.shape[0] == 0:
        return empty_batch_loss(embeddings, weight, reduction, sparse_grad)
    if target_pos is None:
        target_pos = labels if index is None else torch.searchsorted(index, labels)
    lse, target_logit = margin_softmax(embeddings, weight, index, target_pos, margin, backend, memory_budget,
                                       sparse_grad, interclass_filtering_threshold)
    return reduce_loss(lse - target_logit, reduction)
