"""Cosine vs KL distillation, side by side: does each loss move the student towards the teacher?

No CLIP weights can be downloaded here, so the teacher is a small randomly initialised open_clip
ViT (its features are still a fixed function of the image). The script measures what the loss
choice changes: the mean cosine between the student's projection and the teacher feature over
the first and last steps, the size of the distillation loss and of its gradient, and the
verification TPR of the resulting model. Usage::

    python scripts/compare_distill_losses.py [--steps 150] [--out runs/distill-compare]
"""

import argparse
import json
from pathlib import Path

import torch

from fastpfc.doc.distill import DISTILL_LOSSES, save_random_clip
from fastpfc.doc.training import TrainConfig, train

TEACHER = "fastpfc-small-random-vit"


def gradient_norms(dim: int, batch: int = 64) -> dict[str, tuple[float, float]]:
    """(loss, |d loss / d student|) of each loss on unrelated random unit vectors (as at the start
    of training)."""
    gen = torch.Generator().manual_seed(0)
    teacher = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    norms = {}
    for name, loss_fn in DISTILL_LOSSES.items():
        student = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1).requires_grad_()
        loss = loss_fn(student, teacher)
        loss.backward()
        norms[name] = (float(loss.detach()), float(student.grad.norm()))
    return norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default="runs/distill-compare")
    args = parser.parse_args()
    out = Path(args.out)
    dim = 256
    weights = save_random_clip(TEACHER, {"image_size": 128, "layers": 4, "width": 256, "patch_size": 16}, dim, out)
    rows = []
    for loss in ("none", *DISTILL_LOSSES):
        distil = {} if loss == "none" else {"clip_model": TEACHER, "clip_weights": str(weights), "distill_loss": loss,
                                            "teacher_cache": str(out / "teacher.npy")}
        # 8 documents per type, as when docs/training.md's table was measured (and an 8x smaller teacher cache)
        run = TrainConfig(run_dir=str(out / loss), steps=args.steps, warmup_steps=min(50, args.steps // 5), per_type=8,
                          **distil)
        result = train(run, progress=False)["trained"]["verification"]["points"]
        records = [json.loads(line) for line in (out / loss / "metrics.jsonl").read_text().splitlines()]
        first, last = records[:10], records[-10:]
        row = {"loss": loss, "TPR@1e-3": result[2]["tpr"], "TPR@1e-2": result[3]["tpr"]}
        if loss != "none":
            row |= {"teacher_cos_first10": sum(r["teacher_cos"] for r in first) / len(first),
                    "teacher_cos_last10": sum(r["teacher_cos"] for r in last) / len(last),
                    "distill_loss_first10": sum(r["distill_loss"] for r in first) / len(first)}
        rows.append(row)
        print(json.dumps(row))
    print(json.dumps({"loss_and_gradient_norm_at_random": gradient_norms(dim)}))


if __name__ == "__main__":
    main()
