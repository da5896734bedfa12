"""Tile configuration for the margin-softmax kernels.

One place decides tile sizes and how the class dimension is split across programs, so the
launchers stay free of heuristics. Under the Triton interpreter (CPU) every program runs
sequentially in NumPy, so fewer, larger tiles are faster there; on a GPU the split of the class
dimension is what keeps the SMs busy when the batch alone gives too few row tiles.

The sm_90 tiles are read off the compiled code (``python -m benchmarks.compile_report``; a test
asserts they do not spill), not tuned on a GPU yet. They come from a fixed table rather than
autotuning because a tile shape fixes the order of every sum, which bitwise reproducibility needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

#: Read once, at import: ``TRITON_INTERPRET`` must be set before any ``@triton.jit`` module loads.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Elements per program of the unit-rows kernel. The interpreter runs programs one after another,
#: each at a fixed cost of milliseconds, so there a program takes many rows.
ROW_BLOCK_ELEMENTS = 1 << 16 if INTERPRET else 1 << 13

#: Upper bound on class splits of the forward (each split costs 4 bytes per row).
MAX_SPLITS = 256


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes (powers of two, at least 16) and launch parameters.

    Attributes:
        block_b: rows of the embedding batch per tile.
        block_c: sampled class centers per tile.
        block_d: reduction step over the embedding dimension.
        num_splits: programs the class dimension of the forward is divided into (``None``: chosen
            per problem).
        num_warps, num_stages: passed to the Triton launcher (ignored by the interpreter).
    """

    block_b: int = 128
    block_c: int = 128
    block_d: int = 64
    num_splits: int | None = None
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_b", "block_c", "block_d"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {value}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"TileConfig.num_splits must be >= 1, got {self.num_splits}")


#: sm_90 tiles by operand dtype, the spill-free ones with the fewest epilogue instructions per
#: logit element in benchmarks/results/sm90-compile-triton*.md: 128x128 tiles give ``HGMMA.64x128x16`` for
#: bf16/fp16 (one warpgroup) and ``HGMMA.64x128x8`` for fp32 as 3xTF32 (two warpgroups).
SM90_TILES = {
    torch.bfloat16: TileConfig(block_b=128, block_c=128, block_d=64, num_warps=4, num_stages=3),
    torch.float16: TileConfig(block_b=128, block_c=128, block_d=64, num_warps=4, num_stages=3),
    torch.float32: TileConfig(block_b=128, block_c=128, block_d=32, num_warps=8, num_stages=3),
}


def default_config(device: torch.device, dtype: torch.dtype) -> TileConfig:
    """The tile configuration used when the caller gives none, for operands of ``dtype``."""
    if device.type != "cuda":
        return TileConfig(block_b=32, block_c=64, block_d=64, num_splits=1)
    return SM90_TILES[dtype]


def split_columns(num_cols: int, num_row_tiles: int, config: TileConfig, device: torch.device) -> int:
    """Columns per split, a multiple of ``config.block_c``, so that every split is non-empty."""
    col_tiles = triton.cdiv(max(num_cols, 1), config.block_c)
    splits = config.num_splits
    if splits is None:
        programs_wanted = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        splits = min(MAX_SPLITS, triton.cdiv(programs_wanted, max(num_row_tiles, 1)))
    splits = max(1, min(splits, col_tiles))
    return triton.cdiv(col_tiles, splits) * config.block_c
