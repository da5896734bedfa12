"""Triton kernels and launchers of fastpfc (installed as ``fastpfc.kernels``).

Nothing here depends on ``torch.nn``; the autograd wiring lives in ``fastpfc``.
"""

from .config import INTERPRET, TileConfig, default_config
from .margin_softmax import grad_centers_, grad_embeddings_partial, partial_lse
from .row_norm import row_inv_norms

__all__ = [
    "INTERPRET",
    "TileConfig",
    "default_config",
    "grad_centers_",
    "grad_embeddings_partial",
    "partial_lse",
    "row_inv_norms",
]
