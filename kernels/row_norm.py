"""Inverse L2 norms of (optionally gathered) rows: ``1 / max(||src[index[i]]||, eps)``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import ROW_NORM_BLOCK
from .tiles import gather_rows


@triton.jit
def _row_inv_norm_kernel(
    src_ptr, index_ptr, out_ptr, num_rows, dim, stride_row, eps,
    HAS_INDEX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < num_rows
    rows = gather_rows(index_ptr, offs_r, mask_r, HAS_INDEX)
    offs_d = tl.arange(0, BLOCK_D)
    sum_sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + offs_d
        v = tl.load(src_ptr + rows[:, None] * stride_row + d[None, :],
                    mask=mask_r[:, None] & (d < dim)[None, :], other=0.0).to(tl.float32)
        sum_sq += tl.sum(v * v, axis=1)
    tl.store(out_ptr + offs_r, tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(sum_sq), eps)), mask=mask_r)


def row_inv_norms(src: torch.Tensor, index: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """Inverse norms of the rows of ``src`` [N, D] (or of ``src[index]``, gathered in the kernel).

    Returns fp32 [N] (or [len(index)]); the eps clamp matches ``torch.nn.functional.normalize``.
    """
    num_rows = src.shape[0] if index is None else index.shape[0]
    out = torch.empty(num_rows, dtype=torch.float32, device=src.device)
    if num_rows == 0:
        return out
    block_d = 64
    _row_inv_norm_kernel[(triton.cdiv(num_rows, ROW_NORM_BLOCK),)](
        src, index if index is not None else src, out, num_rows, src.shape[1], src.stride(0), eps,
        HAS_INDEX=index is not None, BLOCK_R=ROW_NORM_BLOCK, BLOCK_D=block_d,
    )
    return out
