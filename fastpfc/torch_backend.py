"""Chunked PyTorch backend: the fused kernels' math, one block of sampled classes at a time.

Peak extra memory is O(B * chunk) (plus the gradient of the weight itself), never O(B * C):
the forward keeps a running log-sum-exp, the backward recomputes each block of cosines.
Computes in fp32, or fp64 for fp64 inputs (which makes ``gradcheck`` possible).
"""

from __future__ import annotations

import torch

from .normalize import inv_norms, normalize_backward

#: Elements of one [B, chunk] block; a few such blocks are alive at once.
_BLOCK_ELEMENTS = 1 << 20
_MIN_CHUNK = 128


def check_tensors(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Every floating dtype and device works here."""


def _chunk_bounds(batch: int, num_cols: int) -> tuple[range, int]:
    """Block starts over the sampled columns, and the block width."""
    chunk = max(_MIN_CHUNK, _BLOCK_ELEMENTS // max(batch, 1))
    return range(0, num_cols, chunk), chunk


def _centers(weight: torch.Tensor, index: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    return weight[start:stop] if index is None else weight[index[start:stop]]


def _scatter_target(block: torch.Tensor, target_pos: torch.Tensor, start: int, value: torch.Tensor) -> None:
    """Set ``block[b, target_pos[b] - start] = value[b]`` for rows whose target falls in this block.

    Works without a host sync: other rows rewrite their own current value.
    """
    local = target_pos - start
    inside = (local >= 0) & (local < block.shape[1])
    column = local.clamp(0, block.shape[1] - 1)[:, None]
    current = block.gather(1, column).squeeze(1)
    block.scatter_(1, column, torch.where(inside, value.to(block.dtype), current)[:, None])


def forward_lse(x, weight, index, x_inv_norm, target_pos, target_logit, scale):
    """Row LSE of the margin logits (contract of :class:`fastpfc.functional.MarginSoftmax`)."""
    x_unit = x.to(x_inv_norm.dtype) * x_inv_norm[:, None]
    num_cols = weight.shape[0] if index is None else index.shape[0]
    starts, chunk = _chunk_bounds(x.shape[0], num_cols)
    lse = torch.full((x.shape[0],), float("-inf"), dtype=x_unit.dtype, device=x.device)
    for start in starts:
        w = _centers(weight, index, start, start + chunk).to(x_unit.dtype)
        logits = (x_unit @ w.T).mul_(inv_norms(w)[None, :] * scale)
        _scatter_target(logits, target_pos, start, target_logit)
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
    return lse, ()


def backward(x, weight, index, x_inv_norm, saved, target_pos, lse, grad_lse, grad_target_cos, scale,
             need_x, need_weight):
    """Gradients of the unit embeddings and of the weight (contract of ``MarginSoftmax``)."""
    x_unit = x.to(x_inv_norm.dtype) * x_inv_norm[:, None]
    grad_unit_x = torch.zeros_like(x_unit) if need_x else None
    grad_weight = torch.zeros_like(weight) if need_weight else None
    num_cols = weight.shape[0] if index is None else index.shape[0]
    starts, chunk = _chunk_bounds(x.shape[0], num_cols)
    for start in starts:
        w = _centers(weight, index, start, start + chunk).to(x_unit.dtype)
        w_inv_norm = inv_norms(w)
        w_unit = w * w_inv_norm[:, None]
        # dL/dcos, built in place in the cosine block; the target column comes from the margin.
        grad_cos = (x_unit @ w_unit.T).mul_(scale).sub_(lse[:, None]).exp_().mul_((grad_lse * scale)[:, None])
        _scatter_target(grad_cos, target_pos, start, grad_target_cos)
        if grad_unit_x is not None:
            grad_unit_x.addmm_(grad_cos, w_unit)
        if grad_weight is not None:
            grad_w = normalize_backward(grad_cos.T @ x_unit, w, w_inv_norm).to(weight.dtype)
            if index is None:
                grad_weight[start:start + chunk] = grad_w
            else:
                grad_weight.index_copy_(0, index[start:start + chunk], grad_w)
    return grad_unit_x, grad_weight
