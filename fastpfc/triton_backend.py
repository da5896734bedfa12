"""Triton backend: the fused kernels of ``fastpfc.kernels`` behind the ``MarginSoftmax`` contract.

One training step, for B embeddings and C sampled classes of dimension D:

1. ``unit_rows`` gathers the sampled centers once, normalized, in the embeddings' dtype: one
   contiguous [C, D] block the kernels read through tensor descriptors (and never convert per tile).
2. The forward kernel (``partial_lse``, one B×C×D matmul) writes per-split row LSEs; with a
   ``memory_budget`` it also keeps the softmax numerators of the leading class tiles that fit.
3. The backward goes over blocks of columns. A block's ``G = dL/dcos`` comes from the stored
   numerators, or from the recompute kernel (``softmax_grad``, one B×C×D matmul) into one
   reused [B, block] buffer; then two GEMMs in ``torch.mm`` (cuBLAS on a GPU, fp32 accumulation
   and output) give ``G @ w_unit`` for the embeddings and ``G^T @ x_unit`` for the centers, and
   ``unit_rows_backward_`` turns the latter into the rows of the weight gradient.

Matmul work per step: 3 B×C×D matmuls with every column stored, 4 in the lean mode (budget 0:
nothing [B, C]-sized outlives the forward; the backward's scratch is one block). Every output
element is written once, by one program or GEMM, in a fixed order: bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton

from .kernels import INTERPRET, default_config, partial_lse, softmax_grad, unit_rows, unit_rows_backward_
from .kernels.tensors import aligned_empty
from .softmax_blocks import (
    add_block_gradients,
    center_grad_buffer,
    chunk_bounds,
    grad_from_numerators,
    scatter_target,
)
from .validation import TRITON_DTYPES


def check_tensors(x: torch.Tensor, weight: torch.Tensor) -> None:
    """CUDA tensors (or the interpreter) and fp32/fp16/bf16 only."""
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set in the environment before "
            "fastpfc is imported to run the kernels on the CPU (slow); use backend='torch' on the CPU"
        )
    for name, tensor in (("embeddings", x), ("weight", weight)):
        if tensor.dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports fp32/fp16/bf16 {name}, got {tensor.dtype}; "
                            "use backend='torch' for float64")


def _on_gpu_in_half(x: torch.Tensor) -> bool:
    return x.is_cuda and not INTERPRET and x.dtype != torch.float32


def _numerators_dtype(x: torch.Tensor) -> torch.dtype:
    """bf16 for half-precision embeddings on a GPU (fp32's exponent range at half the bytes; the
    numerators are at most 1), fp32 otherwise (and under the interpreter)."""
    return torch.bfloat16 if _on_gpu_in_half(x) else torch.float32


def _gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """Operands of the backward GEMMs: the embeddings' half dtype on a GPU, fp32 otherwise."""
    return x.dtype if _on_gpu_in_half(x) else torch.float32


