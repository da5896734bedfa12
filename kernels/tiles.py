"""Building blocks shared by the margin-softmax kernels: the logits tile and its row inputs.

Both operands are unit rows read through tensor descriptors: the embeddings ``x_unit`` [B, D]
and the gathered, normalized class centers ``w_unit`` [C, D] written by ``unit_rows``. Logits are
kept in base 2 (``logit * log2(e)``) so the exponentials are single ``exp2`` instructions.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def cosine_tile(x_desc, w_desc, row0, c0, dim, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """cos[b, c] = <x_unit[row0 + b], w_unit[c0 + c]>, fp32 [BLOCK_B, BLOCK_C].

    Both operands come through tensor descriptors (TMA on sm_90): no pointer tiles held in
    registers, and rows or dimensions past the end read as zero, so padding gives cos = 0.
    """
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        x = x_desc.load([row0, d0])
        w = w_desc.load([c0, d0])
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE).T, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def logits2_tile(cos, c0, num_cols, target_pos, target_logit2, scale2, filter_threshold,
                 FILTER: tl.constexpr, BLOCK_C: tl.constexpr):
    """Base-2 logits [BLOCK_B, BLOCK_C] of the columns ``c0 ..``: ``scale2 * cos``, ``target_logit2[b]``
    at each row's target column and -inf past ``num_cols`` (``scale2 = s * log2(e)``,
    ``target_logit2 = margin(cos_target) * log2(e)``, ``target_pos`` int32 [BLOCK_B]). With
    ``FILTER``, a non-target cosine above ``filter_threshold`` counts as 0 (inter-class filtering).

    Positions are compared in int32 relative to the tile: int64 column numbers broadcast over the
    tile would cost two registers per logit element.
    """
    cols = tl.arange(0, BLOCK_C)
    logits2 = cos * scale2
    if FILTER:
        logits2 = tl.where(cos > filter_threshold, 0.0, logits2)
    logits2 = tl.where(cols[None, :] == (target_pos - c0)[:, None], target_logit2[:, None], logits2)
    return tl.where(cols[None, :] < num_cols - c0, logits2, float("-inf"))
