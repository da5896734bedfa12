"""GPU-only checks of the compiled kernels with their default tiles (skipped without CUDA)."""

import pytest
import torch

from fastpfc import ArcFace, PartialFCLoss, partial_fc_loss, reference_partial_fc_loss

from helpers import loss_and_grads, make_problem, max_rel_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, num_classes, dim, num_sampled", [(300, 5003, 200, None), (517, 20011, 512, 7000)])
def test_default_tiles_against_float64(dtype, batch, num_classes, dim, num_sampled):
    p = make_problem(batch, num_classes, dim, num_sampled, seed=10, device=CUDA)
    margin = ArcFace()

    def run(x, w, fn):
        return fn(x, w, p["labels"], margin, p["index"], reduction="none")

    exact = loss_and_grads(lambda x, w: run(x, w, reference_partial_fc_loss), p["x"], p["w"])
    ref = loss_and_grads(lambda x, w: run(x, w, reference_partial_fc_loss), p["x"].to(dtype), p["w"].float())
    ours = loss_and_grads(lambda x, w: run(x, w, partial_fc_loss), p["x"].to(dtype), p["w"].float())
    for name, o, r, e in zip(("loss", "grad_x", "grad_w"), ours, ref, exact, strict=False):
        assert max_rel_error(o, e) <= 1.5 * max_rel_error(r, e) + 1e-4, name


def test_bitwise_deterministic_on_gpu():
    p = make_problem(1024, 30000, 256, 9000, seed=11, device=CUDA)

    def run():
        return loss_and_grads(lambda x, w: partial_fc_loss(x, w, p["labels"], ArcFace(), p["index"]),
                              p["x"].bfloat16(), p["w"].float())

    for first, second in zip(run(), run(), strict=False):
        assert torch.equal(first, second)


def test_module_on_gpu_validates_and_samples():
    loss_fn = PartialFCLoss(64, 10000, sample_rate=0.1, seed=0).to(CUDA)
    x = torch.randn(32, 64, device=CUDA)
    labels = torch.randint(0, 10000, (32,), device=CUDA)
    loss_fn(x, labels).backward()
    assert torch.isfinite(loss_fn.weight.grad).all()
    assert int((loss_fn.weight.grad.abs().sum(1) > 0).sum()) == 1000
    with pytest.raises(ValueError, match="labels must be in"):
        loss_fn(x, labels + 10000)
