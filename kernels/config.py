"""Tile configuration for the margin-softmax kernels.

One place decides tile sizes and how the class dimension is split across programs, so the
launchers stay free of heuristics. Under the Triton interpreter (CPU) every program runs
sequentially in NumPy, so fewer, larger tiles are faster there; on a GPU the split of the class
dimension is what keeps the SMs busy when the batch alone gives too few row tiles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

#: Read once, at import: ``TRITON_INTERPRET`` must be set before any ``@triton.jit`` module loads.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Rows per program of the row-norm kernel. The interpreter runs programs one after another, each
#: at a fixed cost of milliseconds, so there a program takes many rows (the norms of 100k centers:
#: 11 s at 32 rows a program).
ROW_NORM_BLOCK = 1024 if INTERPRET else 32

#: Upper bound on class splits: the embedding-gradient partials cost ``splits * B * D * 4`` bytes.
MAX_SPLITS = 32


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes (powers of two, at least 16) and launch parameters.

    Attributes:
        block_b: rows of the embedding batch per tile.
        block_c: sampled class centers per tile.
        block_d: reduction step over the embedding dimension.
        block_d_out: width of the gradient slice one backward program owns.
        num_splits: programs the class dimension is divided into (``None``: chosen per problem).
        num_warps, num_stages: passed to the Triton launcher (ignored by the interpreter).
    """

    block_b: int = 64
    block_c: int = 64
    block_d: int = 64
    block_d_out: int = 128
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_b", "block_c", "block_d", "block_d_out"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {value}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"TileConfig.num_splits must be >= 1, got {self.num_splits}")


def default_config(device: torch.device, dim: int) -> TileConfig:
    """The tile configuration used when the caller gives none (untuned on GPU so far)."""
    d_out = triton.next_power_of_2(max(dim, 16))
    if device.type != "cuda":
        return TileConfig(block_b=32, block_c=64, block_d=64, block_d_out=min(max(d_out, 64), 128), num_splits=1)
    # A backward program owns the whole embedding dimension up to 512, so each cosine tile is
    # recomputed once per kernel. At D = 512 the sm_90 compile of both backward kernels spills
    # 2-3 KB per thread (benchmarks/results/sm90-compile.md): not a tuned configuration.
    return TileConfig(block_d_out=min(d_out, 512), num_warps=8 if d_out >= 128 else 4)


def split_columns(num_cols: int, num_row_tiles: int, config: TileConfig, device: torch.device) -> int:
    """Columns per split, a multiple of ``config.block_c``, so that every split is non-empty."""
    col_tiles = triton.cdiv(max(num_cols, 1), config.block_c)
    splits = config.num_splits
    if splits is None:
        programs_wanted = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        splits = min(MAX_SPLITS, triton.cdiv(programs_wanted, max(num_row_tiles, 1)))
    splits = max(1, min(splits, col_tiles))
    return triton.cdiv(col_tiles, splits) * config.block_c
