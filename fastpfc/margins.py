"""Margin functions: the target logit as a function of the target cosine.

A margin maps the B target cosines ``cos(theta)`` to the B target logits; every other logit is
``scale * cos``. Margins run in PyTorch with autograd on B values only, so adding a margin needs
no kernel change. All margins keep the target logit at or below ``scale * cos(theta)`` for every
``theta`` in ``[0, pi]``: a margin never makes the target easier.

Angular margins (:class:`ArcFace`, :class:`CombinedMargin`) use ``cos(m1 * theta + m2)`` on
``[THETA_MIN, theta_max]`` and continue it at both ends:

* Past ``theta_max = (pi - m2) / m1`` the cosine would rise again, so there the target logit
  continues as ``cos(theta) - (1 + cos(theta_max))``: continuous at ``theta_max`` (both sides
  equal ``-1``), still decreasing in ``theta`` and still below ``cos(theta)``.
* Below ``THETA_MIN`` (0.1 rad, ``cos(theta) > 0.995``) it continues along its tangent, linear in
  ``cos(theta)``. The exact derivative ``m1 * sin(m1 * theta + m2) / sin(theta)`` grows without
  bound as ``theta -> 0`` (for ArcFace it is ``cos m + sin m * cot(theta)``), so a center that
  (nearly) duplicates an embedding would get an arbitrarily large gradient. The tangent keeps the
  value and the derivative continuous, bounds the derivative by its value at ``THETA_MIN`` (5.66
  for ``m = 0.5``, times ``s``), and stays below ``cos(theta)``. The value there is at most
  ``0.03 * s`` below the exact one (at ``theta = 0``, ``m = 0.5``).

``m1 = 1, m2 = 0`` is no angular margin at all: :class:`CombinedMargin` then computes
``s * (cos(theta) - m3)`` directly, exactly CosFace (no ``acos`` round trip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Cosines are clamped at ``-1 + EPS`` before ``acos`` so its gradient stays finite.
_ACOS_EPS = 1e-6
#: Below this angle (radians) angular margins continue along their tangent (module docstring).
THETA_MIN = 0.1


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
    """``cos(m1 * theta + m2)`` with the tangent below ``THETA_MIN`` and the fallback past
    ``m1 * theta + m2 = pi`` (module docstring)."""
    theta_max = (math.pi - m2) / m1
    theta_min = min(THETA_MIN, theta_max / 2)
    cos_min = math.cos(theta_min)
    tangent_slope = m1 * math.sin(m1 * theta_min + m2) / math.sin(theta_min)
    fallback = cos - (1.0 + math.cos(theta_max))
    # Branches not taken are still differentiated: keep the angle within [theta_min, theta_max],
    # so that neither acos near 1 nor a large m1 can send an inf or NaN gradient through torch.where.
    theta = torch.acos(cos.clamp(-1 + _ACOS_EPS, cos_min))
    angular = torch.where(theta <= theta_max, torch.cos(m1 * theta.clamp(max=theta_max) + m2), fallback)
    if cos_min >= 1.0 or not math.isfinite(tangent_slope):  # an m1 so large that no cosine is that close to 1
        return angular
    tangent = math.cos(m1 * theta_min + m2) + tangent_slope * (cos - cos_min)
    return torch.where(cos > cos_min, tangent, angular)


def _angular_value(cos: torch.Tensor, m1: float, m2: float) -> torch.Tensor:
    """``cos(m1 * theta + m2)`` itself (with the fallback past pi), for straight-through margins,
    whose gradient does not come from it."""
    theta = torch.acos(cos.clamp(-1.0, 1.0))
    theta_max = (math.pi - m2) / m1
    return torch.where(theta <= theta_max, torch.cos(m1 * theta + m2), cos - (1.0 + math.cos(theta_max)))


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

    The gradient is the exact derivative of that function (bounded below ``THETA_MIN``, see the
    module docstring). With ``straight_through=True`` the value is ``cos(theta + m)`` itself and
    the gradient with respect to ``cos(theta)`` is ``s``, as in insightface, which edits the logits
    under ``torch.no_grad()``; use it to reproduce training runs tuned for that implementation.
    """

    m: float = 0.5
    straight_through: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_non_negative(m=self.m)
        if self.m >= math.pi:
            raise ValueError(f"ArcFace margin m must be < pi, got {self.m}")

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        if self.straight_through:
            return self.s * (cos + (_angular_value(cos, 1.0, self.m) - cos).detach())
        return self.s * _angular_margin(cos, 1.0, self.m)


@dataclass(frozen=True)
class CombinedMargin(Margin):
    """``s * (cos(m1 * theta + m2) - m3)``: SphereFace (m1), ArcFace (m2) and CosFace (m3) at once.

    Requires ``m1 >= 1`` and ``m2, m3 >= 0`` so that the target logit never exceeds ``s * cos``.
    ``m1 = 1, m2 = 0`` is CosFace exactly. ``straight_through=True`` keeps the value and passes the
    gradient of ``cos(theta)`` through the angular part (``d logit / d cos = s``), as insightface's
    ``CombinedMarginLoss`` does for ``margin_list=(1.0, m2, 0.0)`` (its ArcFace configs).
    """

    m1: float = 1.0
    m2: float = 0.3
    m3: float = 0.2
    straight_through: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_non_negative(m2=self.m2, m3=self.m3)
        if not (isinstance(self.m1, int | float) and math.isfinite(self.m1) and self.m1 >= 1.0):
            raise ValueError(f"CombinedMargin m1 must be a finite number >= 1, got {self.m1!r}")
        if self.m2 >= math.pi:
            raise ValueError(f"CombinedMargin m2 must be < pi, got {self.m2}")

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        if self.m1 == 1.0 and self.m2 == 0.0:
            return self.s * (cos - self.m3)
        if self.straight_through:
            return self.s * (cos + (_angular_value(cos, self.m1, self.m2) - cos).detach() - self.m3)
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
