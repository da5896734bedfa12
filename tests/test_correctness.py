"""Both backends against the float64 reference, on ragged shapes that do not fill whole tiles."""

import pytest
import torch

import fastpfc.softmax_blocks
import fastpfc.torch_backend
from fastpfc import ArcFace, CombinedMargin, CosFace, Softmax, margin_softmax, partial_fc_loss
from fastpfc.reference import reference_partial_fc_loss

from helpers import DEVICE, loss_and_grads, make_problem, max_rel_error

MARGINS = [CosFace(s=64.0, m=0.4), ArcFace(s=64.0, m=0.5), CombinedMargin(s=32.0, m1=1.2, m2=0.3, m3=0.1),
           Softmax(s=30.0), ArcFace(s=64.0, m=0.5, straight_through=True)]
SMALL_TILES = dict(block_b=16, block_c=16, block_d=16, num_splits=3)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """The backend under test, with small class blocks (29 columns for the torch backend, 16 for
    the Triton backward) and, for Triton, small tiles and 3 class splits, to cross every boundary."""
    if request.param == "triton":
        from fastpfc import triton_backend
        from fastpfc.kernels import TileConfig
        monkeypatch.setattr(triton_backend, "default_config", lambda *args: TileConfig(**SMALL_TILES))
    monkeypatch.setattr(fastpfc.softmax_blocks, "_BLOCK_ELEMENTS", 37 * 29)
    monkeypatch.setattr(fastpfc.softmax_blocks, "_MIN_CHUNK", 1)
    return request.param


