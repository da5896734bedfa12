"""Building blocks shared by the margin-softmax kernels: gather, cosine tile, softmax gradient tile."""

import triton
import triton.language as tl


@triton.jit
def gather_rows(index_ptr, offs_c, mask_c, HAS_INDEX: tl.constexpr):
    """Row numbers in the weight of sampled positions ``offs_c`` (identity when nothing is sampled)."""
    if HAS_INDEX:
        rows = tl.load(index_ptr + offs_c, mask=mask_c, other=0)
    else:
        rows = offs_c
    return rows.to(tl.int64)


@triton.jit
def column_tile(index_ptr, w_inv_norm_ptr, c0, col_end, HAS_INDEX: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sampled positions ``c0 .. c0 + BLOCK_C - 1`` (below ``col_end``): offsets, mask, weight rows
    and inverse norms."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < col_end
    rows = gather_rows(index_ptr, offs_c, mask_c, HAS_INDEX)
    w_inv_norm = tl.load(w_inv_norm_ptr + offs_c, mask=mask_c, other=0.0)
    return offs_c, mask_c, rows, w_inv_norm


@triton.jit
def backward_rows(x_inv_norm_ptr, target_pos_ptr, lse_ptr, grad_lse_ptr, grad_target_cos_ptr, offs_b, mask_b):
    """Per-row inputs of the backward kernels; padding rows get zero gradients and no target."""
    x_inv_norm = tl.load(x_inv_norm_ptr + offs_b, mask=mask_b, other=0.0)
    target_pos = tl.load(target_pos_ptr + offs_b, mask=mask_b, other=-1)
    lse = tl.load(lse_ptr + offs_b, mask=mask_b, other=0.0)
    grad_lse = tl.load(grad_lse_ptr + offs_b, mask=mask_b, other=0.0)
    grad_target_cos = tl.load(grad_target_cos_ptr + offs_b, mask=mask_b, other=0.0)
    return x_inv_norm, target_pos, lse, grad_lse, grad_target_cos


@triton.jit
def cosine_tile(
    x_ptr, w_ptr, offs_b, rows, mask_b, mask_c, dim, stride_x, stride_w, x_inv_norm, w_inv_norm,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """cos[b, c] = <x_b, w_rows[c]> * x_inv_norm[b] * w_inv_norm[c], fp32 [BLOCK_B, BLOCK_C].

    The inverse norms are applied here, in the epilogue, so no normalized copy of either operand
    is ever written. Padding rows/columns load zeros and give cos = 0.
    """
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + offs_d
        mask_d = d < dim
        x = tl.load(x_ptr + offs_b[:, None] * stride_x + d[None, :],
                    mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptr + rows[None, :] * stride_w + d[:, None],
                    mask=mask_d[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    return acc * x_inv_norm[:, None] * w_inv_norm[None, :]


@triton.jit
def cosine_grad_tile(cos, offs_c, mask_c, target_pos, lse, grad_lse, grad_target_cos, scale):
    """dL/dcos [BLOCK_B, BLOCK_C]: ``grad_lse[b] * s * softmax[b, c]`` for the logits ``s * cos``.

    At each row's target column it is ``grad_target_cos[b]``, the gradient that came back through
    the margin (computed by the caller); padding columns get zero. Padding rows carry zero
    ``grad_lse`` and ``grad_target_cos`` and so give zero too.
    """
    grad = (grad_lse * scale)[:, None] * tl.exp(scale * cos - lse[:, None])
    grad = tl.where(offs_c[None, :] == target_pos[:, None], grad_target_cos[:, None], grad)
    return tl.where(mask_c[None, :], grad, 0.0)
