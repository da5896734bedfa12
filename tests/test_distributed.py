"""Sharded PartialFC with 2 and 3 gloo processes equals one process on the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import fastpfc.distributed as fd
from fastpfc import PartialFCLoss, partial_fc_loss, reference_partial_fc_loss
from fastpfc.optim import SparseAdamW

from dist_worker import BATCH_SIZES, DIM, FILTER, MARGIN, NUM_CLASSES, problem, run
from helpers import max_rel_error, torchrun

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=[2, 3])
def outcome(request, tmp_path_factory):
    """Spawn the workers once per world size; return (world_size, per-rank results)."""
    world_size = request.param
    tmp = tmp_path_factory.mktemp(f"world{world_size}")
    mp.spawn(run, args=(world_size, str(tmp / "rendezvous"), str(tmp)), nprocs=world_size)
    return world_size, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def test_shard_bounds_cover_classes_once():
    for num_classes, world_size in [(53, 2), (53, 3), (10, 10), (1_300_000, 7)]:
        bounds = [fd.shard_bounds(num_classes, world_size, r) for r in range(world_size)]
        sizes = [stop - start for start, stop in bounds]
        assert bounds[0][0] == 0 and bounds[-1][1] == num_classes
        assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world_size - 1))
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match="at least the world size"):
        fd.shard_bounds(2, 3, 0)


def _single_process(p, backend, dtype, fixed_sample, reduction, filter_threshold=0.0):
    x = p["x"].to(dtype, copy=True).requires_grad_()  # fresh leaves: calls must not share gradients
    w = p["w"].to(dtype, copy=True).requires_grad_()
    loss = partial_fc_loss(x, w, p["labels"], MARGIN, p["index"] if fixed_sample else None,
                           reduction=reduction, backend=backend, interclass_filtering_threshold=filter_threshold)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * weights).sum().backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("backend, dtype, tolerance",
                         [("torch", torch.float64, 1e-10), ("triton", torch.float32, 2e-5)])
@pytest.mark.parametrize("fixed_sample", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sharded_equals_single_process(outcome, backend, dtype, tolerance, fixed_sample, reduction):
    world_size, ranks = outcome
    p = problem(world_size)
    loss, grad_x, grad_w = _single_process(p, backend, dtype, fixed_sample, reduction)
    key = f"{backend}-{'fixed' if fixed_sample else 'full'}-{reduction}"
    for rank in ranks:
        assert max_rel_error(rank[key]["loss"], loss) < tolerance  # every rank holds the global loss
    # Embedding gradients come home scaled by the world size (DDP will average them back).
    gathered_x = torch.cat([rank[key]["grad_x"] for rank in ranks]) / world_size
    assert max_rel_error(gathered_x, grad_x) < tolerance
    assert max_rel_error(torch.cat([rank[key]["grad_w"] for rank in ranks]), grad_w) < tolerance


def test_interclass_filtering_sharded_equals_single_process(outcome):
    world_size, ranks = outcome
    p = problem(world_size)
    loss, grad_x, grad_w = _single_process(p, "torch", torch.float64, True, "mean", FILTER)
    plain = _single_process(p, "torch", torch.float64, True, "mean")[0]
    assert max_rel_error(plain, loss) > 1e-3  # the filter acts on this problem
    for rank in ranks:
        assert max_rel_error(rank["filtered"]["loss"], loss) < 1e-10
    assert max_rel_error(torch.cat([rank["filtered"]["grad_x"] for rank in ranks]) / world_size, grad_x) < 1e-10
    assert max_rel_error(torch.cat([rank["filtered"]["grad_w"] for rank in ranks]), grad_w) < 1e-10


def test_all_ranks_empty(outcome):
    _, ranks = outcome
    for rank in ranks:
        assert rank["all_empty"]["loss"] == 0 and torch.all(rank["all_empty"]["grad_w"] == 0)


def test_combined_lse_matches_float64_reference(outcome):
    """The per-rank partial LSEs combined across ranks give the unsharded float64 loss."""
    world_size, ranks = outcome
    p = problem(world_size)
    expected = reference_partial_fc_loss(p["x"], p["w"], p["labels"], MARGIN, reduction="none")
    assert max_rel_error(ranks[0]["torch-full-none"]["loss"], expected) < 1e-12


def test_module_is_world_size_independent(outcome):
    world_size, ranks = outcome
    p = problem(world_size)
    single = PartialFCLoss(DIM, NUM_CLASSES, margin=MARGIN, seed=7)
    assert torch.equal(torch.cat([rank["module"]["weight"] for rank in ranks]), single.weight.detach())
    x = p["x"].float().requires_grad_()
    loss = single(x, p["labels"])
    loss.backward()
    assert max_rel_error(ranks[0]["module"]["loss"], loss) < 1e-5
    assert max_rel_error(torch.cat([rank["module"]["grad_x"] for rank in ranks]) / world_size, x.grad) < 1e-5
    assert max_rel_error(torch.cat([rank["module"]["grad_w"] for rank in ranks]), single.weight.grad) < 1e-5


def test_sampling_per_rank(outcome):
    world_size, ranks = outcome
    p = problem(world_size)
    union = []
    for r, rank in enumerate(ranks):
        start, stop = fd.shard_bounds(NUM_CLASSES, world_size, r)
        rows = rank["sampled"]["rows"]
        positives = torch.unique(p["labels"][(p["labels"] >= start) & (p["labels"] < stop)]) - start
        assert torch.isin(positives, rows).all(), "a positive was dropped on its owner rank"
        assert rows.numel() == max(int(0.3 * (stop - start)), positives.numel())
        union.append(rows + start)
    seeds = {rank["sampled"]["seed"] for rank in ranks}
    assert len(seeds) == world_size, "ranks must draw from distinct streams"
    # The sharded sampled loss is the single-process loss over the union of the ranks' samples.
    single = PartialFCLoss(DIM, NUM_CLASSES, margin=MARGIN, seed=7)
    expected = partial_fc_loss(p["x"].float(), single.weight, p["labels"], MARGIN, torch.cat(union))
    for rank in ranks:
        assert max_rel_error(rank["sampled"]["loss"], expected) < 1e-5


def test_state_dict_of_another_rank_is_refused(outcome):
    _, ranks = outcome
    for rank in ranks:
        assert "load a world-size-independent checkpoint" in rank["wrong_rank_load"]
        assert rank["weight_kept"]


def test_bad_input_on_one_rank_raises_everywhere(outcome):
    _, ranks = outcome
    assert ranks[1]["bad_input"].startswith("ValueError: embeddings contain NaN")
    for r in (0, *range(2, len(ranks))):
        assert ranks[r]["bad_input"] == ("RuntimeError: rank(s) [1] rejected their inputs (see the error raised "
                                         "there); no rank computed the loss")


def test_an_exception_of_any_type_in_one_ranks_check_reaches_every_rank(outcome):
    _, ranks = outcome
    assert ranks[1]["odd_error"] == "NotImplementedError: labels of an unsupported kind"
    for rank in ranks[:1] + ranks[2:]:
        assert rank["odd_error"].startswith("RuntimeError: rank(s) [1] rejected their inputs")


def test_ranks_that_differ_in_dtype_or_margin_all_raise_naming_it(outcome):
    world_size, ranks = outcome
    for rank in ranks:
        assert "embeddings' dtype: rank 0 torch.float32, rank 1 torch.float16" in rank["differ_dtype"]
        assert "margin: rank 0 ArcFace(s=16.0" in rank["differ_margin"]
        assert "rank 1 ArcFace(s=32.0" in rank["differ_margin"]


def test_ranks_may_differ_on_requires_grad(outcome):
    world_size, ranks = outcome
    p = problem(world_size)
    single = PartialFCLoss(DIM, NUM_CLASSES, margin=MARGIN, seed=7)
    x = p["x"].float().requires_grad_()
    single(x, p["labels"]).backward()
    sizes = BATCH_SIZES[world_size]
    for r, (rank, expected) in enumerate(zip(ranks, x.grad.split(sizes), strict=True)):
        if r == 1:
            assert rank["mixed_grad"]["grad_x"] is None
        elif expected.numel() > 0:
            assert max_rel_error(rank["mixed_grad"]["grad_x"] / world_size, expected) < 1e-5


def test_checkpoint_reshards(outcome):
    world_size, ranks = outcome
    p = problem(world_size)
    single = PartialFCLoss(DIM, NUM_CLASSES, margin=MARGIN, seed=7)
    for rank in ranks:  # N shards gathered into the full centers, on every rank
        assert torch.equal(rank["full_state"], single.weight.detach())
    loaded = torch.cat([rank["loaded_shard"] for rank in ranks])  # a full state loaded into N ranks
    assert torch.equal(loaded, p["full_state"])


def test_sparse_optimizer_on_shards_trains_like_one_process_and_reshards(outcome):
    """Two SparseAdamW steps on N shards equal them in one process (weights and the gathered
    optimizer state); a full optimizer state loads into N ranks as their row slices."""
    world_size, ranks = outcome
    p = problem(world_size)
    single = PartialFCLoss(DIM, NUM_CLASSES, margin=MARGIN, seed=7, sparse_grad=True).double()
    optimizer = SparseAdamW(single.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        single(p["x"], p["labels"]).backward()
        optimizer.step()
    state = optimizer.state[single.weight]
    for rank in ranks:
        trained = rank["sparse_trained"]
        assert max_rel_error(trained["weight"], single.weight) < 1e-12
        gathered = trained["optimizer"]["state"][0]
        assert torch.equal(gathered["row_step"], state["row_step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert max_rel_error(gathered[key], state[key]) < 1e-12, key
    full = p["full_optimizer_state"]["state"][0]
    for key, value in full.items():
        loaded = torch.cat([rank["sparse_loaded"][key] for rank in ranks])
        assert torch.equal(loaded, value.to(loaded.dtype)), key
    assert all(rank["sparse_loaded"]["row_step"].dtype == torch.int32 for rank in ranks)


def test_torchrun_demo_matches_single_process(tmp_path):
    """The README's torchrun example: 2 ranks under DDP + sharded loss train like one process."""
    script = REPO / "examples" / "distributed_demo.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    multi = torchrun(str(script), cwd=tmp_path)
    for completed in (single, multi):
        assert completed.returncode == 0, completed.stderr[-3000:]
    single_losses = [float(line.split()[-1]) for line in single.stdout.splitlines() if line.startswith("step")]
    multi_losses = [float(line.split()[-1]) for line in multi.stdout.splitlines() if line.startswith("step")]
    assert len(single_losses) == len(multi_losses) == 5
    for a, b in zip(single_losses, multi_losses, strict=True):
        assert abs(a - b) < 1e-4 * abs(a), (single_losses, multi_losses)
    assert single_losses[-1] < single_losses[0]

