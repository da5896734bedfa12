"""Row-sparse gradients and the row-sparse center optimizers (``fastpfc.optim``).

References are float64: ``torch.optim.SGD`` / ``AdamW`` themselves, stepped per row on the rows a
step sampled (the lazy semantics, spelled out with torch's own optimizers).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastpfc import CosFace, PartialFCLoss, partial_fc_loss
from fastpfc.optim import SparseAdamW, SparseSGD
from fastpfc.profiling import peak_memory

from helpers import DEVICE, make_problem, max_rel_error

OPTIMIZERS = {
    "sgd": (SparseSGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
    "nesterov": (SparseSGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "weight_decay": 1e-2, "nesterov": True}),
    "plain-sgd": (SparseSGD, torch.optim.SGD, {"lr": 0.3}),
    "adamw": (SparseAdamW, torch.optim.AdamW, {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.1}),
}


def _batch(step: int, batch: int, num_classes: int, dim: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(batch, dim, generator=gen, dtype=dtype).to(DEVICE),
            torch.randint(0, num_classes, (batch,), generator=gen).to(DEVICE))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sparse_gradient_holds_the_sampled_rows_of_the_dense_one(backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    p = make_problem(9, 70, 19, num_sampled=23, seed=3)
    x, w = p["x"].to(dtype), p["w"].to(dtype)
    grads = {}
    for sparse in (False, True):
        weight = w.clone().requires_grad_()
        partial_fc_loss(x, weight, p["labels"], CosFace(), p["index"], backend=backend, sparse_grad=sparse).backward()
        grads[sparse] = weight.grad
    sparse = grads[True]
    assert sparse.is_sparse and sparse._nnz() == p["index"].numel()
    assert torch.equal(sparse._indices()[0], p["index"])
    reference = p["w"].clone().requires_grad_()
    partial_fc_loss(p["x"], reference, p["labels"], CosFace(), p["index"], backend="torch").backward()
    assert max_rel_error(sparse.to_dense(), reference.grad) < (1e-12 if dtype == torch.float64 else 1e-5)
    assert torch.equal(sparse.to_dense(), grads[False])  # the same rows, written the same way


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_with_every_row_sampled_it_is_the_torch_optimizer(name):
    ours_cls, torch_cls, kwargs = OPTIMIZERS[name]
    ours = PartialFCLoss(11, 40, seed=5, sparse_grad=True, backend="torch").double().to(DEVICE)
    dense = copy.deepcopy(ours)
    dense.sparse_grad = False
    optimizers = [(ours, ours_cls(ours.parameters(), **kwargs, fused=False)),
                  (dense, torch_cls(dense.parameters(), **kwargs))]
    for step in range(5):
        x, labels = _batch(step, 13, 40, 11)
        for loss_fn, optimizer in optimizers:
            optimizer.zero_grad()
            loss_fn(x, labels).backward()
            optimizer.step()
    assert max_rel_error(ours.weight, dense.weight) < 1e-13


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_only_sampled_rows_move_and_each_follows_its_own_torch_optimizer(name):
    """Five steps at sample rate 0.25: every row equals a torch optimizer of that row alone, stepped
    in the steps that sampled it; rows not sampled keep weight and state bitwise."""
    ours_cls, torch_cls, kwargs = OPTIMIZERS[name]
    num_classes, dim = 37, 13
    loss_fn = PartialFCLoss(dim, num_classes, sample_rate=0.25, seed=2, sparse_grad=True, backend="torch")
    loss_fn = loss_fn.double().to(DEVICE)
    optimizer = ours_cls(loss_fn.parameters(), **kwargs, fused=False)
    rows = [torch.nn.Parameter(r.clone()) for r in loss_fn.weight.detach()]
    row_optimizers = [torch_cls([r], **kwargs) for r in rows]
    for step in range(5):
        x, labels = _batch(step, 6, num_classes, dim)
        before = loss_fn.weight.detach().clone()
        state_before = {k: v.clone() for k, v in optimizer.state[loss_fn.weight].items()}
        optimizer.zero_grad()
        loss_fn(x, labels).backward()
        grad = loss_fn.weight.grad.coalesce()
        sampled = grad.indices()[0]
        optimizer.step()
        for i, row in enumerate(sampled.tolist()):
            rows[row].grad = grad.values()[i].clone()
            row_optimizers[row].step()
        untouched = torch.ones(num_classes, dtype=torch.bool, device=DEVICE)
        untouched[sampled] = False
        assert 0 < sampled.numel() < num_classes
        assert torch.equal(loss_fn.weight.detach()[untouched], before[untouched])
        for key, value in state_before.items():
            assert torch.equal(optimizer.state[loss_fn.weight][key][untouched], value[untouched]), key
    expected = torch.stack([r.detach() for r in rows])
    assert max_rel_error(loss_fn.weight, expected) < 1e-13


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_triton_kernel_matches_the_float64_update(name):
    """The fused kernel (fp32) against the torch path in float64, on ragged sizes, over steps that
    sample different rows; rows not listed stay bitwise as they were."""
    ours_cls, _, kwargs = OPTIMIZERS[name]
    num_rows, dim = 53, 37
    gen = torch.Generator().manual_seed(7)
    start = torch.randn(num_rows, dim, generator=gen, dtype=torch.float64)
    fused = torch.nn.Parameter(start.float().to(DEVICE))
    exact = torch.nn.Parameter(start.clone().to(DEVICE))
    fused_opt = ours_cls([fused], **kwargs, fused=True)
    exact_opt = ours_cls([exact], **kwargs, fused=False)
    for step in range(4):
        rows = torch.randperm(num_rows, generator=gen)[:19].sort().values.to(DEVICE)
        values = torch.randn(19, dim, generator=gen, dtype=torch.float64).to(DEVICE) * (step + 1)
        before = fused.detach().clone()
        exact.grad = torch.sparse_coo_tensor(rows[None], values, exact.shape, check_invariants=True)
        fused.grad = torch.sparse_coo_tensor(rows[None], values.float(), fused.shape, check_invariants=True)
        exact_opt.step()
        fused_opt.step()
        untouched = torch.ones(num_rows, dtype=torch.bool, device=DEVICE)
        untouched[rows] = False
        assert torch.equal(fused.detach()[untouched], before[untouched])
    assert max_rel_error(fused, exact) < 1e-5
    for key, value in exact_opt.state[exact].items():
        assert max_rel_error(fused_opt.state[fused][key], value) < 1e-5, key


def test_the_schedulers_learning_rate_reaches_the_update():
    loss_fn = PartialFCLoss(8, 30, sample_rate=0.3, seed=0, sparse_grad=True).double().to(DEVICE)
    optimizer = SparseSGD(loss_fn.parameters(), lr=0.2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    for step in range(3):
        x, labels = _batch(step, 5, 30, 8)
        optimizer.zero_grad()
        loss_fn(x, labels).backward()
        grad = loss_fn.weight.grad.coalesce()
        rows = grad.indices()[0]
        before = loss_fn.weight.detach()[rows].clone()
        optimizer.step()
        scheduler.step()
        expected = before - 0.2 * 0.5 ** step * grad.values()
        assert max_rel_error(loss_fn.weight.detach()[rows], expected) < 1e-14


def test_grad_scaler_unscales_and_skips_a_step_with_inf():
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0 ** 12)
    loss_fn = PartialFCLoss(8, 30, sample_rate=0.5, seed=0, sparse_grad=True).to(DEVICE)
    reference = copy.deepcopy(loss_fn)
    optimizer = SparseSGD(loss_fn.parameters(), lr=0.1, momentum=0.9)
    reference_optimizer = SparseSGD(reference.parameters(), lr=0.1, momentum=0.9)
    x, labels = _batch(0, 6, 30, 8, torch.float32)
    scaler.scale(loss_fn(x, labels)).backward()
    scaler.step(optimizer)
    scaler.update()
    reference(x, labels).backward()
    reference_optimizer.step()
    assert max_rel_error(loss_fn.weight, reference.weight) < 1e-6
    before = loss_fn.weight.detach().clone()
    optimizer.zero_grad()
    scaler.scale(loss_fn(x, labels)).backward()
    loss_fn.weight.grad._values()[0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(loss_fn.weight.detach(), before)
    assert scaler.get_scale() == 2.0 ** 11


def test_under_bf16_autocast_the_center_gradient_is_fp32_rows_of_the_dense_one():
    backbone = torch.nn.Linear(12, 8).to(DEVICE)
    images = torch.randn(6, 12, device=DEVICE)
    labels = torch.randint(0, 30, (6,), device=DEVICE)
    grads = {}
    for sparse in (False, True):
        loss_fn = PartialFCLoss(8, 30, sample_rate=0.3, seed=3, sparse_grad=sparse).to(DEVICE)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            embeddings = backbone(images)
            assert embeddings.dtype == torch.bfloat16
            loss = loss_fn(embeddings, labels)
        loss.backward()
        grads[sparse] = loss_fn.weight.grad
    assert grads[True].is_sparse and grads[True].dtype == torch.float32
    assert torch.equal(grads[True].to_dense(), grads[False])


def test_accumulated_gradients_are_summed_per_row():
    loss_fn = PartialFCLoss(8, 30, sample_rate=0.3, seed=1, sparse_grad=True).double().to(DEVICE)
    dense = copy.deepcopy(loss_fn)
    dense.sparse_grad = False
    optimizer = SparseSGD(loss_fn.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):  # two micro-batches, each with its own sample
        x, labels = _batch(step, 5, 30, 8)
        loss_fn(x, labels).backward()
        dense(x, labels).backward()
    sampled = loss_fn.weight.grad.coalesce().indices()[0]
    before = loss_fn.weight.detach().clone()
    optimizer.step()
    expected = before[sampled] - 0.1 * dense.weight.grad[sampled]
    assert max_rel_error(loss_fn.weight.detach()[sampled], expected) < 1e-14


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_state_dict_round_trip_resumes_bitwise(name):
    ours_cls, _, kwargs = OPTIMIZERS[name]

    def run(loss_fn, optimizer, steps):
        for step in steps:
            x, labels = _batch(step, 6, 30, 8, torch.float32)
            optimizer.zero_grad()
            loss_fn(x, labels).backward()
            optimizer.step()

    loss_fn = PartialFCLoss(8, 30, sample_rate=0.3, seed=4, sparse_grad=True).to(DEVICE)
    optimizer = ours_cls(loss_fn.parameters(), **kwargs)
    run(loss_fn, optimizer, range(3))
    saved = copy.deepcopy((loss_fn.state_dict(), optimizer.state_dict()))
    run(loss_fn, optimizer, range(3, 6))
    resumed = PartialFCLoss(8, 30, sample_rate=0.3, seed=99, sparse_grad=True).to(DEVICE)
    resumed_optimizer = ours_cls(resumed.parameters(), **kwargs)
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    if name == "adamw":
        assert resumed_optimizer.state[resumed.weight]["row_step"].dtype == torch.int32
    run(resumed, resumed_optimizer, range(3, 6))
    assert torch.equal(resumed.weight, loss_fn.weight)
    for key, value in optimizer.state[loss_fn.weight].items():
        assert torch.equal(resumed_optimizer.state[resumed.weight][key], value), key


def test_an_empty_batch_gives_an_empty_sparse_gradient():
    loss_fn = PartialFCLoss(8, 30, sample_rate=0.3, seed=1, sparse_grad=True).to(DEVICE)
    optimizer = SparseAdamW(loss_fn.parameters(), lr=0.1)
    before = loss_fn.weight.detach().clone()
    loss_fn(torch.randn(0, 8, device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE)).backward()
    assert loss_fn.weight.grad.is_sparse and loss_fn.weight.grad._nnz() == 0
    optimizer.step()
    assert torch.equal(loss_fn.weight.detach(), before)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rows of \\[N, D\\] parameters"):
        SparseSGD([torch.nn.Parameter(torch.randn(5))], lr=0.1)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        SparseSGD([torch.nn.Parameter(torch.randn(5, 2))], lr=float("nan"))
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        SparseAdamW([torch.nn.Parameter(torch.randn(5, 2))], weight_decay=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        SparseSGD([torch.nn.Parameter(torch.randn(5, 2))], lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="nesterov"):
        SparseSGD([torch.nn.Parameter(torch.randn(5, 2))], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        SparseAdamW([torch.nn.Parameter(torch.randn(5, 2))], betas=(0.9, 1.0))
    wide = torch.nn.Parameter(torch.randn(5, 2, dtype=torch.float64, device=DEVICE))
    wide.grad = torch.randn(5, 2, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="fused=True updates fp32/fp16/bf16"):
        SparseAdamW([wide], fused=True).step()
    param = torch.nn.Parameter(torch.randn(5, 2))
    param.grad = torch.randn(5, 2).to_sparse()  # element-sparse, not row-sparse
    with pytest.raises(ValueError, match="whole rows"):
        SparseSGD([param], lr=0.1).step()


def _largest_allocation(fn) -> int:
    """Bytes of the largest buffer any op allocates during ``fn()`` (the allocator's records, not
    the resident size, which reuses pages freed by earlier tests)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(max(event.cpu_memory_usage, 0) for event in prof.events())


def test_no_dense_gradient_is_allocated():
    """A training step at sample rate 0.01 over 300k classes: with the sparse gradient no op
    allocates anything near one [C, D] buffer; the dense path allocates its gradient. On CUDA the
    step's peak memory is compared instead."""
    num_classes, dim = 300_000, 64
    weight_bytes = num_classes * dim * 4
    largest = {}
    for sparse in (False, True):
        loss_fn = PartialFCLoss(dim, num_classes, sample_rate=0.01, seed=0, sparse_grad=sparse).to(DEVICE)
        optimizer = (SparseSGD if sparse else torch.optim.SGD)(loss_fn.parameters(), lr=0.1, momentum=0.9)

        def step(loss_fn=loss_fn, optimizer=optimizer):
            x, labels = _batch(0, 16, num_classes, dim, torch.float32)
            loss_fn(x, labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # the momentum buffer is allocated here, in both
        largest[sparse] = peak_memory(step, DEVICE)[1] if DEVICE.type == "cuda" else _largest_allocation(step)
    assert largest[True] < 0.1 * weight_bytes, largest
    assert largest[False] > 0.9 * weight_bytes, largest  # the dense gradient
