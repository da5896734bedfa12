"""Margin functions: values, exact gradients, behaviour past theta + m = pi."""

import math

import pytest
import torch

from fastpfc import ArcFace, CombinedMargin, CosFace, Softmax, create_margin

COS_GRID = torch.linspace(-1.0, 1.0, 4001, dtype=torch.float64)
ANGULAR = [ArcFace(s=64.0, m=0.5), ArcFace(s=30.0, m=1.2), CombinedMargin(s=64.0, m1=1.0, m2=0.3, m3=0.2),
           CombinedMargin(s=32.0, m1=1.35, m2=0.5, m3=0.0)]
ALL = ANGULAR + [CosFace(s=64.0, m=0.4), Softmax(s=10.0)]


def test_values_match_closed_form():
    cos = torch.tensor([0.9, 0.3, -0.2], dtype=torch.float64)
    theta = torch.acos(cos)
    assert torch.allclose(ArcFace(s=64.0, m=0.5)(cos), 64.0 * torch.cos(theta + 0.5))
    assert torch.allclose(CosFace(s=64.0, m=0.4)(cos), 64.0 * (cos - 0.4))
    combined = CombinedMargin(s=32.0, m1=1.2, m2=0.3, m3=0.1)
    assert torch.allclose(combined(cos), 32.0 * (torch.cos(1.2 * theta + 0.3) - 0.1))
    assert torch.allclose(Softmax(s=10.0)(cos), 10.0 * cos)


@pytest.mark.parametrize("margin", ALL, ids=repr)
def test_margin_never_raises_target_and_is_monotone(margin):
    logits = margin(COS_GRID)
    assert torch.all(logits <= margin.s * COS_GRID + 1e-9)
    assert torch.all(torch.diff(logits) >= -1e-9), "target logit must not decrease as cos(theta) grows"


@pytest.mark.parametrize("margin", ANGULAR, ids=repr)
def test_fallback_past_pi_is_continuous(margin):
    m1 = getattr(margin, "m1", 1.0)
    m2 = getattr(margin, "m2", getattr(margin, "m", 0.0))
    theta_max = (math.pi - m2) / m1
    cos = torch.tensor([math.cos(theta_max - 1e-7), math.cos(theta_max + 1e-7)], dtype=torch.float64)
    left, right = margin(cos)
    assert abs(float(left - right)) < 1e-4 * margin.s
    m3 = getattr(margin, "m3", 0.0)
    assert math.isclose(float(left), margin.s * (-1.0 - m3), abs_tol=1e-4 * margin.s)


def test_arcface_gradient_is_exact():
    s, m = 64.0, 0.5
    cos = torch.tensor([0.95, 0.5, 0.0, -0.5], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(ArcFace(s=s, m=m)(cos).sum(), cos)
    c = cos.detach()
    expected = s * (math.cos(m) + math.sin(m) * c / torch.sqrt(1 - c * c))
    assert torch.allclose(grad, expected)


@pytest.mark.parametrize("margin", ALL, ids=repr)
def test_gradcheck(margin):
    cos = (torch.rand(16, dtype=torch.float64) * 1.8 - 0.9).requires_grad_()
    assert torch.autograd.gradcheck(margin, (cos,))


def test_straight_through_keeps_value_and_passes_gradient():
    cos = torch.tensor([0.9, 0.1, -0.95], dtype=torch.float64, requires_grad=True)
    exact, straight = ArcFace(s=64.0, m=0.5), ArcFace(s=64.0, m=0.5, straight_through=True)
    assert torch.equal(straight(cos), exact(cos))
    (grad,) = torch.autograd.grad(straight(cos).sum(), cos)
    assert torch.allclose(grad, torch.full_like(grad, 64.0))


@pytest.mark.parametrize("factory", [lambda: ArcFace(m=-0.1), lambda: ArcFace(m=4.0), lambda: CosFace(m=-1.0),
                                     lambda: CombinedMargin(m1=0.5), lambda: Softmax(s=-1.0)])
def test_invalid_parameters_raise(factory):
    with pytest.raises(ValueError, match="margin|must"):
        factory()


def test_registry():
    assert create_margin("CosFace", s=30.0, m=0.35) == CosFace(s=30.0, m=0.35)
    with pytest.raises(ValueError, match="unknown margin 'nope'"):
        create_margin("nope")
