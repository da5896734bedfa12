"""A short training of ``train.py``'s model on many synthetic classes, and the loss's share of a step.

Prepared for a lent GPU (the Triton backend and bf16 autocast are what ``train.py`` uses on CUDA);
it also runs on the CPU at small sizes. It trains ``--steps`` steps over ``--classes`` synthetic
document types (one document each), then times the loss alone (forward + backward) at the same
shapes and prints images/s, the median step time and the loss's share of it. The step time is
wall clock, data loading included: when rendering the synthetic captures (about 6 ms of CPU each)
bounds the step, the share is of that step::

    python scripts/gpu_train_check.py --classes 200000 --steps 300 --batch-size 256
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from fastpfc import PartialFCLoss, create_margin
from fastpfc.doc.training import TrainConfig, train


def loss_step_ms(config: TrainConfig, device: torch.device, repeats: int = 20) -> float:
    """Median time of the loss's forward + backward at the run's shapes (fp32 embeddings, as in train)."""
    loss_fn = PartialFCLoss(config.embedding_size, config.train_types, create_margin("cosface", s=config.scale,
                            m=config.margin_m), sample_rate=config.sample_rate, seed=0).to(device)
    embeddings = torch.randn(config.batch_size, config.embedding_size, device=device, requires_grad=True)
    labels = torch.randint(0, config.train_types, (config.batch_size,), device=device)
    times = []
    for _ in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss_fn(embeddings, labels).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[3:])  # the first calls compile the kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=200_000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="DataLoader workers (a synthetic capture costs ~6 ms of CPU)")
    parser.add_argument("--run-dir", default="runs/gpu-train-check")
    args = parser.parse_args()
    config = TrainConfig(run_dir=args.run_dir, synthetic="documents", train_types=args.classes, per_type=1, views=1,
                         center_optimizer="adamw", sample_rate=1.0, real_captures=0, steps=args.steps,
                         batch_size=args.batch_size, image_size=args.image_size, warmup_steps=min(50, args.steps // 5),
                         checkpoint_every=10 * args.steps, workers=args.workers, time_budget=0.0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = train(config, progress=False)
    records = [json.loads(line) for line in (Path(args.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steady = records[len(records) // 5:]  # past warm-up and compilation
    images_per_s = statistics.median(r["images_per_s"] for r in steady)
    step_ms = 1e3 * args.batch_size / images_per_s
    loss_ms = loss_step_ms(config, device)
    print(json.dumps({
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "classes": args.classes,
        "batch_size": args.batch_size, "steps": args.steps, "images_per_s": round(images_per_s, 1),
        "step_ms": round(step_ms, 2), "loss_fwd_bwd_ms": round(loss_ms, 2),
        "loss_share_of_step": round(loss_ms / step_ms, 3),
        "tpr_at_1e-4": {name: r["verification"]["points"][1]["tpr"] for name, r in results.items()},
    }))


if __name__ == "__main__":
    main()
