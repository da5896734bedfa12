"""Row-sparse optimizer updates: SGD (momentum, weight decay, Nesterov) and AdamW applied to the
rows ``rows`` of a weight and its state only, in one pass over those rows.

A program owns ``BLOCK_R`` whole rows: it reads each row's gradient, weight and state once and
writes the weight and state once. Rows not listed are never read or written. Every element has
one writer, so the update is deterministic. The math follows ``torch.optim.SGD`` and
``torch.optim.AdamW`` element for element; AdamW's bias correction counts each row's own updates
(``row_step``), see ``fastpfc.optim``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .config import INTERPRET
from .unit_rows import row_block

#: Elements per program: whole rows, 8 values of each tensor per thread. Compiled for sm_90 this
#: keeps AdamW at 48-96 registers and SGD at 32-56 for D = 128..4096, no spills (4096 elements
#: per program took 255 and spilled: few resident threads for a kernel that lives on memory
#: bandwidth). The interpreter runs programs one after another, so there a program takes many rows.
_UPDATE_BLOCK_ELEMENTS = 1 << 16 if INTERPRET else 1 << 10


@triton.jit
def _sgd_rows_kernel(
    weight_ptr, grad_ptr, buf_ptr, rows_ptr, num_rows, dim, stride_w, stride_g, lr, momentum, weight_decay,
    HAS_ROWS: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_r, rows, offs_d, mask = row_block(rows_ptr, num_rows, dim, HAS_ROWS, BLOCK_R, BLOCK_D)
    w_ptrs = weight_ptr + rows[:, None] * stride_w + offs_d[None, :]
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs_r[:, None] * stride_g + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    g = g + weight_decay * w
    if HAS_MOMENTUM:
        buf_ptrs = buf_ptr + rows[:, None] * stride_w + offs_d[None, :]  # the state is laid out like the weight
        buf = momentum * tl.load(buf_ptrs, mask=mask, other=0.0) + g
        tl.store(buf_ptrs, buf, mask=mask)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    tl.store(w_ptrs, (w - lr * g).to(weight_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adamw_rows_kernel(
    weight_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, row_step_ptr, rows_ptr, num_rows, dim, stride_w, stride_g,
    lr, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay,
    HAS_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_r, rows, offs_d, mask = row_block(rows_ptr, num_rows, dim, HAS_ROWS, BLOCK_R, BLOCK_D)
    mask_r = offs_r < num_rows
    step = tl.load(row_step_ptr + rows, mask=mask_r, other=0) + 1
    tl.store(row_step_ptr + rows, step, mask=mask_r)
    bias1 = 1.0 - tl.exp2(step.to(tl.float32) * log2_beta1)  # 1 - beta1 ** step
    bias2 = 1.0 - tl.exp2(step.to(tl.float32) * log2_beta2)
    offsets = rows[:, None] * stride_w + offs_d[None, :]  # weight and state share one layout
    w = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs_r[:, None] * stride_g + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    tl.store(exp_avg_ptr + offsets, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)
    denom = tl.sqrt_rn(v) / tl.sqrt_rn(bias2)[:, None] + eps
    w = w * (1.0 - lr * weight_decay) - (lr / bias1)[:, None] * (m / denom)
    tl.store(weight_ptr + offsets, w.to(weight_ptr.dtype.element_ty), mask=mask)


def _launch_shape(num_rows: int, dim: int) -> tuple[tuple[int], int, int, int]:
    """(grid, rows per program, padded D, warps: 8 elements of a program's rows per thread)."""
    block_d = triton.next_power_of_2(max(dim, 16))
    block_r = max(1, _UPDATE_BLOCK_ELEMENTS // block_d)
    num_warps = max(4, min(16, block_r * block_d // 256))
    return (triton.cdiv(num_rows, block_r),), block_r, block_d, num_warps


def _check(weight: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor | None, *state: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.stride(1) != 1 or any(s.stride() != weight.stride() for s in state):
        raise ValueError("the weight must be [N, D] with unit stride in D, and its state laid out like it")
    if grad.dim() != 2 or grad.shape[1] != weight.shape[1] or grad.stride(1) != 1:
        raise ValueError(f"the gradient rows must be [M, {weight.shape[1]}] with unit stride, got {tuple(grad.shape)}")
    if rows is not None and (rows.dtype != torch.int64 or rows.shape != grad.shape[:1]):
        raise ValueError("rows must be int64, one per gradient row")


def sgd_rows_(weight: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor | None, momentum_buffer: torch.Tensor | None,
              lr: float, momentum: float, weight_decay: float, nesterov: bool) -> None:
    """SGD on the rows ``rows`` of ``weight`` (all rows when ``None``), in place.

    Args:
        weight: [N, D] fp32/fp16/bf16, unit stride in D.
        grad: [M, D], the gradient of rows ``rows`` (of ``weight`` itself when ``rows`` is ``None``).
        rows: int64 [M] unique row ids, or ``None``.
        momentum_buffer: fp32 [N, D] laid out like ``weight`` (``None`` when ``momentum`` is 0).
    """
    _check(weight, grad, rows, *([] if momentum_buffer is None else [momentum_buffer]))
    if grad.shape[0] == 0:
        return
    grid, block_r, block_d, num_warps = _launch_shape(grad.shape[0], grad.shape[1])
    _sgd_rows_kernel[grid](
        weight, grad, momentum_buffer if momentum_buffer is not None else weight, rows if rows is not None else grad,
        grad.shape[0], grad.shape[1], weight.stride(0), grad.stride(0), lr, momentum, weight_decay,
        HAS_ROWS=rows is not None, HAS_MOMENTUM=momentum_buffer is not None, NESTEROV=nesterov,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )


def adamw_rows_(weight: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor | None, exp_avg: torch.Tensor,
                exp_avg_sq: torch.Tensor, row_step: torch.Tensor, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float) -> None:
    """AdamW on the rows ``rows`` of ``weight`` (all rows when ``None``), in place.

    Args:
        weight, grad, rows: as in :func:`sgd_rows_`.
        exp_avg, exp_avg_sq: fp32 [N, D] laid out like ``weight``.
        row_step: int32 [N], how many updates each row has had; incremented for ``rows``.
    """
    _check(weight, grad, rows, exp_avg, exp_avg_sq)
    if grad.shape[0] == 0:
        return
    grid, block_r, block_d, num_warps = _launch_shape(grad.shape[0], grad.shape[1])
    log2 = [math.log2(beta) if beta > 0 else -math.inf for beta in (beta1, beta2)]
    _adamw_rows_kernel[grid](
        weight, grad, exp_avg, exp_avg_sq, row_step, rows if rows is not None else grad, grad.shape[0],
        grad.shape[1], weight.stride(0), grad.stride(0), lr, beta1, beta2, *log2, eps, weight_decay,
        HAS_ROWS=rows is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )
