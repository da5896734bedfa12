"""Functional entry points: the margin-softmax log-sum-exp and the PartialFC loss."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from .margins import Margin

#: Backend name -> module providing ``margin_softmax_lse``; imported on first use, so the torch
#: backend works where Triton is not installed.
BACKENDS: dict[str, str] = {"torch": "fastpfc.lse_torch", "triton": "fastpfc.lse_triton"}
REDUCTIONS = ("mean", "sum", "none")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``'auto'`` is Triton for CUDA tensors and torch otherwise; other names are checked."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    return backend


def margin_softmax_lse(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor | None,
    target_pos: torch.Tensor,
    target_logit: torch.Tensor,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Log-sum-exp over the sampled classes of the margin logits, without a [B, C] buffer.

    ``logit[b, c] = target_logit[b]`` at ``c == target_pos[b]`` and ``scale * cos(x_b, W[index[c]])``
    elsewhere. Differentiable in ``embeddings``, ``weight`` and ``target_logit``.

    Args:
        embeddings: [B, D] fp32/fp16/bf16 (fp64 on the torch backend).
        weight: [C_total, D] class centers.
        index: int64 [C] sorted unique rows of ``weight`` to use, or ``None`` for all of them.
        target_pos: int64 [B], position of each row's target among the used classes, -1 for none
            (a row whose class lives on another rank).
        target_logit: [B] margin-adjusted target logits.
        scale: the logit scale ``s``.
        backend: ``'auto'``, ``'triton'`` or ``'torch'``.

    Returns:
        [B] fp32 (fp64 for fp64 inputs): the per-row LSE over these classes. Across shards of the
        classes, ``torch.logsumexp`` of the shards' results is the LSE over all of them.
    """
    name = resolve_backend(backend, embeddings.device)
    module = importlib.import_module(BACKENDS[name])
    return module.margin_softmax_lse(embeddings, weight, index, target_pos, target_logit, scale)


def target_cosines(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """cos(x_b, W[labels[b]]) for the B target classes, [B] in fp32 (fp64 for fp64 inputs)."""
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    x = F.normalize(embeddings.to(dtype), dim=1)
    w = F.normalize(weight[labels].to(dtype), dim=1)
    return (x * w).sum(dim=1)


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
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
) -> torch.Tensor:
    """Margin softmax cross entropy over the classes ``index`` (all classes when ``None``).

    ``loss[b] = logsumexp_c logit[b, c] - margin(cos(x_b, W[labels[b]]))``.

    Args:
        embeddings: [B, D] fp32/fp16/bf16; not normalized (that happens inside).
        weight: [C_total, D] class centers.
        labels: int64 [B] class ids in ``[0, C_total)``; every label must be in ``index``.
        margin: a :class:`fastpfc.margins.Margin`.
        index: int64 [C] sorted unique class ids, e.g. from :func:`fastpfc.sampling.sample_centers`.
        target_pos: int64 [B], ``labels``' positions in ``index`` (computed when ``None``).
        reduction: ``'mean'``, ``'sum'`` or ``'none'`` (then [B]).
        backend: ``'auto'``, ``'triton'`` or ``'torch'``.

    An empty batch gives a zero loss (an empty [0] tensor for ``'none'``) that still
    back-propagates (zero gradients) to ``embeddings`` and ``weight``.
    """
    if embeddings.shape[0] == 0:
        empty = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)).sum(dim=1) + weight[:0].sum()
        return empty if reduction == "none" else empty.sum()
    if target_pos is None:
        target_pos = labels if index is None else torch.searchsorted(index, labels)
    target_logit = margin(target_cosines(embeddings, weight, labels))
    lse = margin_softmax_lse(embeddings, weight, index, target_pos, target_logit, margin.scale, backend)
    return reduce_loss(lse - target_logit, reduction)
