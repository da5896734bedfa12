"""No [B, C]-sized buffer: peak memory at shapes where one such buffer would dominate."""

import sys

import pytest
import torch

from fastpfc import CosFace, partial_fc_loss, reference_partial_fc_loss
from fastpfc.kernels import TileConfig
from fastpfc.profiling import peak_memory

from helpers import DEVICE

pytestmark = pytest.mark.skipif(DEVICE.type == "cpu" and not sys.platform.startswith("linux"),
                                reason="CPU peak memory is read from /proc")


def _train_step_peak(loss_fn, batch, num_classes, dim):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(num_classes, dim, generator=gen).to(DEVICE).requires_grad_()
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(DEVICE)
    warm_w = w[:64].detach().requires_grad_()  # a warm-up on few classes: first-use caches are not the loss's
    loss_fn(x[:2], warm_w, labels[:2] % 64, CosFace()).backward()

    def step():
        loss_fn(x, w, labels, CosFace()).backward()

    return peak_memory(step, DEVICE)[1]


@pytest.mark.parametrize("backend, batch, num_classes", [("torch", 256, 100_000), ("triton", 256, 100_000)])
def test_peak_memory_is_far_below_one_logits_matrix(backend, batch, num_classes, monkeypatch):
    if backend == "triton" and DEVICE.type == "cpu":  # big tiles: fewer interpreter steps (at most 0.1 of B * C)
        from fastpfc import triton_backend
        config = TileConfig(block_b=256, block_c=1024, block_d=16, num_splits=4)
        monkeypatch.setattr(triton_backend, "default_config", lambda *args: config)
    dim = 8  # small D: the weight and its gradient (C * D) stay small next to B * C
    logits_bytes = batch * num_classes * 4
    reference = _train_step_peak(reference_partial_fc_loss, batch, num_classes, dim)
    ours = _train_step_peak(lambda *a: partial_fc_loss(*a, backend=backend), batch, num_classes, dim)
    assert reference > 2 * logits_bytes, "the measurement should see the reference's [B, C] buffers"
    assert ours < 0.3 * logits_bytes, f"{ours / 2**20:.1f} MiB vs one [B, C] buffer of {logits_bytes / 2**20:.1f} MiB"


def test_torch_backend_keeps_within_its_memory_budget():
    """With a budget of half a [B, C] buffer, the torch backend stores about that much for the
    backward (the numerators of whole class blocks), and no more."""
    batch, num_classes, dim = 256, 100_000, 8
    logits_bytes = batch * num_classes * 4
    budget = logits_bytes // 2
    lean = _train_step_peak(lambda *a: partial_fc_loss(*a, backend="torch"), batch, num_classes, dim)
    stored = _train_step_peak(lambda *a: partial_fc_loss(*a, backend="torch", memory_budget=budget), batch,
                              num_classes, dim)
    assert 0.8 * budget < stored - lean < budget + 0.1 * logits_bytes, (lean, stored, budget)
