"""Triton backend: the fused kernels of ``fastpfc.kernels`` behind the ``MarginSoftmax`` contract.

With a ``memory_budget``, the forward kernel also keeps the softmax numerators of the first
sampled columns that fit (a multiple of the class tile); their gradients are then two matmuls in
PyTorch (:mod:`fastpfc.softmax_blocks`), and the backward kernels recompute only the other columns.
"""

from __future__ import annotations

import torch
import triton

from .kernels import INTERPRET, default_config, grad_centers_, grad_embeddings_partial, partial_lse, row_inv_norms
from .softmax_blocks import add_block_gradients, centers, chunk_bounds, grad_from_numerators, scatter_target

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


def _numerators_dtype(x: torch.Tensor) -> torch.dtype:
    """bf16 for half-precision embeddings on a GPU (fp32's exponent range at half the bytes; the
    numerators are at most 1), fp32 otherwise (and under the interpreter)."""
    return torch.bfloat16 if x.dtype != torch.float32 and not INTERPRET else torch.float32


def _stored_columns(memory_budget: int, batch: int, num_cols: int, block_c: int, dtype: torch.dtype) -> int:
    """The most columns, a multiple of ``block_c`` (or all of them), whose numerators and tile
    maxima fit in ``memory_budget`` bytes."""
    bytes_per_tile = batch * (block_c * dtype.itemsize + 4)
    return min(num_cols, memory_budget // bytes_per_tile * block_c) if batch else 0


def forward_lse(x, weight, index, x_inv_norm, target_pos, target_logit, scale, memory_budget):
    """Row LSE of the margin logits (contract of :class:`fastpfc.functional.MarginSoftmax`).
    ``saved`` is the centers' inverse norms, then the stored numerators and tile maxima, if any."""
    config = default_config(x.device, x.shape[1])
    w_inv_norm = row_inv_norms(weight, index)
    num_cols = weight.shape[0] if index is None else index.shape[0]
    dtype = _numerators_dtype(x)
    stored = _stored_columns(memory_budget, x.shape[0], num_cols, config.block_c, dtype)
    kept = ()
    if stored > 0:
        kept = (torch.empty(x.shape[0], stored, dtype=dtype, device=x.device),
                torch.empty(x.shape[0], triton.cdiv(stored, config.block_c), dtype=torch.float32, device=x.device))
    partials = partial_lse(x, weight, index, x_inv_norm, w_inv_norm, target_pos, target_logit.float().contiguous(),
                           scale, config, *kept)
    return torch.logsumexp(partials, dim=0), (w_inv_norm, *kept)


def backward(x, weight, index, x_inv_norm, saved, target_pos, lse, grad_lse, grad_target_cos, scale,
             need_x, need_weight):
    """Gradients of the unit embeddings and of the weight (contract of ``MarginSoftmax``)."""
    w_inv_norm, *kept = saved
    config = default_config(x.device, x.shape[1])
    grad_lse, grad_target_cos = grad_lse.float().contiguous(), grad_target_cos.float().contiguous()
    grad_weight = torch.zeros_like(weight) if need_weight else None
    grad_unit_x = None
    stored = kept[0].shape[1] if kept else 0
    if stored:
        grad_unit_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_x else None
        _backward_from_numerators(x, weight, index, x_inv_norm, w_inv_norm, *kept, target_pos, lse, grad_lse,
                                  grad_target_cos, scale, config.block_c, grad_unit_x, grad_weight)
    num_cols = weight.shape[0] if index is None else index.shape[0]
    if stored == num_cols:
        return grad_unit_x, grad_weight
    # The other columns: the recompute kernels on the suffix of the sampled classes.
    if index is None:
        weight, rest_index = weight[stored:], None
        rest_grad_weight = None if grad_weight is None else grad_weight[stored:]
    else:
        rest_index, rest_grad_weight = index[stored:], grad_weight
    rest_target = torch.where(target_pos >= stored, target_pos - stored, -1)
    args = (x, weight, rest_index, x_inv_norm, w_inv_norm[stored:], rest_target, lse, grad_lse, grad_target_cos,
            scale, config)
    if need_x:
        rest_x = grad_embeddings_partial(*args).sum(dim=0)
        grad_unit_x = rest_x if grad_unit_x is None else grad_unit_x.add_(rest_x)
    if need_weight:
        grad_centers_(rest_grad_weight, *args)
    return grad_unit_x, grad_weight


def _backward_from_numerators(x, weight, index, x_inv_norm, w_inv_norm, numerators, tile_max, target_pos, lse,
                              grad_lse, grad_target_cos, scale, block_c, grad_unit_x, grad_weight):
    """The stored columns' share of both gradients: two matmuls per block of columns, in fp32."""
    x_unit = x.float() * x_inv_norm[:, None]
    starts, chunk = chunk_bounds(x.shape[0], numerators.shape[1], multiple_of=block_c)
    for start in starts:
        stop = min(start + chunk, numerators.shape[1])
        tiles = tile_max[:, start // block_c:triton.cdiv(stop, block_c)]
        grad_cos = grad_from_numerators(numerators[:, start:stop], tiles, block_c, lse, grad_lse, scale)
        scatter_target(grad_cos, target_pos, start, grad_target_cos)
        w = centers(weight, index, start, stop).float()
        add_block_gradients(grad_cos, x_unit, w, w_inv_norm[start:stop], index, start, grad_unit_x, grad_weight)
