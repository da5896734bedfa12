"""Blocks of sampled classes in PyTorch: the pieces the torch backend is made of, which the Triton
backend also uses for the backward from stored softmax numerators.

A block is the columns ``start .. stop - 1`` of the sampled classes. ``grad_cos`` is ``dL/dcos``
of a block, ``[B, stop - start]``.
"""

from __future__ import annotations

import torch

from .normalize import normalize_backward

#: Elements of one [B, chunk] block; a few such blocks are alive at once.
_BLOCK_ELEMENTS = 1 << 20
_MIN_CHUNK = 128


def chunk_bounds(batch: int, num_cols: int, multiple_of: int = 1) -> tuple[range, int]:
    """Block starts over the sampled columns, and the block width (a multiple of ``multiple_of``)."""
    chunk = max(_MIN_CHUNK, _BLOCK_ELEMENTS // max(batch, 1))
    chunk = max(multiple_of, chunk // multiple_of * multiple_of)
    return range(0, num_cols, chunk), chunk


def centers(weight: torch.Tensor, index: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    """The center rows of sampled positions ``start .. stop - 1``."""
    return weight[start:stop] if index is None else weight[index[start:stop]]


def scatter_target(block: torch.Tensor, target_pos: torch.Tensor, start: int, value: torch.Tensor) -> None:
    """Set ``block[b, target_pos[b] - start] = value[b]`` for rows whose target falls in this block.

    Works without a host sync: other rows rewrite their own current value.
    """
    local = target_pos - start
    inside = (local >= 0) & (local < block.shape[1])
    column = local.clamp(0, block.shape[1] - 1)[:, None]
    current = block.gather(1, column).squeeze(1)
    block.scatter_(1, column, torch.where(inside, value.to(block.dtype), current)[:, None])


def grad_from_numerators(numerators: torch.Tensor, offsets: torch.Tensor, tile_width: int, lse: torch.Tensor,
                         grad_lse: torch.Tensor, scale: float) -> torch.Tensor:
    """``dL/dcos = g * s * exp(logit - lse)`` from stored ``numerators = exp(logit - offset)``.

    Args:
        numerators: [B, n], each at most 1 (``offset`` is the largest logit of its tile).
        offsets: [B, ceil(n / tile_width)] fp32/fp64, one per row and tile of ``tile_width`` columns.
        lse, grad_lse: [B], the row LSE and its upstream gradient ``g``.

    Returns ``[B, n]`` in the dtype of ``offsets`` (the target column still to be set by the caller).
    """
    factor = (offsets - lse[:, None]).exp_().mul_((grad_lse * scale)[:, None])
    if factor.shape[1] > 1:
        factor = factor.repeat_interleave(tile_width, dim=1)[:, :numerators.shape[1]]
    return numerators.to(factor.dtype) * factor


def add_block_gradients(grad_cos: torch.Tensor, x_unit: torch.Tensor, w: torch.Tensor, w_inv_norm: torch.Tensor,
                        index: torch.Tensor | None, start: int, grad_unit_x: torch.Tensor | None,
                        grad_weight: torch.Tensor | None) -> None:
    """Add a block's share to the gradient of the unit embeddings and write the gradient of its
    center rows ``w`` (from :func:`centers`, in ``grad_cos``'s dtype, inverse norms ``w_inv_norm``):
    ``grad_unit_x += grad_cos @ w_unit`` and ``grad_weight[rows] = normalize_backward(grad_cos^T @ x_unit)``."""
    if grad_unit_x is not None:
        grad_unit_x.addmm_(grad_cos, w * w_inv_norm[:, None])
    if grad_weight is not None:
        grad_w = normalize_backward(grad_cos.T @ x_unit, w, w_inv_norm).to(grad_weight.dtype)
        stop = start + grad_cos.shape[1]
        if index is None:
            grad_weight[start:stop] = grad_w
        else:
            grad_weight.index_copy_(0, index[start:stop], grad_w)
