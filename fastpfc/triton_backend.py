"""Triton backend: the fused kernels of ``fastpfc.kernels`` behind the ``MarginSoftmax`` contract."""

from __future__ import annotations

import torch

from .kernels import INTERPRET, default_config, grad_centers_, grad_embeddings_partial, partial_lse, row_inv_norms

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensors(x: torch.Tensor, weight: torch.Tensor) -> None:
    """CUDA tensors (or the interpreter) and fp32/fp16/bf16 only."""
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set in the environment before "
            "fastpfc is imported to run the kernels on the CPU (slow); use backend='torch' on the CPU"
        )
    for name, tensor in (("embeddings", x), ("weight", weight)):
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"backend='triton' supports fp32/fp16/bf16 {name}, got {tensor.dtype}; "
                            "use backend='torch' for float64")


def forward_lse(x, weight, index, x_inv_norm, target_pos, target_logit, scale, memory_budget):
    """Row LSE of the margin logits (contract of :class:`fastpfc.functional.MarginSoftmax`).
    The kernels keep nothing for the backward, which recomputes the cosines."""
    if memory_budget:
        raise NotImplementedError("memory_budget > 0 is implemented by backend='torch' only so far; the Triton "
                                  "kernels recompute the cosines in the backward (use memory_budget=0)")
    config = default_config(x.device, x.shape[1])
    w_inv_norm = row_inv_norms(weight, index)
    partials = partial_lse(x, weight, index, x_inv_norm, w_inv_norm, target_pos, target_logit.float().contiguous(),
                           scale, config)
    return torch.logsumexp(partials, dim=0), (w_inv_norm,)


def backward(x, weight, index, x_inv_norm, saved, target_pos, lse, grad_lse, grad_target_cos, scale,
             need_x, need_weight):
    """Gradients of the unit embeddings and of the weight (contract of ``MarginSoftmax``)."""
    (w_inv_norm,) = saved
    config = default_config(x.device, x.shape[1])
    args = (x, weight, index, x_inv_norm, w_inv_norm, target_pos, lse, grad_lse.float().contiguous(),
            grad_target_cos.float().contiguous(), scale, config)
    grad_unit_x = grad_embeddings_partial(*args).sum(dim=0) if need_x else None
    grad_weight = None
    if need_weight:
        grad_weight = torch.zeros_like(weight)
        grad_centers_(grad_weight, *args)
    return grad_unit_x, grad_weight
