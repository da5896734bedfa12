"""Fused margin-softmax kernels: partial log-sum-exp forward and recompute-based backward.

Problem, for a batch row ``b`` and a sampled class position ``c`` (``rows = index[c]``)::

    cos[b, c]   = <x_b, W[rows[c]]> / (||x_b|| * ||W[rows[c]]||)
    logit[b, c] = target_logit[b]   if c == target_pos[b]   (margin applied by the caller)
                  scale * cos[b, c] otherwise
    lse[b]      = logsumexp_c logit[b, c]

The ``[B, C]`` logits are never stored. The forward writes one LSE per (class split, row), which
the caller combines (and which the distributed layer combines across ranks); with ``STORE`` it
also writes the softmax numerators ``exp(logit - tile max)`` of the first ``stored_cols`` columns
and the tile maxima, from which the caller gets those columns' gradients with two matmuls. For
the other columns the backward recomputes the cosine tiles and reduces the softmax gradient
twice, once per output, each in a fixed order, so results are bitwise reproducible without
atomics:

* embedding side: ``u[b] = sum_c G[b, c] * W[rows[c]] / ||W[rows[c]]||`` per class split;
* center side: ``v[c] = sum_b G[b, c] * x_b / ||x_b||`` and ``k[c] = sum_b G[b, c] * cos[b, c]``,
  finished in the kernel into ``dW[rows[c]] = (v[c] - k[c] * W[rows[c]] / ||W||) / ||W||``,

where ``G = dL/dcos``. At the target column ``G`` is the gradient that came back through the
margin, which the caller computes in PyTorch on the B target cosines: any margin works without
touching these kernels, and the gradient of the centers is written once, by one kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import INTERPRET, TileConfig, split_columns
from .tiles import backward_rows, column_tile, cosine_grad_tile, cosine_tile

_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _partial_lse_kernel(
    x_ptr, w_ptr, index_ptr, x_inv_norm_ptr, w_inv_norm_ptr, target_pos_ptr, target_logit_ptr, out_ptr,
    numerators_ptr, tile_max_ptr,
    batch, num_cols, dim, stride_x, stride_w, cols_per_split, scale, stored_cols,
    HAS_INDEX: tl.constexpr, STORE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    offs_b = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    mask_b = offs_b < batch
    x_inv_norm = tl.load(x_inv_norm_ptr + offs_b, mask=mask_b, other=0.0)
    target_pos = tl.load(target_pos_ptr + offs_b, mask=mask_b, other=-1)
    target_logit = tl.load(target_logit_ptr + offs_b, mask=mask_b, other=0.0)
    running_max = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, num_cols)
    for c0 in range(col_start, col_end, BLOCK_C):
        offs_c, mask_c, rows, w_inv_norm = column_tile(index_ptr, w_inv_norm_ptr, c0, col_end, HAS_INDEX, BLOCK_C)
        cos = cosine_tile(x_ptr, w_ptr, offs_b, rows, mask_b, mask_c, dim, stride_x, stride_w,
                          x_inv_norm, w_inv_norm, BLOCK_B, BLOCK_C, BLOCK_D, DOT_DTYPE, INPUT_PRECISION)
        logits = tl.where(offs_c[None, :] == target_pos[:, None], target_logit[:, None], scale * cos)
        logits = tl.where(mask_c[None, :], logits, float("-inf"))
        tile_max = tl.max(logits, axis=1)
        numerators = tl.exp(logits - tile_max[:, None])
        new_max = tl.maximum(running_max, tile_max)
        running_sum = (running_sum * tl.exp(running_max - new_max)
                       + tl.sum(numerators, axis=1) * tl.exp(tile_max - new_max))
        running_max = new_max
        if STORE:
            if c0 < stored_cols:  # the first stored_cols columns keep their numerators for the backward
                tl.store(numerators_ptr + offs_b[:, None] * stored_cols + offs_c[None, :],
                         numerators.to(numerators_ptr.dtype.element_ty),
                         mask=mask_b[:, None] & (offs_c < stored_cols)[None, :])
                num_tiles = tl.cdiv(stored_cols, BLOCK_C)
                tl.store(tile_max_ptr + offs_b * num_tiles + c0 // BLOCK_C, tile_max, mask=mask_b)
    tl.store(out_ptr + split * batch + offs_b, running_max + tl.log(running_sum), mask=mask_b)


@triton.jit
def _grad_embeddings_kernel(
    x_ptr, w_ptr, index_ptr, x_inv_norm_ptr, w_inv_norm_ptr, target_pos_ptr, lse_ptr, grad_lse_ptr, grad_target_cos_ptr,
    out_ptr,
    batch, num_cols, dim, stride_x, stride_w, cols_per_split, scale,
    HAS_INDEX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_D_OUT: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    offs_b = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    mask_b = offs_b < batch
    offs_o = tl.program_id(2) * BLOCK_D_OUT + tl.arange(0, BLOCK_D_OUT)
    mask_o = offs_o < dim
    x_inv_norm, target_pos, lse, grad_lse, grad_target_cos = backward_rows(
        x_inv_norm_ptr, target_pos_ptr, lse_ptr, grad_lse_ptr, grad_target_cos_ptr, offs_b, mask_b)
    acc = tl.zeros((BLOCK_B, BLOCK_D_OUT), dtype=tl.float32)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, num_cols)
    for c0 in range(col_start, col_end, BLOCK_C):
        offs_c, mask_c, rows, w_inv_norm = column_tile(index_ptr, w_inv_norm_ptr, c0, col_end, HAS_INDEX, BLOCK_C)
        cos = cosine_tile(x_ptr, w_ptr, offs_b, rows, mask_b, mask_c, dim, stride_x, stride_w,
                          x_inv_norm, w_inv_norm, BLOCK_B, BLOCK_C, BLOCK_D, DOT_DTYPE, INPUT_PRECISION)
        grad_cos = cosine_grad_tile(cos, offs_c, mask_c, target_pos, lse, grad_lse, grad_target_cos, scale)
        w = tl.load(w_ptr + rows[:, None] * stride_w + offs_o[None, :],
                    mask=mask_c[:, None] & mask_o[None, :], other=0.0).to(tl.float32)
        # Norms scale the data operand in fp32, so the cast gradient stays in softmax range.
        acc = tl.dot(grad_cos.to(DOT_DTYPE), (w * w_inv_norm[:, None]).to(DOT_DTYPE), acc,
                     input_precision=INPUT_PRECISION)
    tl.store(out_ptr + (split * batch + offs_b[:, None]) * dim + offs_o[None, :], acc,
             mask=mask_b[:, None] & mask_o[None, :])


@triton.jit
def _grad_centers_kernel(
    x_ptr, w_ptr, index_ptr, x_inv_norm_ptr, w_inv_norm_ptr, target_pos_ptr, lse_ptr, grad_lse_ptr, grad_target_cos_ptr,
    grad_w_ptr,
    batch, num_cols, dim, stride_x, stride_w, stride_grad_w, scale,
    HAS_INDEX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_D_OUT: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    offs_c, mask_c, rows, w_inv_norm = column_tile(index_ptr, w_inv_norm_ptr, tl.program_id(0) * BLOCK_C, num_cols,
                                                   HAS_INDEX, BLOCK_C)
    offs_o = tl.program_id(1) * BLOCK_D_OUT + tl.arange(0, BLOCK_D_OUT)
    mask_o = offs_o < dim
    acc = tl.zeros((BLOCK_C, BLOCK_D_OUT), dtype=tl.float32)
    cos_weighted = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for b0 in range(0, batch, BLOCK_B):
        offs_b = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        mask_b = offs_b < batch
        x_inv_norm, target_pos, lse, grad_lse, grad_target_cos = backward_rows(
            x_inv_norm_ptr, target_pos_ptr, lse_ptr, grad_lse_ptr, grad_target_cos_ptr, offs_b, mask_b)
        cos = cosine_tile(x_ptr, w_ptr, offs_b, rows, mask_b, mask_c, dim, stride_x, stride_w,
                          x_inv_norm, w_inv_norm, BLOCK_B, BLOCK_C, BLOCK_D, DOT_DTYPE, INPUT_PRECISION)
        grad_cos = cosine_grad_tile(cos, offs_c, mask_c, target_pos, lse, grad_lse, grad_target_cos, scale)
        cos_weighted += tl.sum(grad_cos * cos, axis=0)
        x = tl.load(x_ptr + offs_b[:, None] * stride_x + offs_o[None, :],
                    mask=mask_b[:, None] & mask_o[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(grad_cos).to(DOT_DTYPE), (x * x_inv_norm[:, None]).to(DOT_DTYPE), acc,
                     input_precision=INPUT_PRECISION)
    # Backward of w / ||w||: project out the radial component, then scale by 1 / ||w||.
    w = tl.load(w_ptr + rows[:, None] * stride_w + offs_o[None, :],
                mask=mask_c[:, None] & mask_o[None, :], other=0.0).to(tl.float32)
    grad_w = w_inv_norm[:, None] * acc - (cos_weighted * w_inv_norm * w_inv_norm)[:, None] * w
    tl.store(grad_w_ptr + rows[:, None] * stride_grad_w + offs_o[None, :],
             grad_w.to(grad_w_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_o[None, :])


def _dot_options(x: torch.Tensor) -> dict:
    """Operand dtype for ``tl.dot`` and the fp32 precision mode (bf16/fp16 dots don't run in the interpreter)."""
    if INTERPRET or x.dtype == torch.float32:
        tf32 = x.is_cuda and torch.get_float32_matmul_precision() != "highest"
        return {"DOT_DTYPE": tl.float32, "INPUT_PRECISION": "tf32" if tf32 else "ieee"}
    return {"DOT_DTYPE": _DOT_DTYPES[x.dtype], "INPUT_PRECISION": None}


def _launch_options(config: TileConfig) -> dict:
    return {"BLOCK_B": config.block_b, "BLOCK_C": config.block_c, "BLOCK_D": config.block_d,
            "num_warps": config.num_warps, "num_stages": config.num_stages}


def partial_lse(
    x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor | None,
    x_inv_norm: torch.Tensor, w_inv_norm: torch.Tensor,
    target_pos: torch.Tensor, target_logit: torch.Tensor, scale: float, config: TileConfig,
    numerators: torch.Tensor | None = None, tile_max: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-split log-sum-exp of the margin logits, optionally keeping the softmax numerators of
    the first columns for the backward.

    Args:
        x: embeddings [B, D] (fp32/fp16/bf16, unit stride in D).
        weight: class centers [C_total, D] (unit stride in D).
        index: sampled rows of ``weight`` [C] int64, or ``None`` for all rows (C = C_total).
        x_inv_norm, w_inv_norm: fp32 [B] and [C], from :func:`row_inv_norms`.
        target_pos: int64 [B], position of each row's target in ``0..C-1``, or -1 for none.
        target_logit: fp32 [B], the margin-adjusted target logit substituted at ``target_pos``.
        scale: the logit scale ``s`` applied to non-target cosines.
        numerators: ``None``, or [B, S] (contiguous, any float dtype) to fill with
            ``exp(logit[b, c] - tile_max[b, c // BLOCK_C])`` for the first S columns.
        tile_max: [B, ceil(S / BLOCK_C)] fp32, filled with the largest logit of each row and tile.

    Returns:
        fp32 [num_splits, B]; ``torch.logsumexp(result, 0)`` is the row LSE over all C columns.
    """
    batch, dim = x.shape
    num_cols = weight.shape[0] if index is None else index.shape[0]
    if batch == 0 or num_cols == 0:
        return torch.full((1, batch), float("-inf"), device=x.device)
    row_tiles = triton.cdiv(batch, config.block_b)
    cols_per_split = split_columns(num_cols, row_tiles, config, x.device)
    num_splits = triton.cdiv(num_cols, cols_per_split)
    out = torch.empty(num_splits, batch, dtype=torch.float32, device=x.device)
    store = numerators is not None
    _partial_lse_kernel[(row_tiles, num_splits)](
        x, weight, index if index is not None else target_pos, x_inv_norm, w_inv_norm, target_pos,
        target_logit, out, numerators if store else out, tile_max if store else out,
        batch, num_cols, dim, x.stride(0), weight.stride(0), cols_per_split, scale,
        numerators.shape[1] if store else 0,
        HAS_INDEX=index is not None, STORE=store, **_launch_options(config), **_dot_options(x),
    )
    return out


def grad_embeddings_partial(
    x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor | None,
    x_inv_norm: torch.Tensor, w_inv_norm: torch.Tensor, target_pos: torch.Tensor,
    lse: torch.Tensor, grad_lse: torch.Tensor, grad_target_cos: torch.Tensor, scale: float, config: TileConfig,
) -> torch.Tensor:
    """Per-split ``u[b] = sum_c dL/dcos[b, c] * W[rows[c]] / ||W[rows[c]]||``, fp32 [num_splits, B, D].

    ``lse``, ``grad_lse`` (upstream gradient of the LSE) and ``grad_target_cos`` (dL/dcos at the
    target column, through the margin) are fp32 [B]; the rest is as in :func:`partial_lse`.
    The caller sums the splits and applies the backward of ``x / ||x||``.
    """
    batch, dim = x.shape
    num_cols = weight.shape[0] if index is None else index.shape[0]
    if batch == 0 or num_cols == 0:
        return torch.zeros(1, batch, dim, device=x.device)
    row_tiles = triton.cdiv(batch, config.block_b)
    cols_per_split = split_columns(num_cols, row_tiles, config, x.device)
    num_splits = triton.cdiv(num_cols, cols_per_split)
    out = torch.empty(num_splits, batch, dim, dtype=torch.float32, device=x.device)
    grid = (row_tiles, num_splits, triton.cdiv(dim, config.block_d_out))
    _grad_embeddings_kernel[grid](
        x, weight, index if index is not None else target_pos, x_inv_norm, w_inv_norm, target_pos, lse,
        grad_lse, grad_target_cos, out, batch, num_cols, dim, x.stride(0), weight.stride(0), cols_per_split, scale,
        HAS_INDEX=index is not None, BLOCK_D_OUT=config.block_d_out, **_launch_options(config), **_dot_options(x),
    )
    return out


def grad_centers_(
    grad_weight: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor | None,
    x_inv_norm: torch.Tensor, w_inv_norm: torch.Tensor, target_pos: torch.Tensor,
    lse: torch.Tensor, grad_lse: torch.Tensor, grad_target_cos: torch.Tensor, scale: float, config: TileConfig,
) -> None:
    """Write the gradient of the sampled center rows into ``grad_weight[index]`` (in place).

    ``grad_weight`` has the shape of ``weight``; rows that were not sampled are left untouched.
    Arguments are as in :func:`grad_embeddings_partial`.
    Each row is written by exactly one program, so the result does not depend on scheduling.
    """
    num_cols = weight.shape[0] if index is None else index.shape[0]
    if x.shape[0] == 0 or num_cols == 0:
        return
    dim = x.shape[1]
    grid = (triton.cdiv(num_cols, config.block_c), triton.cdiv(dim, config.block_d_out))
    _grad_centers_kernel[grid](
        x, weight, index if index is not None else target_pos, x_inv_norm, w_inv_norm, target_pos, lse,
        grad_lse, grad_target_cos, grad_weight, x.shape[0], num_cols, dim, x.stride(0), weight.stride(0),
        grad_weight.stride(0), scale, HAS_INDEX=index is not None, BLOCK_D_OUT=config.block_d_out,
        **_launch_options(config), **_dot_options(x),
    )
