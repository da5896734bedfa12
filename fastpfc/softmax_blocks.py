"""Blocks of sampled classes in PyTorch: the pieces the torch backend is made of, which the Triton
backend also uses for its backward (two GEMMs per block on the softmax gradient).

A block is the columns ``start .. stop - 1`` of the sampled classes. ``grad_cos`` is ``dL/dcos``
of a block, ``[B, stop - start]``.
"""

from __future__ import annotations

import torch

from .normalize import normalize_backward

#: Elements of one [B, chunk] block; a few such blocks are alive at once. On a GPU blocks are
#: larger, so that each GEMM is big enough to run near the device's rate.
_BLOCK_ELEMENTS = 1 << 20
_CUDA_BLOCK_ELEMENTS = 1 << 25
_MIN_CHUNK = 128


def chunk_bounds(batch: int, num_cols: int, device: torch.device, multiple_of: int = 1) -> tuple[range, int]:
    """Block starts over the sampled columns, and the block width (a multiple of ``multiple_of``).

    On a GPU a block is also at most an eighth of ``[B, C]``, so that the blocks stay a small
    share of the logits matrix they stand in for even where the whole of it would fit.
    """
    elements = _BLOCK_ELEMENTS
    if device.type == "cuda":
        elements = min(_CUDA_BLOCK_ELEMENTS, batch * num_cols // 8)
    chunk = max(_MIN_CHUNK, elements // max(batch, 1))
    chunk = max(multiple_of, chunk // multiple_of * multiple_of)
    return range(0, num_cols, chunk), chunk


def centers(weight: torch.Tensor, index: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    """The center rows of sampled positions ``start .. stop - 1``."""
    return weight[start:stop] if index is None else weight[index[start:stop]]


def center_grad_buffer(weight: torch.Tensor, index: torch.Tensor | None, num_cols: int,
                       as_rows: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where the backward writes the centers' gradient, and the rows to write it at.

    With ``as_rows``: ``[num_cols, D]``, one row per sampled class in sampling order (every row
    gets written), written at positions (``None``). Otherwise zeros like ``weight`` (the rows not
    sampled stay zero), written at the rows ``index``.
    """
    if as_rows:
        return weight.new_empty(num_cols, weight.shape[1]), None
    return torch.zeros_like(weight), index


def scatter_target(block: torch.Tensor, target_pos: torch.Tensor, start: int, value: torch.Tensor) -> None:
    """Set ``block[b, target_pos[b] - start] = value[b]`` for rows whose target falls in this block.

    Works without a host sync: other rows rewrite their own current value.
    """
    local = target_pos - start
    inside = (local >= 0) & (local < block.shape[1])
    column = local.clamp(0, block.shape[1] - 1)[:, None]
    current = block.gather(1, column).squeeze(1)
    block.scatter_(1, column, torch.where(inside, value.to(block.dtype), current)[:, None])


def grad_from_numerators(numerators: torch.Tensor, offsets: torch.Tensor, lse: torch.Tensor,
                         grad_lse: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``dL/dcos = g * s * exp(logit - lse)`` from stored ``numerators = exp(logit - offset)``.

    Args:
        numerators: [B, t * w] (w columns per tile, unit stride), each at most 1.
        offsets: [B, t] fp32/fp64, one per row and tile: the largest logit of the tile.
        lse, grad_lse: [B], the row LSE and its upstream gradient ``g``.
        dtype: of the result. The product is taken in the wider of it and the numerators' dtype
            (bf16 numerators for fp16 gradients: in fp32, so that small numerators are not
            flushed to zero by fp16's range before they are scaled).

    Returns ``[B, t * w]`` (the target column still to be set by the caller).
    """
    batch, tiles = offsets.shape
    work = torch.promote_types(numerators.dtype, dtype)
    factor = (offsets - lse[:, None]).exp_().mul_((grad_lse * scale)[:, None]).to(work)
    return (numerators.to(work).view(batch, tiles, -1) * factor[:, :, None]).view(batch, -1).to(dtype)


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with fp32 (or fp64) output: half-precision operands accumulate and return in fp32
    (cuBLAS, ``out_dtype``; other devices multiply in fp32), so that the blocks' shares add up at
    fp32 precision."""
    if a.dtype not in (torch.float16, torch.bfloat16):
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def write_center_gradient(grad_weight: torch.Tensor, grad_w_unit: torch.Tensor, w_unit: torch.Tensor,
                          w_inv_norm: torch.Tensor, index: torch.Tensor | None, start: int) -> None:
    """``grad_weight[rows] = normalize_backward(grad_w_unit)`` for the block's center rows (the
    positions ``start ..`` of ``index``, or of the weight when ``index`` is ``None``)."""
    grad_w = normalize_backward(grad_w_unit, w_unit, w_inv_norm).to(grad_weight.dtype)
    if index is None:
        grad_weight[start:start + grad_w.shape[0]] = grad_w
    else:
        grad_weight.index_copy_(0, index[start:start + grad_w.shape[0]], grad_w)


def add_block_gradients(grad_cos: torch.Tensor, x_unit: torch.Tensor, w_unit: torch.Tensor, w_inv_norm: torch.Tensor,
                        index: torch.Tensor | None, start: int, grad_unit_x: torch.Tensor | None,
                        grad_weight: torch.Tensor | None, write_centers=write_center_gradient) -> None:
    """Add a block's share to the gradient of the unit embeddings and write the gradient of its
    center rows: ``grad_unit_x += grad_cos @ w_unit`` and, through ``write_centers`` (same
    arguments as :func:`write_center_gradient`), ``grad_weight[rows] = normalize_backward(grad_cos^T @ x_unit)``.

    ``x_unit`` [B, D] and the block's unit centers ``w_unit`` [n, D] are in ``grad_cos``'s dtype;
    ``w_inv_norm`` [n] are the centers' inverse norms.
    """
    if grad_unit_x is not None:
        grad_unit_x += matmul_fp32(grad_cos, w_unit)
    if grad_weight is not None:
        write_centers(grad_weight, matmul_fp32(grad_cos.T, x_unit), w_unit, w_inv_norm, index, start)
