"""Margin functions: the target logit as a function of the target cosine.

A margin maps the B target cosines ``cos(theta)`` to the B target logits; every other logit is
``scale * cos``. Margins run in PyTorch with autograd on B values only, so adding a margin needs
no kernel change. All margins keep the target logit at or below ``scale * cos(theta)`` for every
``theta`` in ``[0, pi]``: a margin never makes the target easier.

Angular margins (:class:`ArcFace`, :class:`CombinedMargin`) use ``cos(m1 * theta + m2)`` while the
angle ``m1 * theta + m2`` is at most ``pi``. Past that point the cosine would rise again, so for
``theta > theta_max = (pi - m2) / m1`` the target logit continues as
``cos(theta) - (1 + cos(theta_max))``: continuous at ``theta_max`` (both sides equal ``-1``),
still decreasing in ``theta`` and still below ``cos(theta)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Cosines are clamped to ``[-1 + EPS, 1 - EPS]`` before ``acos`` so its gradient stays finite.
_ACOS_EPS = 1e-6


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"margin parameter {name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class Margin:
    """Base class: ``margin(cos_target) -> target logit``, shapes [B] -> [B], fp32 or fp64.

    ``s`` is the logit scale, also applied to every non-target cosine.
    """

    s: float = 64.0

    def __post_init__(self) -> None:
        _check_non_negative(s=self.s)
        if self.s == 0:
            raise ValueError("margin scale s must be > 0 (s = 0 makes every logit 0: nothing to learn)")

    @property
    def scale(self) -> float:
        return self.s

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, cos: torch.Tensor) -> torch.Tensor:
        return self.target_logit(cos)


def _angular_margin(cos: torch.Tensor, m1: float, m2: float) -> torch.Tensor:
    """``cos(m1 * theta + m2)`` with the continuous fallback past ``m1 * theta + m2 = pi``."""
    theta = torch.acos(cos.clamp(-1 + _ACOS_EPS, 1 - _ACOS_EPS))
    theta_max = (math.pi - m2) / m1
    fallback = cos - (1.0 + math.cos(theta_max))
    # The branch not taken is still differentiated: keep its angle at most pi, so that a large m1
    # can neither overflow it nor send a NaN gradient through torch.where.
    return torch.where(theta <= theta_max, torch.cos(m1 * theta.clamp(max=theta_max) + m2), fallback)


@dataclass(frozen=True)
class Softmax(Margin):
    """Normalized softmax, no margin: ``s * cos(theta)``."""

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return self.s * cos


@dataclass(frozen=True)
class CosFace(Margin):
    """Additive cosine margin (CosFace / AM-Softmax): ``s * (cos(theta) - m)``."""

    m: float = 0.4

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_non_negative(m=self.m)

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return self.s * (cos - self.m)


@dataclass(frozen=True)
class ArcFace(Margin):
    """Additive angular margin: ``s * cos(theta + m)``, with the fallback of the module docstring.

    The gradient is the exact derivative of that function. With ``straight_through=True`` the value
    is the same but the gradient with respect to ``cos(theta)`` is ``s``, as in the widely used
    implementation that edits the logits under ``torch.no_grad()``; use it to reproduce training
    runs tuned for that implementation.
    """

    m: float = 0.5
    straight_through: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_non_negative(m=self.m)
        if self.m >= math.pi:
            raise ValueError(f"ArcFace margin m must be < pi, got {self.m}")

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        adjusted = _angular_margin(cos, 1.0, self.m)
        if self.straight_through:
            adjusted = cos + (adjusted - cos).detach()
        return self.s * adjusted


@dataclass(frozen=True)
class CombinedMargin(Margin):
    """``s * (cos(m1 * theta + m2) - m3)``: SphereFace (m1), ArcFace (m2) and CosFace (m3) at once.

    Requires ``m1 >= 1`` and ``m2, m3 >= 0`` so that the target logit never exceeds ``s * cos``.
    """

    m1: float = 1.0
    m2: float = 0.3
    m3: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_non_negative(m2=self.m2, m3=self.m3)
        if not (isinstance(self.m1, int | float) and math.isfinite(self.m1) and self.m1 >= 1.0):
            raise ValueError(f"CombinedMargin m1 must be a finite number >= 1, got {self.m1!r}")
        if self.m2 >= math.pi:
            raise ValueError(f"CombinedMargin m2 must be < pi, got {self.m2}")

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return self.s * (_angular_margin(cos, self.m1, self.m2) - self.m3)


#: Margins by name, for configuration files and command lines.
MARGINS: dict[str, type[Margin]] = {
    "softmax": Softmax,
    "cosface": CosFace,
    "arcface": ArcFace,
    "combined": CombinedMargin,
}


def create_margin(name: str, **kwargs: float) -> Margin:
    """Build a margin by registry name, e.g. ``create_margin("cosface", s=64, m=0.4)``."""
    try:
        return MARGINS[name.lower()](**kwargs)
    except KeyError:
        raise ValueError(f"unknown margin {name!r}; choose one of {sorted(MARGINS)}") from None
