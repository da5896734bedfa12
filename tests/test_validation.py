"""Bad input gets a clear Python exception naming the problem."""

import pytest
import torch

import fastpfc.loss
import fastpfc.triton_backend
from fastpfc import PartialFCLoss, partial_fc_loss
from fastpfc.margins import CosFace


@pytest.fixture
def loss_fn():
    return PartialFCLoss(embedding_size=8, num_classes=20)


def _x(batch=4):
    return torch.randn(batch, 8)


@pytest.mark.parametrize("labels, match", [
    (torch.tensor([0, 1, 20, 3]), r"labels must be in \[0, 20\); got \[20\]"),
    (torch.tensor([0, -1, 2, 3]), r"labels must be in \[0, 20\); got \[-1\]"),
    (torch.tensor([0.0, 1.0, 2.0, 3.0]), "labels must be an integer tensor"),
    (torch.tensor([True, False, True, False]), "labels must be an integer tensor"),
    (torch.tensor([0, 1, 2]), r"labels must have shape \[4\]"),
    (torch.tensor([[0, 1], [2, 3]]), r"labels must have shape \[4\]"),
])
def test_bad_labels(loss_fn, labels, match):
    with pytest.raises((ValueError, TypeError), match=match):
        loss_fn(_x(), labels)


def test_out_of_range_labels_with_sampling():
    loss_fn = PartialFCLoss(8, 20, sample_rate=0.5)
    with pytest.raises(ValueError, match="labels must be in"):
        loss_fn(_x(), torch.tensor([0, 1, 2, 25]))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_embeddings(loss_fn, value):
    x = _x()
    x[2, 5] = value
    with pytest.raises(ValueError, match=r"embeddings contain NaN or Inf in rows \[2\]"):
        loss_fn(x, torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("x, error, match", [
    (torch.randn(4, 7), ValueError, r"embeddings must have shape \[batch, 8\]"),
    (torch.randn(4), ValueError, r"embeddings must have shape"),
    (torch.randint(0, 3, (4, 8)), TypeError, "embeddings must be a float tensor"),
    (torch.randn(4, 8, device="meta"), ValueError, "embeddings are on meta but the class centers are on cpu"),
])
def test_bad_embeddings(loss_fn, x, error, match):
    with pytest.raises(error, match=match):
        loss_fn(x, torch.tensor([0, 1, 2, 3]))


def test_validation_is_one_host_sync(loss_fn, monkeypatch):
    """The value checks read back one small tensor per call (a single .tolist())."""
    calls = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(self.shape) or real_tolist(self))
    loss_fn(_x(), torch.tensor([0, 1, 2, 3]))
    assert calls == [torch.Size([3])]


def test_validate_false_skips_value_checks(monkeypatch):
    loss_fn = PartialFCLoss(8, 20, validate=False)
    monkeypatch.setattr(fastpfc.loss, "check_values", None)  # would raise if called
    assert torch.isfinite(loss_fn(_x(), torch.tensor([0, 1, 2, 3])))


@pytest.mark.parametrize("kwargs, match", [
    (dict(sample_rate=0.0), "sample_rate"), (dict(sample_rate=1.5), "sample_rate"),
    (dict(reduction="avg"), "reduction"), (dict(backend="cuda"), "backend"),
    (dict(num_classes=0), "positive"), (dict(memory_budget=-1), "memory_budget"),
    (dict(memory_budget=1.5), "memory_budget"),
])
def test_bad_constructor_arguments(kwargs, match):
    args = dict(embedding_size=8, num_classes=20) | kwargs
    with pytest.raises(ValueError, match=match):
        PartialFCLoss(**args)


@pytest.mark.parametrize("index, match", [
    (torch.tensor([0, 1, 2, 5]), "every label must be among the sampled classes"),
    (torch.tensor([0, 1, 3, 2, 4]), "sorted, unique"),
    (torch.tensor([0, 1, 2, 3, 3, 4]), "sorted, unique"),
    (torch.tensor([0, 1, 2, 3, 4, 20]), r"in \[0, 20\)"),
])
def test_functional_checks_the_sample(index, match):
    with pytest.raises(ValueError, match=match):
        partial_fc_loss(_x(), torch.randn(20, 8), torch.tensor([0, 1, 3, 4]), CosFace(), index)


def test_functional_checks_labels():
    with pytest.raises(ValueError, match=r"labels must be in \[0, 20\)"):
        partial_fc_loss(_x(), torch.randn(20, 8), torch.tensor([0, 1, 3, 24]), CosFace())


def test_triton_backend_rejects_float64():
    x, w, labels = torch.randn(4, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64), torch.arange(4)
    with pytest.raises(TypeError, match="backend='triton' supports fp32/fp16/bf16 embeddings"):
        partial_fc_loss(x, w, labels, CosFace(), backend="triton")


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(fastpfc.triton_backend, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        partial_fc_loss(torch.randn(4, 8), torch.randn(20, 8), torch.arange(4), CosFace(), backend="triton")
