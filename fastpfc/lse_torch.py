"""Chunked PyTorch backend: the fused kernels' math, one block of classes at a time.

Peak extra memory is O(B * chunk) (plus the gradient of the weight itself), never O(B * C):
the forward keeps a running log-sum-exp, the backward recomputes each block of cosines.
"""

from __future__ import annotations

import torch

from .normalize import inv_norms, normalize_backward, target_logit_grad

#: Elements of one [B, chunk] block; a few such blocks are alive at once.
_BLOCK_ELEMENTS = 1 << 20
_MIN_CHUNK = 128


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


class ChunkedMarginSoftmaxLSE(torch.autograd.Function):
    """Row log-sum-exp of the margin logits; see :func:`fastpfc.functional.margin_softmax_lse`."""

    @staticmethod
    def forward(ctx, x, weight, index, target_pos, target_logit, scale):
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        x_c = x.to(compute_dtype)
        x_inv_norm = inv_norms(x_c)
        x_unit = x_c * x_inv_norm[:, None]
        num_cols = weight.shape[0] if index is None else index.shape[0]
        starts, chunk = _chunk_bounds(x.shape[0], num_cols)
        lse = torch.full((x.shape[0],), float("-inf"), dtype=compute_dtype, device=x.device)
        for start in starts:
            w = _centers(weight, index, start, start + chunk).to(compute_dtype)
            logits = (x_unit @ w.T).mul_(inv_norms(w)[None, :] * scale)
            _scatter_target(logits, target_pos, start, target_logit)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        ctx.save_for_backward(x, weight, index, target_pos, target_logit, lse)
        ctx.scale = scale
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        x, weight, index, target_pos, target_logit, lse = ctx.saved_tensors
        scale = ctx.scale
        x_c = x.to(lse.dtype)
        x_inv_norm = inv_norms(x_c)
        x_unit = x_c * x_inv_norm[:, None]
        grad_lse = grad_lse.to(lse.dtype)
        grad_unit_x = torch.zeros_like(x_c)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        num_cols = weight.shape[0] if index is None else index.shape[0]
        starts, chunk = _chunk_bounds(x.shape[0], num_cols)
        for start in starts:
            w = _centers(weight, index, start, start + chunk).to(lse.dtype)
            w_inv_norm = inv_norms(w)
            w_unit = w * w_inv_norm[:, None]
            # dL/dcos of the non-target logits, built in place in the cosine block.
            grad_cos = (x_unit @ w_unit.T).mul_(scale).sub_(lse[:, None]).exp_().mul_((grad_lse * scale)[:, None])
            _scatter_target(grad_cos, target_pos, start, torch.zeros_like(target_logit))
            grad_unit_x.addmm_(grad_cos, w_unit)
            if grad_weight is not None:
                grad_w = normalize_backward(grad_cos.T @ x_unit, w, w_inv_norm).to(weight.dtype)
                if index is None:
                    grad_weight[start:start + chunk] = grad_w
                else:
                    grad_weight.index_copy_(0, index[start:start + chunk], grad_w)
        grad_x = normalize_backward(grad_unit_x, x_c, x_inv_norm).to(x.dtype)
        grad_target = target_logit_grad(grad_lse, target_logit.to(lse.dtype), lse, target_pos)
        return grad_x, grad_weight, None, None, grad_target.to(target_logit.dtype), None


def margin_softmax_lse(x, weight, index, target_pos, target_logit, scale):
    """Torch backend entry point (same contract as the Triton one)."""
    return ChunkedMarginSoftmaxLSE.apply(x, weight, index, target_pos, target_logit, scale)