def _stored_tiles(memory_budget: int, batch: int, num_cols: int, block_c: int, dtype: torch.dtype) -> int:
    """The most class tiles whose numerators and tile maxima fit in ``memory_budget`` bytes."""
    bytes_per_tile = batch * (block_c * dtype.itemsize + 4)
    return min(triton.cdiv(num_cols, block_c), memory_budget // bytes_per_tile) if batch else 0


def _unit_embeddings(x: torch.Tensor, x_inv_norm: torch.Tensor) -> torch.Tensor:
    """``x / ||x||`` in x's dtype, rows aligned for the kernels' descriptors."""
    x_unit = aligned_empty(x.shape[0], x.shape[1], x.dtype, x.device)
    return x_unit.copy_(x.float() * x_inv_norm[:, None])


def forward_lse(x, weight, index, x_inv_norm, target_pos, target_logit, scale, memory_budget, filter_threshold):
    """Row LSE of the margin logits (contract of :class:`fastpfc.functional.MarginSoftmax`).

    ``saved`` is the unit embeddings, the unit centers and their inverse norms, then the stored
    numerators [B, tiles * BLOCK_C] and tile maxima [B, tiles], if any.
    """
    config = default_config(x.device, x.dtype)
    x_unit = _unit_embeddings(x, x_inv_norm)
    w_unit, w_inv_norm = unit_rows(weight, index, x.dtype)
    dtype = _numerators_dtype(x)
    tiles = _stored_tiles(memory_budget, x.shape[0], w_unit.shape[0], config.block_c, dtype)
    kept = ()
    if tiles > 0:
        kept = (torch.empty(x.shape[0], tiles * config.block_c, dtype=dtype, device=x.device),
                torch.empty(x.shape[0], tiles, dtype=torch.float32, device=x.device))
    partials = partial_lse(x_unit, w_unit, target_pos, target_logit.float().contiguous(), scale, config, *kept,
                           filter_threshold=filter_threshold)
    return torch.logsumexp(partials, dim=0), (x_unit, w_unit, w_inv_norm, *kept)


def backward(x, weight, index, x_inv_norm, saved, target_pos, lse, grad_lse, grad_target_cos, scale,
             need_x, need_weight, weight_rows, filter_threshold):
    """Gradients of the unit embeddings and of the weight (contract of ``MarginSoftmax``)."""
    x_unit, w_unit, w_inv_norm, *kept = saved
    config = default_config(x.device, x.dtype)
    grad_lse, grad_target_cos = grad_lse.float().contiguous(), grad_target_cos.float().contiguous()
    num_cols, block_c = w_unit.shape[0], config.block_c
    grad_unit_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_x else None
    grad_weight, write_index = center_grad_buffer(weight, index, num_cols, weight_rows) if need_weight else (None, None)
    gemm_dtype = _gemm_dtype(x)
    x_gemm = x_unit.to(gemm_dtype)
    stored = min(kept[0].shape[1], num_cols) if kept else 0
    _, chunk = chunk_bounds(x.shape[0], num_cols, x.device, multiple_of=block_c)
    scratch = None
    for start, stop in _blocks(stored, num_cols, chunk):
        if stop <= stored:  # from the stored numerators of whole tiles
            numerators, tile_max = kept
            tiles = slice(start // block_c, triton.cdiv(stop, block_c))
            grad_cos = grad_from_numerators(numerators[:, tiles.start * block_c:tiles.stop * block_c],
                                            tile_max[:, tiles], lse, grad_lse, scale, gemm_dtype)[:, :stop - start]
            scatter_target(grad_cos, target_pos, start, grad_target_cos)
        else:  # recomputed by the kernel into the block buffer
            if scratch is None:
                scratch = aligned_empty(x.shape[0], min(chunk, num_cols - stored), gemm_dtype, x.device)
            grad_cos = softmax_grad(scratch[:, :stop - start], x_unit, w_unit[start:stop], target_pos - start,
                                    lse, grad_lse, grad_target_cos, scale, config, filter_threshold)
        add_block_gradients(grad_cos, x_gemm, w_unit[start:stop].to(gemm_dtype), w_inv_norm[start:stop],
                            write_index, start, grad_unit_x, grad_weight, _write_centers)
    return grad_unit_x, grad_weight


def _write_centers(grad_weight, grad_w_unit, w_unit, w_inv_norm, index, start):
    """The backward of the gathered unit centers, scattered into the weight gradient by one kernel."""
    rows = None if index is None else index[start:start + grad_w_unit.shape[0]]
    target = grad_weight if index is not None else grad_weight[start:start + grad_w_unit.shape[0]]
    unit_rows_backward_(target, grad_w_unit, w_unit, w_inv_norm, rows)


def _blocks(stored: int, num_cols: int, chunk: int):
    """``(start, stop)`` of blocks of at most ``chunk`` columns: the stored ones, then the rest."""
    for begin, end in ((0, stored), (stored, num_cols)):
        for start in range(begin, end, chunk):
            yield start, min(start + chunk, end)
