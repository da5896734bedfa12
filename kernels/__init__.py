"""Triton kernels and launchers of fastpfc (installed as ``fastpfc.kernels``).

Nothing here depends on ``torch.nn``; the autograd wiring lives in ``fastpfc``.
"""

from .config import INTERPRET, TileConfig, default_config
from .margin_softmax import partial_lse, softmax_grad
from .unit_rows import unit_rows, unit_rows_backward_

__all__ = [
    "INTERPRET",
    "TileConfig",
    "default_config",
    "partial_lse",
    "softmax_grad",
    "unit_rows",
    "unit_rows_backward_",
]
