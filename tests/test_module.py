"""PartialFCLoss as a user sees it: API, sampling, reductions, state, training."""

import io

import numpy as np
import pytest
import torch

import fastpfc.loss
from fastpfc import ArcFace, CosFace, PartialFCLoss, reference_partial_fc_loss
from fastpfc.distributed import shard_bounds
from fastpfc.functional import resolve_backend
from fastpfc.loss import init_centers
from fastpfc.sampling import sample_centers


def _inputs(batch, dim, num_classes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=gen), torch.randint(0, num_classes, (batch,), generator=gen)


def test_weight_initialisation():
    loss_fn = PartialFCLoss(embedding_size=64, num_classes=3000, seed=3)
    assert torch.equal(loss_fn.weight, PartialFCLoss(64, 3000, seed=3).weight)
    assert not torch.equal(loss_fn.weight, PartialFCLoss(64, 3000, seed=4).weight)
    assert isinstance(loss_fn.weight, torch.nn.Parameter)
    assert loss_fn.weight.shape == (3000, 64) and loss_fn.weight.dtype == torch.float32
    assert abs(loss_fn.weight.std().item() - 0.01) < 5e-4
    assert abs(loss_fn.weight.mean().item()) < 5e-4


def test_full_softmax_matches_reference_and_skips_sampling(monkeypatch):
    monkeypatch.setattr(fastpfc.loss, "sample_centers", None)  # would raise if called
    loss_fn = PartialFCLoss(32, 100, margin=ArcFace(), sample_rate=1.0)
    x, labels = _inputs(24, 32, 100)
    x.requires_grad_()
    loss = loss_fn(x, labels)
    loss.backward()
    expected = reference_partial_fc_loss(x.double(), loss_fn.weight.double(), labels, ArcFace())
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert loss_fn.weight.grad.abs().sum(dim=1).gt(0).all()


def test_sampled_loss_uses_module_generator():
    loss_fn = PartialFCLoss(16, 500, margin=CosFace(), sample_rate=0.1, seed=123)
    x, labels = _inputs(40, 16, 500)
    replay = torch.Generator()
    replay.set_state(loss_fn._sampler().get_state())
    loss = loss_fn(x, labels)
    index, _ = sample_centers(labels, 500, 0.1, replay)
    expected = reference_partial_fc_loss(x.double(), loss_fn.weight.double(), labels, CosFace(), index)
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    loss.backward()
    touched = loss_fn.weight.grad.abs().sum(dim=1) > 0
    assert torch.equal(touched.nonzero().flatten(), index)


def test_reductions_and_changing_batch_size():
    x, labels = _inputs(30, 8, 50)
    losses = {r: PartialFCLoss(8, 50, reduction=r, seed=0) for r in ("mean", "sum", "none")}
    for loss_fn in losses.values():
        loss_fn.weight.data.copy_(losses["mean"].weight.data)
    per_row = losses["none"](x, labels)
    assert per_row.shape == (30,)
    assert torch.allclose(losses["sum"](x, labels), per_row.sum())
    assert torch.allclose(losses["mean"](x, labels), per_row.mean())
    assert losses["none"](x[:7], labels[:7]).shape == (7,)
    assert losses["none"](x[:1], labels[:1]).shape == (1,)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    loss_fn = PartialFCLoss(8, 50, sample_rate=0.5, reduction=reduction)
    x = torch.empty(0, 8, requires_grad=True)
    loss = loss_fn(x, torch.empty(0, dtype=torch.long))
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert torch.all(loss == 0)
    loss.sum().backward()
    assert x.grad.shape == (0, 8)
    assert torch.all(loss_fn.weight.grad == 0)


def test_int32_labels_and_low_precision_embeddings():
    loss_fn = PartialFCLoss(16, 40)
    x, labels = _inputs(10, 16, 40)
    base = loss_fn(x, labels)
    assert torch.equal(loss_fn(x, labels.int()), base)
    half = loss_fn(x.bfloat16(), labels)
    assert half.dtype == torch.float32 and abs(half.item() - base.item()) < 0.05 * abs(base.item())


