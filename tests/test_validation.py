"""Bad input gets a clear Python exception naming the problem."""

import pytest
import torch

import fastpfc
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


# Hardening (issue 16): inputs that used to give a wrong answer without an error.

@pytest.mark.parametrize("dtype, num_classes", [(torch.int8, 200), (torch.uint8, 300), (torch.int16, 40000),
                                                (torch.int32, 100), (torch.uint16, 70000), (torch.uint32, 90)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_labels_of_any_integer_dtype_give_the_int64_answer(dtype, num_classes, backend):
    """Narrow labels were compared in their own dtype (a false 'out of range'), and uint8 labels
    were taken for a boolean mask by the Triton path."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 8, generator=gen), torch.randn(num_classes, 8, generator=gen)
    labels = torch.tensor([3, 50, 80, 3])
    expected = partial_fc_loss(x, w, labels, CosFace(s=30.0, m=0.4), reduction="none", backend=backend)
    got = partial_fc_loss(x, w, labels.to(dtype), CosFace(s=30.0, m=0.4), reduction="none", backend=backend)
    assert torch.equal(got, expected)
    module = PartialFCLoss(8, num_classes, margin=CosFace(s=30.0, m=0.4), reduction="none", backend=backend)
    with torch.no_grad():
        module.weight.copy_(w)
    assert torch.equal(module(x, labels.to(dtype)), expected)


def test_index_and_target_pos_are_checked():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 8, generator=gen), torch.randn(30, 8, generator=gen)
    labels = torch.tensor([3, 7, 12, 3])
    index = torch.tensor([1, 3, 7, 12, 20])
    right = torch.searchsorted(index, labels)
    loss = partial_fc_loss(x, w, labels, CosFace(), index, right)
    assert torch.equal(partial_fc_loss(x, w, labels, CosFace(), index.int(), right.int()), loss)  # int32 is fine
    with pytest.raises(ValueError, match="target_pos must give each row's label position in index"):
        partial_fc_loss(x, w, labels, CosFace(), index, right.roll(1))
    with pytest.raises(ValueError, match="target_pos must give"):
        partial_fc_loss(x, w, labels, CosFace(), index, torch.tensor([1, 2, 3, 9]))  # 9: past the end
    with pytest.raises(ValueError, match="index is empty"):
        partial_fc_loss(x, w, labels, CosFace(), torch.tensor([], dtype=torch.long))
    with pytest.raises(TypeError, match="index must be an integer tensor"):
        partial_fc_loss(x, w, labels, CosFace(), index.float())
    with pytest.raises(ValueError, match=r"index must have shape \[C\]"):
        partial_fc_loss(x, w, labels, CosFace(), index[None])
    with pytest.raises(ValueError, match=r"target_pos must have shape \[4\]"):
        partial_fc_loss(x, w, labels, CosFace(), index, right[:3])


@pytest.mark.parametrize("make, match", [
    (lambda: CosFace(s=float("inf")), "finite"), (lambda: CosFace(s=0.0), "s must be > 0"),
    (lambda: CosFace(m=float("nan")), "finite"), (lambda: fastpfc.CombinedMargin(m1=float("inf")), "finite"),
    (lambda: fastpfc.CombinedMargin(m3=-0.1), ">= 0"),
])
def test_margin_parameters_are_checked(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_huge_first_angular_margin_gives_finite_gradients():
    """m1 = 1e308 used to give a finite loss with all-NaN gradients (the branch torch.where did not
    take overflowed)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 8, generator=gen, requires_grad=True)
    w = torch.randn(20, 8, generator=gen, requires_grad=True)
    loss = partial_fc_loss(x, w, torch.tensor([1, 2, 3, 4, 5, 6]), fastpfc.CombinedMargin(s=64.0, m1=1e308),
                           backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("size", [1e14, 8e15, 1e19, 1e30])
def test_embeddings_of_any_size_give_the_loss_of_their_direction(size):
    """The loss depends only on each embedding's direction: at |x| = 1e19 the fp32 sum of squares
    used to overflow (a wrong loss), and from 1e14 the normalization's backward drifted."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    w = torch.randn(20, 8, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 6, 9, 12])

    def loss_and_grad(embeddings):
        embeddings = embeddings.detach().requires_grad_()
        loss = partial_fc_loss(embeddings, w.to(embeddings.dtype), labels, CosFace(), backend="torch")
        loss.backward()
        return loss.double(), embeddings.grad.double()

    unit_loss, unit_grad = loss_and_grad(x)
    big_loss, big_grad = loss_and_grad((x * size).float())
    assert torch.allclose(big_loss, unit_loss, rtol=1e-5)
    assert torch.allclose(big_grad * size, unit_grad, rtol=1e-4, atol=1e-6 * unit_grad.abs().max())  # grad ~ 1/|x|


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_nan_in_the_modules_own_centers_is_named(sample_rate):
    loss_fn = PartialFCLoss(8, 40, sample_rate=sample_rate, seed=0)
    labels = torch.tensor([3, 7, 7, 20])
    with torch.no_grad():
        loss_fn.weight[7, 2] = float("nan")
    with pytest.raises(ValueError, match=r"class centers \(loss_fn.weight\) contain NaN or Inf in the rows of "
                                         r"classes \[7\]"):
        loss_fn(torch.randn(4, 8), labels)
    loss_fn.validate = False  # unchecked: the NaN goes through, as documented
    assert not torch.isfinite(loss_fn(torch.randn(4, 8), labels))