@pytest.mark.parametrize("margin", MARGINS, ids=lambda m: repr(m))
@pytest.mark.parametrize("num_sampled", [None, 45])
def test_loss_and_grads_match_float64_reference(backend, margin, num_sampled):
    p = make_problem(batch=37, num_classes=83, dim=40, num_sampled=num_sampled, seed=1)

    def ours(x, w):
        return partial_fc_loss(x, w, p["labels"], margin, p["index"], reduction="none", backend=backend)

    def reference(x, w):
        return reference_partial_fc_loss(x, w, p["labels"], margin, p["index"], reduction="none")

    expected = loss_and_grads(reference, p["x"], p["w"])
    actual = loss_and_grads(ours, p["x"].float(), p["w"].float())
    for name, a, e in zip(("loss", "grad_x", "grad_w"), actual, expected, strict=False):
        assert a.shape == e.shape
        assert max_rel_error(a, e) < 2e-5, name
    if p["index"] is not None:  # rows that were not sampled get exactly zero gradient
        unsampled = torch.ones(83, dtype=torch.bool, device=DEVICE)
        unsampled[p["index"]] = False
        assert torch.all(actual[2][unsampled] == 0)
        assert torch.all(actual[2][~unsampled].abs().sum(1) > 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(backend, reduction):
    p = make_problem(batch=21, num_classes=50, dim=24, num_sampled=20, seed=2)
    margin = CosFace()
    out = partial_fc_loss(p["x"].float(), p["w"].float(), p["labels"], margin, p["index"], reduction=reduction,
                          backend=backend)
    expected = reference_partial_fc_loss(p["x"], p["w"], p["labels"], margin, p["index"], reduction=reduction)
    assert out.shape == expected.shape
    assert max_rel_error(out, expected) < 2e-5


def test_both_outputs_with_absent_targets(backend):
    """target_pos = -1 (the row's class lives on another shard): plain LSE of s * cos, target logit 0.

    Both outputs carry their own upstream gradient, as they do when shards are combined.
    """
    p = make_problem(batch=19, num_classes=70, dim=33, seed=3)
    target_pos = p["labels"].clone()
    target_pos[::3] = -1
    margin = ArcFace(s=20.0, m=0.5)
    lse_weight = torch.rand(19, dtype=torch.float64, device=DEVICE)
    target_weight = torch.randn(19, dtype=torch.float64, device=DEVICE)

    def ours(x, w):
        lse, target_logit = margin_softmax(x, w, None, target_pos, margin, backend)
        return torch.stack([lse, target_logit])

    def reference(x, w):
        cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
        rows = torch.nonzero(target_pos >= 0).flatten()
        target_logit = torch.zeros(19, dtype=cos.dtype, device=DEVICE)
        target_logit = target_logit.index_put((rows,), margin(cos[rows, target_pos[rows]]))
        logits = (margin.s * cos).index_put((rows, target_pos[rows]), target_logit[rows])
        return torch.stack([torch.logsumexp(logits, dim=1), target_logit])

    def weighted(fn):
        return lambda x, w: fn(x, w) * torch.stack([lse_weight, target_weight]).to(x.dtype)

    expected = loss_and_grads(weighted(reference), p["x"], p["w"])
    actual = loss_and_grads(weighted(ours), p["x"].float(), p["w"].float())
    assert torch.all(actual[0][1, ::3] == 0)
    for name, a, e in zip(("outputs", "grad_x", "grad_w"), actual, expected, strict=True):
        assert max_rel_error(a, e) < 2e-5, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_reference(backend, dtype):
    """fp16/bf16 inputs: error vs float64 within the plain reference's error at that dtype, plus slack."""
    p = make_problem(batch=33, num_classes=75, dim=48, num_sampled=40, seed=5)
    margin = ArcFace()

    def ours(x, w):
        return partial_fc_loss(x, w, p["labels"], margin, p["index"], reduction="none", backend=backend)

    def reference(x, w):
        return reference_partial_fc_loss(x, w, p["labels"], margin, p["index"], reduction="none")

    exact = loss_and_grads(reference, p["x"], p["w"])
    low_ref = loss_and_grads(reference, p["x"].to(dtype), p["w"].float())
    low_ours = loss_and_grads(ours, p["x"].to(dtype), p["w"].float())
    for name, ours_t, ref_t, exact_t in zip(("loss", "grad_x", "grad_w"), low_ours, low_ref, exact, strict=False):
        assert torch.isfinite(ours_t).all(), name
        assert ours_t.dtype == ref_t.dtype, name
        assert max_rel_error(ours_t, exact_t) <= 1.5 * max_rel_error(ref_t, exact_t) + 1e-3, name


def test_zero_norm_rows_are_finite(backend):
    p = make_problem(batch=12, num_classes=40, dim=20, seed=6)
    x = p["x"].float()
    x[3] = 0.0
    w = p["w"].float()
    w[p["labels"][5]] = 0.0
    loss, grad_x, grad_w = loss_and_grads(
        lambda x, w: partial_fc_loss(x, w, p["labels"], CosFace(), reduction="none", backend=backend), x, w)
    expected = reference_partial_fc_loss(x.double(), w.double(), p["labels"], CosFace(), reduction="none")
    assert max_rel_error(loss, expected) < 2e-5
    assert torch.isfinite(grad_x).all() and torch.isfinite(grad_w).all()


def test_bitwise_deterministic(backend):
    p = make_problem(batch=40, num_classes=90, dim=36, num_sampled=50, seed=7)

    def run():
        return loss_and_grads(
            lambda x, w: partial_fc_loss(x, w, p["labels"], ArcFace(), p["index"], backend=backend),
            p["x"].float(), p["w"].float())

    for first, second in zip(run(), run(), strict=False):
        assert torch.equal(first, second)


def test_torch_backend_gradcheck(monkeypatch):
    monkeypatch.setattr(fastpfc.softmax_blocks, "_BLOCK_ELEMENTS", 12)
    monkeypatch.setattr(fastpfc.softmax_blocks, "_MIN_CHUNK", 1)
    p = make_problem(batch=5, num_classes=11, dim=6, num_sampled=4, seed=8, device=torch.device("cpu"))
    target_pos = torch.searchsorted(p["index"], p["labels"])
    target_pos[1] = -1
    inputs = (p["x"].requires_grad_(), p["w"].requires_grad_())
    for margin in (ArcFace(s=3.0, m=0.5), CombinedMargin(s=2.0, m1=1.3, m2=0.2, m3=0.1)):
        assert torch.autograd.gradcheck(
            lambda x, w, margin=margin: margin_softmax(x, w, p["index"], target_pos, margin, "torch"), inputs)
        assert torch.autograd.gradcheck(
            lambda x, w, margin=margin: partial_fc_loss(x, w, p["labels"], margin, p["index"], backend="torch"),
            inputs)


def test_non_contiguous_inputs(backend):
    """Strided labels, index and embeddings (views of larger tensors) give the same result."""
    p = make_problem(batch=23, num_classes=61, dim=20, num_sampled=30, seed=9)
    labels = torch.stack([p["labels"], p["labels"]], dim=1)[:, 1]
    index = torch.stack([p["index"], p["index"]], dim=1)[:, 0]
    x = p["x"].float().T.contiguous().T
    assert not (labels.is_contiguous() or index.is_contiguous() or x.is_contiguous())
    out = partial_fc_loss(x, p["w"].float(), labels, CosFace(), index, reduction="none", backend=backend)
    expected = reference_partial_fc_loss(p["x"], p["w"], p["labels"], CosFace(), p["index"], reduction="none")
    assert max_rel_error(out, expected) < 2e-5


def test_empty_batch_and_empty_shard(backend):
    p = make_problem(batch=6, num_classes=20, dim=16, seed=10)
    x, w = p["x"].float(), p["w"].float()
    lse, target_logit = margin_softmax(x[:0], w, None, p["labels"][:0], CosFace(), backend)
    assert lse.shape == target_logit.shape == (0,)
    no_classes = torch.empty(0, dtype=torch.long, device=DEVICE)
    x.requires_grad_()
    lse, _ = margin_softmax(x, w, no_classes, torch.full((6,), -1, device=DEVICE), CosFace(), backend)
    assert torch.all(lse == float("-inf"))


def _loss_and_grads_against_float64(p, margin, **options) -> tuple[torch.Tensor, ...]:
    """fp32 loss and gradients of ``partial_fc_loss(**options)`` on problem ``p``, checked against
    the float64 reference; returned for further checks."""
    expected = loss_and_grads(
        lambda x, w: reference_partial_fc_loss(x, w, p["labels"], margin, p["index"], reduction="none"),
        p["x"], p["w"])
    actual = loss_and_grads(
        lambda x, w: partial_fc_loss(x, w, p["labels"], margin, p["index"], reduction="none", **options),
        p["x"].float(), p["w"].float())
    for name, a, e in zip(("loss", "grad_x", "grad_w"), actual, expected, strict=True):
        assert max_rel_error(a, e) < 2e-5, name
    return actual


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("sampled", [False, True])
def test_interclass_filtering_matches_float64_reference(backend, sampled):
    """insightface's inter-class filtering: non-target cosines above the threshold count as 0 with
    no gradient. A threshold that filters a good share of the entries, on ragged sizes."""
    p = make_problem(batch=37, num_classes=83, dim=6, num_sampled=45 if sampled else None, seed=21)
    threshold = 0.4
    centers = p["w"] if p["index"] is None else p["w"][p["index"]]
    cos = torch.nn.functional.normalize(p["x"]) @ torch.nn.functional.normalize(centers).T
    assert 0.15 < (cos > threshold).double().mean() < 0.5  # the filter really acts
    expected = loss_and_grads(lambda x, w: reference_partial_fc_loss(
        x, w, p["labels"], MARGINS[1], p["index"], reduction="none", interclass_filtering_threshold=threshold),
        p["x"], p["w"])
    unfiltered = loss_and_grads(lambda x, w: reference_partial_fc_loss(
        x, w, p["labels"], MARGINS[1], p["index"], reduction="none"), p["x"], p["w"])
    dtype = torch.float64 if backend == "torch" else torch.float32
    actual = loss_and_grads(lambda x, w: partial_fc_loss(
        x, w, p["labels"], MARGINS[1], p["index"], reduction="none", backend=backend,
        interclass_filtering_threshold=threshold, memory_budget=1 << 20), p["x"].to(dtype), p["w"].to(dtype))
    for name, a, e, u in zip(("loss", "grad_x", "grad_w"), actual, expected, unfiltered, strict=True):
        assert max_rel_error(a, e) < (1e-12 if backend == "torch" else 2e-5), name
        assert max_rel_error(u, e) > 1e-3, name  # filtering changes every output


def test_interclass_filtering_threshold_is_checked():
    p = make_problem(batch=3, num_classes=7, dim=4)
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="interclass_filtering_threshold"):
            partial_fc_loss(p["x"], p["w"], p["labels"], MARGINS[1], interclass_filtering_threshold=bad)


