"""Chunked PyTorch backend: the fused kernels' math, one block of sampled classes at a time.

The forward computes each block's logits, their row maximum ``m`` and softmax numerators
``exp(logit - m)`` (all at most 1), and folds the block into a running log-sum-exp. The backward
needs ``dL/dcos = g * s * exp(logit - lse)``, which is the stored numerators times
``g * s * exp(m - lse)`` per row. Blocks whose numerators fit in ``memory_budget`` bytes keep
them for the backward, which then does two matmuls per block (the two gradients); the others are
recomputed there (three matmuls). With the default budget of 0 the peak extra memory is
O(B * chunk) (plus the gradient of the weight itself), never O(B * C).
Computes in fp32, or fp64 for fp64 inputs (which makes ``gradcheck`` possible).
"""

from __future__ import annotations

import torch

from .normalize import inv_norms
from .softmax_blocks import (
    add_block_gradients,
    center_grad_buffer,
    centers,
    chunk_bounds,
    grad_from_numerators,
    scatter_target,
)


def check_tensors(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Every floating dtype and device works here."""


def _unit_centers(weight, index, start, stop, dtype):
    """The block's centers, normalized, in ``dtype``, and their inverse norms."""
    w = centers(weight, index, start, stop).to(dtype)
    w_inv_norm = inv_norms(w)
    return w * w_inv_norm[:, None], w_inv_norm


def _filtered(cos: torch.Tensor, filter_threshold: float | None) -> torch.Tensor:
    """Inter-class filtering, in place: cosines above the threshold count as 0."""
    return cos if filter_threshold is None else cos.masked_fill_(cos > filter_threshold, 0.0)


def forward_lse(x, weight, index, x_inv_norm, target_pos, target_logit, scale, memory_budget, filter_threshold):
    """Row LSE of the margin logits (contract of :class:`fastpfc.functional.MarginSoftmax`).

    ``saved`` holds, for the first blocks that fit in ``memory_budget`` bytes, their softmax
    numerators [B, chunk] and row maxima [B, 1], in pairs.
    """
    x_unit = x.to(x_inv_norm.dtype) * x_inv_norm[:, None]
    num_cols = weight.shape[0] if index is None else index.shape[0]
    starts, chunk = chunk_bounds(x.shape[0], num_cols, x.device)
    lse = torch.full((x.shape[0],), float("-inf"), dtype=x_unit.dtype, device=x.device)
    saved, budget_left = [], memory_budget
    for start in starts:
        w_unit, _ = _unit_centers(weight, index, start, start + chunk, x_unit.dtype)
        logits = _filtered(x_unit @ w_unit.T, filter_threshold).mul_(scale)
        scatter_target(logits, target_pos, start, target_logit)
        block_max = logits.amax(dim=1, keepdim=True)
        numerators = logits.sub_(block_max).exp_()
        lse = torch.logaddexp(lse, block_max.squeeze(1) + numerators.sum(dim=1).log())
        size = numerators.numel() * numerators.element_size()
        if size <= budget_left:
            saved += [numerators, block_max]
            budget_left -= size
        else:
            budget_left = -1  # the stored blocks are a prefix: block i is saved[2 * i: 2 * i + 2]
    return lse, tuple(saved)


def backward(x, weight, index, x_inv_norm, saved, target_pos, lse, grad_lse, grad_target_cos, scale,
             need_x, need_weight, weight_rows, filter_threshold):
    """Gradients of the unit embeddings and of the weight (contract of ``MarginSoftmax``)."""
    x_unit = x.to(x_inv_norm.dtype) * x_inv_norm[:, None]
    num_cols = weight.shape[0] if index is None else index.shape[0]
    grad_unit_x = torch.zeros_like(x_unit) if need_x else None
    grad_weight, write_index = center_grad_buffer(weight, index, num_cols, weight_rows) if need_weight else (None, None)
    starts, chunk = chunk_bounds(x.shape[0], num_cols, x.device)
    for block, start in enumerate(starts):
        w_unit, w_inv_norm = _unit_centers(weight, index, start, start + chunk, x_unit.dtype)
        # dL/dcos; the target column comes from the margin.
        if 2 * block < len(saved):  # from the stored numerators
            numerators, block_max = saved[2 * block], saved[2 * block + 1]
            grad_cos = grad_from_numerators(numerators, block_max, lse, grad_lse, scale, x_unit.dtype)
        else:  # recomputed, in place in the cosine block
            cos = x_unit @ w_unit.T
            filtered = None if filter_threshold is None else cos > filter_threshold
            grad_cos = cos.mul_(scale).sub_(lse[:, None]).exp_().mul_((grad_lse * scale)[:, None])
            if filtered is not None:  # a filtered logit is the constant 0: no gradient
                grad_cos.masked_fill_(filtered, 0.0)
        scatter_target(grad_cos, target_pos, start, grad_target_cos)
        add_block_gradients(grad_cos, x_unit, w_unit, w_inv_norm, write_index, start, grad_unit_x, grad_weight)
    return grad_unit_x, grad_weight
