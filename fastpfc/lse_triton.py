"""Triton backend: autograd wiring around the fused kernels in ``fastpfc.kernels``."""

from __future__ import annotations

import torch

from .kernels import (
    INTERPRET,
    TileConfig,
    default_config,
    grad_centers_,
    grad_embeddings_partial,
    partial_lse,
    row_inv_norms,
)
from .normalize import normalize_backward, target_logit_grad

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensors(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set in the environment before "
            "fastpfc is imported to run the kernels on the CPU (slow); use backend='torch' on the CPU"
        )
    for name, tensor in (("embeddings", x), ("weight", weight)):
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"backend='triton' supports fp32/fp16/bf16 {name}, got {tensor.dtype}; "
                            "use backend='torch' for float64")


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by stride and need unit stride along the embedding dimension."""
    return t if t.stride(-1) == 1 else t.contiguous()


class FusedMarginSoftmaxLSE(torch.autograd.Function):
    """Row log-sum-exp of the margin logits; see :func:`fastpfc.functional.margin_softmax_lse`."""

    @staticmethod
    def forward(ctx, x, weight, index, target_pos, target_logit, scale, config):
        _check_tensors(x, weight)
        x, weight = _row_major(x), _row_major(weight)
        config = config or default_config(x.device, x.shape[1])
        target_logit = target_logit.float().contiguous()
        x_inv_norm = row_inv_norms(x)
        w_inv_norm = row_inv_norms(weight, index)
        partials = partial_lse(x, weight, index, x_inv_norm, w_inv_norm, target_pos, target_logit, scale, config)
        lse = torch.logsumexp(partials, dim=0)
        ctx.save_for_backward(x, weight, index, target_pos, target_logit, x_inv_norm, w_inv_norm, lse)
        ctx.scale, ctx.config = scale, config
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        x, weight, index, target_pos, target_logit, x_inv_norm, w_inv_norm, lse = ctx.saved_tensors
        grad_lse = grad_lse.float().contiguous()
        tensors = (x, weight, index, x_inv_norm, w_inv_norm, target_pos, lse, grad_lse, ctx.scale, ctx.config)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_unit_x = grad_embeddings_partial(*tensors).sum(dim=0)
            grad_x = normalize_backward(grad_unit_x, x, x_inv_norm).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)
            grad_centers_(grad_weight, *tensors)
        grad_target = target_logit_grad(grad_lse, target_logit, lse, target_pos)
        return grad_x, grad_weight, None, None, grad_target, None, None


def margin_softmax_lse(x, weight, index, target_pos, target_logit, scale, config: TileConfig | None = None):
    """Triton backend entry point (same contract as the torch one)."""
    return FusedMarginSoftmaxLSE.apply(x, weight, index, target_pos, target_logit, scale, config)