def test_autocast_does_not_change_the_loss():
    loss_fn = PartialFCLoss(16, 300, margin=ArcFace(), seed=1)
    x, labels = _inputs(20, 16, 300)
    x.requires_grad_()
    expected = loss_fn(x, labels)
    (expected_grad,) = torch.autograd.grad(expected, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(x, labels)
        (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(loss, expected) and torch.equal(grad, expected_grad)


def test_state_dict_resumes_sampling_exactly():
    x, labels = _inputs(32, 16, 400)
    original = PartialFCLoss(16, 400, sample_rate=0.2, seed=5)
    for _ in range(3):
        original(x, labels)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = PartialFCLoss(16, 400, sample_rate=0.2, seed=999)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert torch.equal(resumed.weight, original.weight)
    for _ in range(3):
        assert torch.equal(resumed(x, labels), original(x, labels))


def test_backend_selection():
    """'auto': Triton for CUDA tensors in fp32/fp16/bf16, torch on the CPU and for float64 anywhere."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_backend("auto", cpu, torch.float32, torch.float32) == "torch"
    assert resolve_backend("auto", cuda, torch.bfloat16, torch.float32) == "triton"
    assert resolve_backend("auto", cuda, torch.float64, torch.float64) == "torch"
    assert resolve_backend("auto", cuda, torch.float32, torch.float64) == "torch"
    assert resolve_backend("triton", cuda, torch.float64, torch.float64) == "triton"  # named: taken as named
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("cuda", cpu, torch.float32)


def test_training_on_separable_data_improves_accuracy():
    """A linear embedding trained with the loss separates 20 Gaussian classes."""
    torch.manual_seed(0)
    num_classes, dim_in, dim = 20, 32, 16
    means = torch.randn(num_classes, dim_in) * 2.0
    model = torch.nn.Linear(dim_in, dim)
    loss_fn = PartialFCLoss(dim, num_classes, margin=CosFace(s=16.0, m=0.2), sample_rate=0.5, seed=0)
    optimizer = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=0.5, momentum=0.9)

    def accuracy():
        labels = torch.arange(num_classes).repeat(20)
        with torch.no_grad():
            emb = torch.nn.functional.normalize(model(means[labels] + torch.randn(len(labels), dim_in)))
            pred = (emb @ torch.nn.functional.normalize(loss_fn.weight).T).argmax(dim=1)
        return (pred == labels).float().mean().item()

    before = accuracy()
    for _ in range(150):
        labels = torch.randint(0, num_classes, (64,))
        loss = loss_fn(model(means[labels] + torch.randn(64, dim_in)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = accuracy()
    assert before < 0.3 and after > 0.9, (before, after)


def test_initial_centers_do_not_depend_on_sharding():
    """Shards of any world size, across seeded-block boundaries, reassemble the full matrix."""
    full = init_centers(0, 70_001, 4, seed=9)
    for world_size in (2, 3, 7):
        bounds = [shard_bounds(70_001, world_size, r) for r in range(world_size)]
        assert torch.equal(torch.cat([init_centers(start, stop, 4, seed=9) for start, stop in bounds]), full)


class _InsightfaceStyleMargin(torch.nn.Module):
    """Stands in for insightface's CombinedMarginLoss: a module that edits a logits matrix."""

    def forward(self, logits, labels):
        return logits


class _PlainPartialFC(torch.nn.Module):
    """The state layout of insightface's PartialFC_V2: one ``weight`` parameter [C, D]."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (num_classes, dim)))


def test_insightface_style_calls_say_what_to_write():
    with pytest.raises(TypeError, match=r"PartialFC_V2\(margin_loss, embedding_size, num_classes"):
        PartialFCLoss(_InsightfaceStyleMargin(), 64, 2000, 1.0, False)
    with pytest.raises(TypeError, match=r"\(1, m, 0\) is ArcFace\(s, m, straight_through=True\)"):
        PartialFCLoss(64, 2000, margin=_InsightfaceStyleMargin())
    with pytest.raises(TypeError, match="embedding_size must be an int"):
        PartialFCLoss(64.0, 2000)
    with pytest.raises(TypeError, match="sample_rate must be a number"):
        PartialFCLoss(64, 2000, sample_rate="0.3")
    assert PartialFCLoss(np.int64(8), np.int32(20), sample_rate=np.float32(0.5)).num_classes == 20  # NumPy scalars


def test_labels_of_shape_b_by_1_are_taken_as_b():
    loss_fn = PartialFCLoss(8, 30, sample_rate=0.5, seed=1)
    x, labels = torch.randn(5, 8), torch.randint(0, 30, (5,))
    flat = loss_fn(x, labels)
    loss_fn.load_state_dict(PartialFCLoss(8, 30, sample_rate=0.5, seed=1).state_dict())  # the same sample again
    assert torch.equal(loss_fn(x, labels[:, None]), flat)


def test_plain_weight_state_loads_with_a_warning_and_exports_back():
    theirs = _PlainPartialFC(30, 8)
    ours = PartialFCLoss(8, 30, sample_rate=0.5, seed=3)
    fresh = PartialFCLoss(8, 30, sample_rate=0.5, seed=3)
    ours(torch.randn(4, 8), torch.randint(0, 30, (4,)))  # advance the sampler: loading must reset it
    with pytest.warns(UserWarning, match="sampling restarts from this module's seed"):
        ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, theirs.weight)
    x, labels = torch.randn(6, 8), torch.randint(0, 30, (6,))
    with torch.no_grad():
        fresh.weight.copy_(theirs.weight)
    assert torch.equal(ours(x, labels), fresh(x, labels))  # same centers, same (restarted) sample
    back = _PlainPartialFC(30, 8)
    back.load_state_dict(ours.plain_state_dict(), strict=True)
    assert torch.equal(back.weight, ours.weight)
    with pytest.raises(RuntimeError, match="size mismatch"), pytest.warns(UserWarning, match="sampling restarts"):
        ours.load_state_dict(_PlainPartialFC(31, 8).state_dict())
