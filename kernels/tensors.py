"""Buffers the kernels read and write through tensor descriptors (TMA on sm_90).

A descriptor needs a 16-byte aligned base and row stride. The buffers fastpfc makes for the
kernels (unit rows, stored numerators, softmax gradients) are therefore allocated with their row
stride rounded up to 16 bytes and handed out as a view of the logical width: any ``D`` or ``C``
works, and the padding is never read (the descriptor's shape stops at the logical width).
"""

from __future__ import annotations

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

_ALIGN_BYTES = 16


def aligned_empty(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized [rows, cols] view whose row stride is a multiple of 16 bytes."""
    per_align = _ALIGN_BYTES // dtype.itemsize
    stride = -(-max(cols, 1) // per_align) * per_align
    return torch.empty(rows, stride, dtype=dtype, device=device)[:, :cols]


def descriptor(t: torch.Tensor, block_rows: int, block_cols: int) -> TensorDescriptor:
    """A descriptor of the 2-D ``t`` (unit stride in its columns, 16-byte aligned rows) in blocks
    of ``[block_rows, block_cols]``; reads past the end give zeros, writes there are dropped."""
    if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % _ALIGN_BYTES or t.data_ptr() % _ALIGN_BYTES:
        raise ValueError(f"a tensor descriptor needs unit column stride and 16-byte aligned rows; got shape "
                         f"{tuple(t.shape)}, strides {t.stride()}, dtype {t.dtype} (use aligned_empty)")
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [block_rows, block_cols])
