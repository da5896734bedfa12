"""Problem generators and comparison helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_problem(batch: int, num_classes: int, dim: int, num_sampled: int | None = None, seed: int = 0,
                 device: torch.device = DEVICE) -> dict[str, torch.Tensor | None]:
    """Fresh random float64 embeddings/centers, labels, and (optionally) a sorted sample index.

    Centers get a spread of norms (never all equal) so the normalization backward is exercised.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64) * 3.0
    w = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    w *= torch.rand(num_classes, 1, generator=gen, dtype=torch.float64) + 0.5
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    index = None
    if num_sampled is not None:
        extra = torch.randperm(num_classes, generator=gen)[:num_sampled]
        index = torch.unique(torch.cat([labels, extra]))
    return {name: None if t is None else t.to(device)
            for name, t in {"x": x, "w": w, "labels": labels, "index": index}.items()}


def loss_and_grads(fn, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``fn(x, w)`` reduced to a scalar by a fixed random weighting, and its gradients."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    out = fn(x, w)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    total = (out * weights).sum()
    grad_x, grad_w = torch.autograd.grad(total, (x, w))
    return out.detach(), grad_x, grad_w


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute error, relative to the largest magnitude of ``expected``."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


#: What a gloo rank sometimes prints when it aborts in process teardown, after its work is done
#: (a gloo thread still joinable at exit; upstream, see pytorch/pytorch#179291).
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def torchrun(script: str, *args: str, nproc: int = 2, cwd=None, attempts: int = 3) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc script args`` on CPU (gloo). A launch that
    failed only by the known teardown abort is run again (``attempts`` in all); any other failure
    is returned as it is."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               script, *args]
    for _ in range(attempts):
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
        if done.returncode == 0 or GLOO_TEARDOWN_ABORT not in done.stderr:
            return done
    return done


def flipped_copies(data: bytes, count: int, seed: int):
    """``count`` copies of ``data``, each with one bit flipped at a seeded place: ``(position, copy)``."""
    import random

    rng = random.Random(seed)
    for _ in range(count):
        damaged = bytearray(data)
        position = rng.randrange(len(damaged))
        damaged[position] ^= 1 << rng.randrange(8)
        yield position, bytes(damaged)


def load_flipped(original: bytes, folder, suffix: str, load, refusal: type, count: int, seed: int):
    """Write each of :func:`flipped_copies` to ``folder`` and ``load`` it: ``(position, loaded)``,
    with ``loaded`` ``None`` where ``load`` refused the file with a ``refusal`` error."""
    for trial, (position, damaged) in enumerate(flipped_copies(original, count, seed)):
        path = folder / f"damaged{trial}{suffix}"
        path.write_bytes(damaged)
        try:
            yield position, load(path)
        except refusal:
            yield position, None
