"""L2 normalization pieces shared by the backends: inverse norms and the backward of ``x / ||x||``."""

from __future__ import annotations

import torch

#: Same clamp as ``torch.nn.functional.normalize``: a zero row normalizes to zero, not NaN.
NORM_EPS = 1e-12


def inv_norms(x: torch.Tensor, rescale: bool = False) -> torch.Tensor:
    """``1 / max(||x_i||, eps)`` for the rows of ``x`` [N, D]; returns [N] in x's dtype.

    With ``rescale`` each row is divided by its largest magnitude first (one more pass), so that
    the sum of squares cannot overflow: rows of fp32 values above ~1e19 keep their direction.
    """
    if not rescale:
        return torch.linalg.vector_norm(x, dim=1).clamp_min(NORM_EPS).reciprocal()
    peak = x.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    norm = torch.linalg.vector_norm(x / peak, dim=1) * peak.squeeze(1)
    return norm.clamp_min(NORM_EPS).reciprocal()


def normalize_backward(grad_unit: torch.Tensor, unit: torch.Tensor, inv_norm: torch.Tensor) -> torch.Tensor:
    """Gradient with respect to ``x`` [N, D] given the gradient ``grad_unit`` [N, D] of ``u = x / ||x||``.

    ``(g - <g, u> u) / ||x||``, from the unit rows ``unit`` and ``inv_norm`` [N] (written with
    ``u`` rather than ``x / ||x||^3``, so that no power of the norm can overflow or underflow).
    Computed in the dtype of ``grad_unit``.
    """
    unit = unit.to(grad_unit.dtype)
    radial = (grad_unit * unit).sum(dim=1, keepdim=True)
    return (grad_unit - radial * unit) * inv_norm[:, None].to(grad_unit.dtype)
