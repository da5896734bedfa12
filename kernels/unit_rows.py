"""Unit rows, gathered: ``dst[i] = src[index[i]] / max(||src[index[i]]||, eps)`` and the inverse
norms; and the backward, scattered back to the rows ``index``.

The margin-softmax kernels read the sampled class centers as one contiguous block of unit rows in
the embeddings' dtype: gathered, normalized and cast once per step here (one read of the sampled
rows, one write of half or the same size), instead of in every tile that reads them. The backward
reads the gradient of those unit rows once and writes the center gradient rows once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import ROW_BLOCK_ELEMENTS
from .tensors import aligned_empty


@triton.jit
def row_block(index_ptr, num_rows, dim, HAS_INDEX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows: ``(positions [BLOCK_R] int64, their rows index[position] (the
    positions themselves without an index), the columns [BLOCK_D], the [BLOCK_R, BLOCK_D] mask)``."""
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask_r = offs_r < num_rows
    if HAS_INDEX:
        rows = tl.load(index_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
    else:
        rows = offs_r
    offs_d = tl.arange(0, BLOCK_D)
    return offs_r, rows, offs_d, mask_r[:, None] & (offs_d < dim)[None, :]


@triton.jit
def _unit_rows_kernel(
    src_ptr, index_ptr, dst_ptr, inv_norm_ptr, num_rows, dim, stride_row, stride_dst, eps,
    HAS_INDEX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_r, rows, offs_d, mask = row_block(index_ptr, num_rows, dim, HAS_INDEX, BLOCK_R, BLOCK_D)
    mask_r = offs_r < num_rows
    v = tl.load(src_ptr + rows[:, None] * stride_row + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    inv_norm = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(tl.sum(v * v, axis=1)), eps))
    tl.store(inv_norm_ptr + offs_r, inv_norm, mask=mask_r)
    unit = (v * inv_norm[:, None]).to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + offs_r[:, None] * stride_dst + offs_d[None, :], unit, mask=mask)


def unit_rows(src: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype,
              eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``src`` [N, D] (or ``src[index]``), normalized, as a new tensor.

    Args:
        src: [N, D] with unit stride in D (any row stride), fp32/fp16/bf16.
        index: int64 [M] rows to take, or ``None`` for all of them.
        dtype: dtype of the result (the norms are computed in fp32 from ``src`` as stored).

    Returns:
        ``(unit [M, D] dtype, rows 16-byte aligned, inv_norm [M] fp32)``; the eps clamp matches
        ``torch.nn.functional.normalize`` (a zero row stays zero).
    """
    num_rows, dim = (src.shape[0] if index is None else index.shape[0]), src.shape[1]
    unit = aligned_empty(num_rows, dim, dtype, src.device)
    inv_norm = torch.empty(num_rows, dtype=torch.float32, device=src.device)
    if num_rows == 0:
        return unit, inv_norm
    block_d = triton.next_power_of_2(max(dim, 16))
    block_r = max(1, ROW_BLOCK_ELEMENTS // block_d)
    _unit_rows_kernel[(triton.cdiv(num_rows, block_r),)](
        src, index if index is not None else src, unit, inv_norm, num_rows, dim, src.stride(0), unit.stride(0), eps,
        HAS_INDEX=index is not None, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return unit, inv_norm


@triton.jit
def _unit_rows_backward_kernel(
    grad_unit_ptr, unit_ptr, inv_norm_ptr, index_ptr, out_ptr, num_rows, dim, stride_grad, stride_unit, stride_out,
    HAS_INDEX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_r, rows, offs_d, mask = row_block(index_ptr, num_rows, dim, HAS_INDEX, BLOCK_R, BLOCK_D)
    mask_r = offs_r < num_rows
    g = tl.load(grad_unit_ptr + offs_r[:, None] * stride_grad + offs_d[None, :], mask=mask, other=0.0)
    u = tl.load(unit_ptr + offs_r[:, None] * stride_unit + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    inv_norm = tl.load(inv_norm_ptr + offs_r, mask=mask_r, other=0.0)
    radial = tl.sum(g * u, axis=1)
    grad = (g - radial[:, None] * u) * inv_norm[:, None]
    tl.store(out_ptr + rows[:, None] * stride_out + offs_d[None, :], grad.to(out_ptr.dtype.element_ty), mask=mask)


def unit_rows_backward_(out: torch.Tensor, grad_unit: torch.Tensor, unit: torch.Tensor, inv_norm: torch.Tensor,
                        index: torch.Tensor | None) -> None:
    """The backward of :func:`unit_rows`, written in place: ``out[index[i]] = (g_i - <g_i, u_i> u_i) * inv_norm[i]``.

    Args:
        out: [N, D] gradient of ``src`` (any float dtype, unit stride in D); only the rows
            ``index`` (all rows when ``None``) are written, each by one program.
        grad_unit: fp32 [M, D], the gradient of the unit rows; ``unit`` [M, D] and ``inv_norm``
            fp32 [M] as returned by :func:`unit_rows`.
    """
    num_rows, dim = grad_unit.shape
    if num_rows == 0:
        return
    block_d = triton.next_power_of_2(max(dim, 16))
    block_r = max(1, ROW_BLOCK_ELEMENTS // block_d)
    _unit_rows_backward_kernel[(triton.cdiv(num_rows, block_r),)](
        grad_unit, unit, inv_norm, index if index is not None else inv_norm, out, num_rows, dim,
        grad_unit.stride(0), unit.stride(0), out.stride(0), HAS_INDEX=index is not None, BLOCK_R=block_r,
        BLOCK_D=block_d,
    )
