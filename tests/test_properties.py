"""Seeded property test: random problems over sizes, strides, dtypes, label dtypes, margins,
sampling and reductions, each against the float64 reference (the fuzz cases of the hardening
issue, kept as a regression test). Every case is reproducible from its seed."""

from __future__ import annotations

import functools
import random

import pytest
import torch

from fastpfc import ArcFace, CombinedMargin, CosFace, Softmax, partial_fc_loss, reference_partial_fc_loss

from helpers import max_rel_error

LABEL_DTYPES = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]


def _margin(rng: random.Random):
    s = rng.choice([8.0, 16.0, 30.0, 64.0])
    return rng.choice([
        CosFace(s=s, m=rng.uniform(0.0, 0.5)),
        ArcFace(s=s, m=rng.uniform(0.0, 0.8), straight_through=rng.random() < 0.3),
        CombinedMargin(s=s, m1=rng.uniform(1.0, 2.0), m2=rng.uniform(0.0, 0.5), m3=rng.uniform(0.0, 0.3)),
        Softmax(s=s),
    ])


def _case(seed: int, backend: str):
    """One random problem: inputs in float64 (cast by the caller), labels of a random integer
    dtype that can hold them, embeddings possibly non-contiguous, and the call's options."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batch, dim = rng.randint(1, 37), rng.randint(2, 70)  # D = 1: every cosine is +-1, the x gradient exactly 0
    num_classes = rng.randint(1, 127) if backend == "torch" else rng.randint(1, 90)
    label_dtype = rng.choice([d for d in LABEL_DTYPES if torch.iinfo(d).max >= num_classes - 1])
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64) * 10 ** rng.uniform(-3, 3)
    if rng.random() < 0.4:  # a column-strided view: rows not contiguous in memory
        x = torch.randn(batch, 2 * dim, generator=gen, dtype=torch.float64)[:, ::2] * 10 ** rng.uniform(-3, 3)
    w = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64) * 10 ** rng.uniform(-3, 1)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    index = None
    if rng.random() < 0.5:
        extra = torch.randperm(num_classes, generator=gen)[: rng.randint(0, num_classes)]
        index = torch.unique(torch.cat([labels, extra]))
    options = {"reduction": rng.choice(["mean", "sum", "none"]),
               "interclass_filtering_threshold": rng.choice([0.0, 0.0, 0.3])}
    return x, w, labels.to(label_dtype), index, _margin(rng), options


def _loss_and_grads(fn, x, w):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = fn(x, w)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    grad_x, grad_w = torch.autograd.grad((out * weights).sum(), (x, w))
    return out.detach(), grad_x, grad_w


@pytest.mark.parametrize("backend, dtype, seeds, tolerance", [
    ("torch", torch.float64, range(0, 60), 1e-9),
    ("torch", torch.float32, range(100, 130), 2e-4),
    ("triton", torch.float32, range(200, 210), 2e-4),
])
def test_random_problems_match_the_float64_reference(backend, dtype, seeds, tolerance):
    for seed in seeds:
        x, w, labels, index, margin, options = _case(seed, backend)
        expected = _loss_and_grads(functools.partial(
            reference_partial_fc_loss, labels=labels.long(), margin=margin, index=index, **options), x, w)
        actual = _loss_and_grads(functools.partial(
            partial_fc_loss, labels=labels, margin=margin, index=index, backend=backend, **options),
            x.to(dtype), w.to(dtype))
        for name, a, e in zip(("loss", "grad_x", "grad_w"), actual, expected, strict=True):
            assert torch.isfinite(a).all(), (seed, name)
            assert max_rel_error(a, e) < tolerance, (seed, name, margin, options, tuple(x.shape), w.shape[0])