@pytest.mark.parametrize("blocks_stored", [1, 3])  # the first block only, then three (all of them on a CPU)
@pytest.mark.parametrize("margin", [MARGINS[1], MARGINS[2]], ids=repr)
def test_stored_numerators_match_float64_reference(monkeypatch, margin, blocks_stored):
    """The torch backend with a memory budget: the first blocks' softmax numerators come from the
    forward, the rest are recomputed; both against float64, with and without sampling."""
    monkeypatch.setattr(fastpfc.softmax_blocks, "_BLOCK_ELEMENTS", 37 * 29)  # blocks of 29 classes
    monkeypatch.setattr(fastpfc.softmax_blocks, "_MIN_CHUNK", 1)
    for num_sampled in (None, 45):
        p = make_problem(batch=37, num_classes=83, dim=40, num_sampled=num_sampled, seed=12)
        x_unit = torch.nn.functional.normalize(p["x"].float())
        # On a GPU blocks are at most an eighth of [B, C]: narrower than 29 classes here.
        starts, width = fastpfc.softmax_blocks.chunk_bounds(37, 83 if p["index"] is None else len(p["index"]),
                                                            x_unit.device)
        budget = blocks_stored * 37 * width * 4  # fp32 numerators
        target_pos = p["labels"] if p["index"] is None else torch.searchsorted(p["index"], p["labels"])
        _, saved = fastpfc.torch_backend.forward_lse(
            x_unit, p["w"].float(), p["index"], x_unit.new_ones(37), target_pos, x_unit.new_zeros(37), 1.0, budget,
            None)
        assert len(saved) == 2 * min(blocks_stored, len(starts)) and len(starts) > 1
        _loss_and_grads_against_float64(p, margin, backend="torch", memory_budget=budget)


