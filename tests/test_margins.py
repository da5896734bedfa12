"""Margin functions: values, exact gradients, behaviour past theta + m = pi."""

import math

import pytest
import torch

from fastpfc import ArcFace, CombinedMargin, CosFace, Softmax, create_margin, partial_fc_loss
from fastpfc.margins import THETA_MIN

COS_GRID = torch.linspace(-1.0, 1.0, 4001, dtype=torch.float64)
ANGULAR = [ArcFace(s=64.0, m=0.5), ArcFace(s=30.0, m=1.2), ArcFace(s=64.0, m=0.01),
           CombinedMargin(s=64.0, m1=1.0, m2=0.3, m3=0.2), CombinedMargin(s=32.0, m1=1.35, m2=0.5, m3=0.0),
           CombinedMargin(s=16.0, m1=4.0, m2=0.0, m3=0.1)]
STRAIGHT = [ArcFace(s=64.0, m=0.5, straight_through=True),
            CombinedMargin(s=64.0, m1=1.0, m2=0.5, m3=0.0, straight_through=True)]
ALL = ANGULAR + STRAIGHT + [CosFace(s=64.0, m=0.4), Softmax(s=10.0), CombinedMargin(s=64.0, m1=1.0, m2=0.0, m3=0.4)]


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


def _value_and_grad(margin, cos):
    cos = cos.clone().requires_grad_()
    logit = margin(cos)
    (grad,) = torch.autograd.grad(logit.sum(), cos)
    return logit.detach(), grad


@pytest.mark.parametrize("margin", ALL, ids=repr)
def test_finite_and_bounded_on_the_whole_range_including_both_ends(margin):
    """Value and gradient finite on [-1, 1] (both ends included); the gradient is bounded by its
    value at THETA_MIN, and the value moves by no more than that bound allows between grid points
    (continuous); the gradient is continuous at the tangent's joint."""
    logit, grad = _value_and_grad(margin, COS_GRID)
    assert torch.isfinite(logit).all() and torch.isfinite(grad).all()
    if getattr(margin, "straight_through", False):  # the value is cos(theta + m) itself: its jumps are
        assert torch.equal(grad, torch.full_like(grad, margin.s))  # sin(m) * sqrt(2 * step) at most
        assert torch.diff(logit).abs().max() <= margin.s * 0.05
        return
    m1, m2 = getattr(margin, "m1", 1.0), getattr(margin, "m2", getattr(margin, "m", 0.0))
    bound = margin.s * max(1.0, m1 * math.sin(m1 * THETA_MIN + m2) / math.sin(THETA_MIN))
    assert grad.abs().max() <= bound * (1 + 1e-9)
    step = float(COS_GRID[1] - COS_GRID[0])
    assert torch.diff(logit).abs().max() <= bound * step * (1 + 1e-6)
    joint = math.cos(THETA_MIN)
    _, around = _value_and_grad(margin, torch.tensor([joint - 1e-9, joint + 1e-9], dtype=torch.float64))
    assert abs(float(around[0] - around[1])) < 1e-4 * margin.s


def test_combined_margin_without_angular_part_is_cosface_exactly():
    cos = torch.tensor([-1.0, -0.3, 0.5, 0.999998, 0.9999997, 1.0], dtype=torch.float64)
    combined = _value_and_grad(CombinedMargin(s=64.0, m1=1.0, m2=0.0, m3=0.4), cos)
    cosface = _value_and_grad(CosFace(s=64.0, m=0.4), cos)
    assert torch.equal(combined[0], cosface[0]) and torch.equal(combined[1], cosface[1])
    assert torch.equal(combined[1], torch.full_like(cos, 64.0))


def test_near_theta_zero_the_gradient_is_the_tangents_not_zero_or_huge():
    """The issue's examples: at cos = 0.9999997 and 0.999998 the exact ArcFace gradient was 0.0
    and 15296.9 (acos clamp); both now sit on the tangent: equal, finite, s * sin(0.6) / sin(0.1)."""
    cos = torch.tensor([0.9999997, 0.999998, 1.0], dtype=torch.float64)
    _, grad = _value_and_grad(ArcFace(s=64.0, m=0.5), cos)
    expected = 64.0 * math.sin(THETA_MIN + 0.5) / math.sin(THETA_MIN)
    assert torch.allclose(grad, torch.full_like(grad, expected))


@pytest.mark.parametrize("theta", [1e-3, 2e-3])
def test_duplicate_centers_get_a_bounded_gradient(theta):
    """An embedding at angle theta from its center, whose class has a duplicate center elsewhere:
    the center's gradient is finite and nonzero for every margin, and exact ArcFace's is within the
    tangent's bound of the straight-through one (insightface's)."""
    dim = 8
    gen = torch.Generator().manual_seed(0)
    center, other = torch.nn.functional.normalize(torch.randn(2, dim, dtype=torch.float64, generator=gen), dim=1)
    direction = torch.nn.functional.normalize(other - (other @ center) * center, dim=0)
    x = (math.cos(theta) * center + math.sin(theta) * direction)[None]
    weight = torch.stack([center, center.clone(), other])
    labels = torch.tensor([0])
    norms = {}
    for name, margin in {"cosface": CosFace(s=64.0, m=0.4), "combined": CombinedMargin(s=64.0, m1=1, m2=0, m3=0.4),
                         "arcface": ArcFace(s=64.0, m=0.5),
                         "straight": ArcFace(s=64.0, m=0.5, straight_through=True)}.items():
        w = weight.clone().requires_grad_()
        partial_fc_loss(x, w, labels, margin, backend="torch").backward()
        norms[name] = float(w.grad[0].norm())
    assert all(math.isfinite(n) and n > 0 for n in norms.values()), norms
    assert norms["combined"] == norms["cosface"]
    assert norms["arcface"] <= norms["straight"] * math.sin(THETA_MIN + 0.5) / math.sin(THETA_MIN) * 1.01, norms


@pytest.mark.parametrize("margin", [m for m in ALL if m not in STRAIGHT], ids=repr)
def test_gradcheck(margin):
    cos = (torch.rand(16, dtype=torch.float64) * 1.8 - 0.9).requires_grad_()
    assert torch.autograd.gradcheck(margin, (cos,))


@pytest.mark.parametrize("straight", STRAIGHT, ids=repr)
def test_straight_through_keeps_value_and_passes_gradient(straight):
    cos = torch.tensor([0.9, 0.1, -0.95], dtype=torch.float64, requires_grad=True)
    exact = ArcFace(s=64.0, m=0.5)
    assert torch.allclose(straight(cos), exact(cos), rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(straight(cos).sum(), cos)
    assert torch.allclose(grad, torch.full_like(grad, 64.0))
    near_one = torch.tensor([0.99999], dtype=torch.float64)  # the value is cos(theta + m) itself there too
    assert torch.allclose(straight(near_one), 64.0 * torch.cos(torch.acos(near_one) + 0.5))


@pytest.mark.parametrize("factory", [lambda: ArcFace(m=-0.1), lambda: ArcFace(m=4.0), lambda: CosFace(m=-1.0),
                                     lambda: CombinedMargin(m1=0.5), lambda: Softmax(s=-1.0)])
def test_invalid_parameters_raise(factory):
    with pytest.raises(ValueError, match="margin|must"):
        factory()


def test_registry():
    assert create_margin("CosFace", s=30.0, m=0.35) == CosFace(s=30.0, m=0.35)
    with pytest.raises(ValueError, match="unknown margin 'nope'"):
        create_margin("nope")
