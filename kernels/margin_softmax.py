"""Fused margin-softmax kernels: the forward partial log-sum-exp, and the softmax gradient tile.

Problem, for a batch row ``b`` and a sampled class position ``c``, on unit rows (``x_unit`` [B, D],
``w_unit`` [C, D], the sampled centers gathered and normalized once per step by ``unit_rows``)::

    cos[b, c]   = <x_unit[b], w_unit[c]>
    logit[b, c] = target_logit[b]   if c == target_pos[b]   (margin applied by the caller)
                  scale * cos[b, c] otherwise
    lse[b]      = logsumexp_c logit[b, c]

The ``[B, C]`` logits are never stored whole:

* :func:`partial_lse` writes one LSE per (class split, row), which the caller combines (and the
  distributed layer combines across ranks). Given buffers, it also writes the softmax numerators
  ``exp(logit - tile max)`` (at most 1) of the first columns, and the tile maxima, so the backward
  of those columns needs no recompute.
* :func:`softmax_grad` recomputes one block of columns and writes ``G = dL/dcos`` for it:
  ``grad_lse[b] * scale * exp(logit - lse[b])``, and at the target column the gradient that came
  back through the margin (computed by the caller on the B target cosines).

Both gradients are then two plain GEMMs on ``G`` (cuBLAS through ``torch.mm``, see
``fastpfc.triton_backend``): ``G @ w_unit`` and ``G^T @ x_unit``. Every output element is written
by one program and every sum runs in a fixed order, so results are bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import INTERPRET, TileConfig, split_columns
from .tensors import descriptor
from .tiles import LN2, LOG2E, cosine_tile, logits2_tile

_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _partial_lse_kernel(
    x_desc, w_desc, target_pos_ptr, target_logit_ptr, out_ptr, numerators_desc, tile_max_ptr,
    batch, num_cols, dim, cols_per_split, scale, stored_cols, filter_threshold,
    STORE: tl.constexpr, FILTER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    row0 = tl.program_id(0) * BLOCK_B
    offs_b = row0 + tl.arange(0, BLOCK_B)
    mask_b = offs_b < batch
    target_pos = tl.load(target_pos_ptr + offs_b, mask=mask_b, other=-1).to(tl.int32)
    target_logit2 = tl.load(target_logit_ptr + offs_b, mask=mask_b, other=0.0) * LOG2E
    scale2 = scale * LOG2E
    running_max = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, num_cols)
    for c0 in range(col_start, col_end, BLOCK_C):
        cos = cosine_tile(x_desc, w_desc, row0, c0, dim, BLOCK_B, BLOCK_C, BLOCK_D, DOT_DTYPE, INPUT_PRECISION)
        logits2 = logits2_tile(cos, c0, col_end, target_pos, target_logit2, scale2, filter_threshold, FILTER,
                               BLOCK_C)
        tile_max = tl.max(logits2, axis=1)
        numerators = tl.exp2(logits2 - tile_max[:, None])
        new_max = tl.maximum(running_max, tile_max)
        running_sum = (running_sum * tl.exp2(running_max - new_max)
                       + tl.sum(numerators, axis=1) * tl.exp2(tile_max - new_max))
        running_max = new_max
        if STORE:
            if c0 < stored_cols:  # the first stored_cols columns keep their numerators for the backward
                numerators_desc.store([row0, c0], numerators.to(numerators_desc.dtype))
                tl.store(tile_max_ptr + offs_b * tl.cdiv(stored_cols, BLOCK_C) + c0 // BLOCK_C, tile_max * LN2,
                         mask=mask_b)
    tl.store(out_ptr + split * batch + offs_b, (running_max + tl.log2(running_sum)) * LN2, mask=mask_b)


@triton.jit
def _softmax_grad_kernel(
    x_desc, w_desc, target_pos_ptr, lse_ptr, grad_lse_ptr, grad_target_cos_ptr, out_desc,
    batch, dim, scale, filter_threshold,
    FILTER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # A 1-D grid, row tiles fastest: the programs that run together share a column tile (one
    # read of the centers from DRAM), and there is no 65535 limit on the number of column tiles.
    row_tiles = tl.cdiv(batch, BLOCK_B)
    row0 = (tl.program_id(0) % row_tiles) * BLOCK_B
    c0 = (tl.program_id(0) // row_tiles) * BLOCK_C
    offs_b = row0 + tl.arange(0, BLOCK_B)
    mask_b = offs_b < batch
    target_pos = tl.load(target_pos_ptr + offs_b, mask=mask_b, other=-1).to(tl.int32)
    lse2 = tl.load(lse_ptr + offs_b, mask=mask_b, other=0.0) * LOG2E
    grad_scale = tl.load(grad_lse_ptr + offs_b, mask=mask_b, other=0.0) * scale
    grad_target_cos = tl.load(grad_target_cos_ptr + offs_b, mask=mask_b, other=0.0)
    cos = cosine_tile(x_desc, w_desc, row0, c0, dim, BLOCK_B, BLOCK_C, BLOCK_D, DOT_DTYPE, INPUT_PRECISION)
    grad = grad_scale[:, None] * tl.exp2(cos * (scale * LOG2E) - lse2[:, None])
    if FILTER:  # a filtered logit is the constant 0: no gradient
        grad = tl.where(cos > filter_threshold, 0.0, grad)
    grad = tl.where(tl.arange(0, BLOCK_C)[None, :] == (target_pos - c0)[:, None], grad_target_cos[:, None], grad)
    out_desc.store([row0, c0], grad.to(out_desc.dtype))  # the descriptor clips rows and columns past the end


def dot_options(dtype: torch.dtype, on_cuda: bool) -> dict:
    """Operand dtype for ``tl.dot`` and its fp32 precision mode.

    fp32 operands on a GPU run on the tensor cores: as TF32 where
    ``torch.set_float32_matmul_precision`` allows it, otherwise as 3xTF32 (each operand split
    into two TF32 parts, about fp32's accuracy) rather than on the FMA units, where a 128x128
    tile spills. The interpreter has no bf16/fp16 dot and multiplies in fp32.
    """
    if INTERPRET or not on_cuda:
        return {"DOT_DTYPE": tl.float32, "INPUT_PRECISION": "ieee"}
    if dtype == torch.float32:
        tf32 = torch.get_float32_matmul_precision() != "highest"
        return {"DOT_DTYPE": tl.float32, "INPUT_PRECISION": "tf32" if tf32 else "tf32x3"}
    return {"DOT_DTYPE": _DOT_DTYPES[dtype], "INPUT_PRECISION": None}


def _launch_options(config: TileConfig, x: torch.Tensor) -> dict:
    return {"BLOCK_B": config.block_b, "BLOCK_C": config.block_c, "BLOCK_D": config.block_d,
            "num_warps": config.num_warps, "num_stages": config.num_stages, **dot_options(x.dtype, x.is_cuda)}


def _operands(x_unit: torch.Tensor, w_unit: torch.Tensor, config: TileConfig):
    return descriptor(x_unit, config.block_b, config.block_d), descriptor(w_unit, config.block_c, config.block_d)


def partial_lse(
    x_unit: torch.Tensor, w_unit: torch.Tensor, target_pos: torch.Tensor, target_logit: torch.Tensor,
    scale: float, config: TileConfig, numerators: torch.Tensor | None = None, tile_max: torch.Tensor | None = None,
    filter_threshold: float | None = None,
) -> torch.Tensor:
    """Per-split log-sum-exp of the margin logits, optionally keeping the softmax numerators of
    the first columns for the backward.

    Args:
        x_unit: unit embeddings [B, D], fp32/fp16/bf16, rows 16-byte aligned (``aligned_empty``).
        w_unit: unit class centers [C, D], same dtype and alignment (from ``unit_rows``).
        target_pos: int64 [B], position of each row's target in ``0..C-1``, or -1 for none.
        target_logit: fp32 [B], the margin-adjusted target logit substituted at ``target_pos``.
        scale: the logit scale ``s`` applied to non-target cosines.
        numerators: ``None``, or [B, S] (fp32 or bf16, aligned rows) to fill with
            ``exp(logit[b, c] - tile_max[b, c // BLOCK_C])`` for the first S columns.
        tile_max: [B, ceil(S / BLOCK_C)] fp32, contiguous, filled with the largest logit of each
            row and tile.
        filter_threshold: ``None``, or a non-target cosine above it counts as 0 (its logit is 0).

    Returns:
        fp32 [num_splits, B]; ``torch.logsumexp(result, 0)`` is the row LSE over all C columns.
    """
    batch, dim = x_unit.shape
    num_cols = w_unit.shape[0]
    if batch == 0 or num_cols == 0:
        return torch.full((1, batch), float("-inf"), device=x_unit.device)
    row_tiles = triton.cdiv(batch, config.block_b)
    cols_per_split = split_columns(num_cols, row_tiles, config, x_unit.device)
    num_splits = triton.cdiv(num_cols, cols_per_split)
    out = torch.empty(num_splits, batch, dtype=torch.float32, device=x_unit.device)
    x_desc, w_desc = _operands(x_unit, w_unit, config)
    store = numerators is not None
    _partial_lse_kernel[(row_tiles, num_splits)](
        x_desc, w_desc, target_pos, target_logit, out,
        descriptor(numerators, config.block_b, config.block_c) if store else x_desc, tile_max if store else out,
        batch, num_cols, dim, cols_per_split, scale, numerators.shape[1] if store else 0,
        filter_threshold if filter_threshold is not None else 1.0,
        STORE=store, FILTER=filter_threshold is not None, **_launch_options(config, x_unit),
    )
    return out


def softmax_grad(
    out: torch.Tensor, x_unit: torch.Tensor, w_unit: torch.Tensor, target_pos: torch.Tensor, lse: torch.Tensor,
    grad_lse: torch.Tensor, grad_target_cos: torch.Tensor, scale: float, config: TileConfig,
    filter_threshold: float | None = None,
) -> torch.Tensor:
    """Fill ``out`` [B, C] (fp32/fp16/bf16, aligned rows) with ``dL/dcos`` of the columns
    ``w_unit`` [C, D] and return it.

    ``lse``, ``grad_lse`` (upstream gradient of the LSE) and ``grad_target_cos`` (dL/dcos at the
    target column, through the margin) are fp32 [B]; ``target_pos`` counts from ``w_unit``'s first
    row (-1, or any position outside ``0..C-1``, for none). Filtered cosines (``filter_threshold``)
    get no gradient. The rest is as in :func:`partial_lse`.
    """
    batch, dim = x_unit.shape
    if batch == 0 or w_unit.shape[0] == 0:
        return out
    grid = (triton.cdiv(batch, config.block_b) * triton.cdiv(w_unit.shape[0], config.block_c),)
    _softmax_grad_kernel[grid](
        *_operands(x_unit, w_unit, config), target_pos, lse, grad_lse, grad_target_cos,
        descriptor(out, config.block_b, config.block_c), batch, dim, scale,
        filter_threshold if filter_threshold is not None else 1.0, FILTER=filter_threshold is not None,
        **_launch_options(config, x_unit),
    )
    return out