def test_stored_numerators_gradcheck(monkeypatch):
    monkeypatch.setattr(fastpfc.softmax_blocks, "_BLOCK_ELEMENTS", 12)
    monkeypatch.setattr(fastpfc.softmax_blocks, "_MIN_CHUNK", 1)
    p = make_problem(batch=5, num_classes=11, dim=6, num_sampled=4, seed=13, device=torch.device("cpu"))
    inputs = (p["x"].requires_grad_(), p["w"].requires_grad_())
    margin = CombinedMargin(s=2.0, m1=1.3, m2=0.2, m3=0.1)
    assert torch.autograd.gradcheck(  # blocks of 2 classes, the first 2 of them stored (fp64)
        lambda x, w: partial_fc_loss(x, w, p["labels"], margin, p["index"], backend="torch",
                                     memory_budget=2 * 5 * 2 * 8), inputs)


@pytest.mark.parametrize("stored_tiles", [2, 6])  # of the 16-column tiles: some, then all of them
def test_triton_stored_numerators_match_float64_reference(monkeypatch, stored_tiles):
    """The Triton forward keeps the numerators of the first columns (in several 16-column blocks
    for the PyTorch side); the kernels recompute the rest. Deterministic run to run."""
    from fastpfc import triton_backend
    from fastpfc.kernels import TileConfig
    monkeypatch.setattr(triton_backend, "default_config", lambda *args: TileConfig(**SMALL_TILES))
    monkeypatch.setattr(fastpfc.softmax_blocks, "_BLOCK_ELEMENTS", 37 * 20)  # 16-column blocks of numerators
    monkeypatch.setattr(fastpfc.softmax_blocks, "_MIN_CHUNK", 1)
    budget = stored_tiles * 37 * (16 * 4 + 4)  # fp32 numerators and one tile maximum per row and tile
    for margin, num_sampled in ((MARGINS[1], None), (MARGINS[2], 45)):
        p = make_problem(batch=37, num_classes=83, dim=40, num_sampled=num_sampled, seed=14)
        first = _loss_and_grads_against_float64(p, margin, backend="triton", memory_budget=budget)
        again = _loss_and_grads_against_float64(p, margin, backend="triton", memory_budget=budget)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("budget", [0, 1 << 20], ids=["lean", "stored"])
def test_cosines_at_both_ends_of_their_range(backend, budget):
    """Cosines of exactly +-1 and rows whose every logit sits at -s (every center nearly the same
    direction d, embeddings +-d): the stored numerators' per-tile offset and the recompute stay
    within the fp32 reference's own error against float64 (the problem is ill-conditioned: the
    embedding gradients nearly cancel), with a margin that puts the target 96 below the others'
    -s. (Margins whose gradient blows up near theta = 0 amplify the fp32 rounding of the target
    cosine, which every backend shares; that is the margins' business, not this test's.)"""
    gen = torch.Generator().manual_seed(15)
    batch, num_classes, dim = 37, 83, 40
    d = torch.randn(dim, generator=gen, dtype=torch.float64)
    w = d + 1e-2 * torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    w[:5] = -d  # exactly anti-aligned centers
    w[5:10] = torch.randn(5, dim, generator=gen, dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64).repeat(13)[:batch, None]
    x = sign * d * 3.0 + 1e-3 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    x[::4] = w[torch.arange(0, batch, 4) % 10]  # exactly aligned with a center: cos = 1
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    p = {"x": x.to(DEVICE), "w": w.to(DEVICE), "labels": labels.to(DEVICE), "index": None}
    for margin in (CosFace(s=64.0, m=0.4), CosFace(s=64.0, m=1.5)):
        def run(x, w, fn, margin=margin, **options):
            return fn(x, w, p["labels"], margin, reduction="none", **options)

        exact = loss_and_grads(lambda x, w: run(x, w, reference_partial_fc_loss), p["x"], p["w"])
        fp32 = loss_and_grads(lambda x, w: run(x, w, reference_partial_fc_loss), p["x"].float(), p["w"].float())
        ours = loss_and_grads(lambda x, w: run(x, w, partial_fc_loss, backend=backend, memory_budget=budget),
                              p["x"].float(), p["w"].float())
        for name, o, r, e in zip(("loss", "grad_x", "grad_w"), ours, fp32, exact, strict=True):
            assert torch.isfinite(o).all(), name
            assert max_rel_error(o, e) <= 1.5 * max_rel_error(r, e) + 2e-5, name
