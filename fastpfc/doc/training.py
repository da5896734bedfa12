"""Training of the document embedder with PartialFCLoss, evaluation, and exact-resume checkpoints."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastpfc import PartialFCLoss, create_margin

from .evaluation import registration_accuracy, verification_report
from .folders import ImageFolderDataset
from .model import DocumentEmbedder
from .synthetic import SyntheticDocuments


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a run needs; ``train.py`` turns each field into a command-line option."""

    run_dir: str = _option("runs/default", "run folder: config, checkpoint, metrics, eval, plots")
    backbone: str = _option("lcnet_050", "timm backbone name")
    weights: str | None = _option(None, "local file of pretrained backbone weights (nothing is downloaded)")
    embedding_size: int = _option(256, "embedding dimension")
    image_size: int = _option(128, "input images are image_size x image_size")
    head_norm: str = _option("ln+bn", "norms after the head's linear layers: ln+bn, ln or bn")
    data: str | None = _option(None, "folder of training images (default: the built-in synthetic documents)")
    data_layout: str = _option("per_image", "--data layout: per_image (each image a class) or subfolders")
    eval_data: str | None = _option(None, "folder of class sub-folders to evaluate on (default: unseen synthetic "
                                           "types)")
    train_types: int = _option(400, "synthetic document types (classes) to train on")
    per_type: int = _option(8, "synthetic documents per training type")
    eval_types: int = _option(100, "unseen synthetic types to evaluate on")
    eval_per_type: int = _option(8, "captures per evaluation type")
    steps: int = _option(500, "optimizer steps")
    batch_size: int = _option(64, "images per step")
    lr: float = _option(2e-3, "peak learning rate of the backbone and head")
    center_lr: float = _option(2e-2, "peak learning rate of the class centers")
    weight_decay: float = _option(0.05, "AdamW weight decay of the backbone and head")
    warmup_steps: int = _option(50, "linear warm-up steps")
    schedule: str = _option("cosine", "decay after warm-up: cosine or poly")
    margin: str = _option("cosface", "margin: cosface, arcface, combined or softmax")
    scale: float = _option(32.0, "margin scale s (the ImageNet-scale recipe uses 64)")
    margin_m: float = _option(0.25, "margin m (the ImageNet-scale recipe uses 0.4)")
    sample_rate: float = _option(1.0, "PartialFC sample rate of the class centers")
    clip_grad: float = _option(5.0, "gradient norm clip of the backbone and head")
    workers: int = _option(min(4, os.cpu_count() or 1), "DataLoader worker processes")
    checkpoint_every: int = _option(200, "steps between checkpoints")
    seed: int = _option(0, "seed of the data, the model and the sampling")
    backend: str = _option("auto", "PartialFC backend: auto, triton or torch")


def warmup_then_decay(config: TrainConfig):
    """Learning-rate factor of each step: linear warm-up, then cosine or polynomial decay to 0."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else (1 - progress) ** 2
    return factor


class BatchSchedule:
    """The batches of every step, a function of (seed, step) alone: resuming at step k replays
    exactly what an uninterrupted run would have drawn. Each epoch is a new permutation and a new
    capture of every document (the ``draw``)."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stop: int) -> None:
        if num_items < batch_size:
            raise ValueError(f"the training set has {num_items} items, fewer than one batch of {batch_size}")
        self.num_items, self.batch_size, self.seed, self.start, self.stop = num_items, batch_size, seed, start, stop
        self.per_epoch = num_items // batch_size

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        epoch_of_order, order = None, None
        for step in range(self.start, self.stop):
            epoch, position = divmod(step, self.per_epoch)
            if epoch != epoch_of_order:  # one permutation per epoch, not per step
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                epoch_of_order, order = epoch, torch.randperm(self.num_items, generator=generator)
            yield [(int(i), epoch) for i in order[position * self.batch_size:(position + 1) * self.batch_size]]


def embed_dataset(model: DocumentEmbedder, dataset, device: torch.device, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    return torch.cat([model.embed(images.to(device)).cpu() for images, _ in loader])


LISTING_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastpfc"


def training_data(config: TrainConfig):
    """The training set: an image folder (``--data``) or the built-in synthetic documents."""
    if config.data is not None:
        return ImageFolderDataset(config.data, config.data_layout, config.image_size, LISTING_CACHE)
    return SyntheticDocuments(config.train_types, config.per_type, "train", config.image_size, config.seed)


def evaluation_data(config: TrainConfig):
    """(queries, gallery, gallery labels): the first half of the classes is registered with one
    image each (a clean render for synthetic types, the first image of the class for a folder);
    the other half must be rejected."""
    if config.eval_data is not None:
        queries = ImageFolderDataset(config.eval_data, "subfolders", config.image_size, LISTING_CACHE)
        first = {}
        for item, label in enumerate(queries.labels):
            first.setdefault(label, item)
        registered = list(range(queries.num_classes // 2))
        return queries, torch.utils.data.Subset(queries, [first[c] for c in registered]), registered
    queries = SyntheticDocuments(config.eval_types, config.eval_per_type, "eval", config.image_size, config.seed)
    clean = SyntheticDocuments(config.eval_types, 1, "eval", config.image_size, config.seed, clean=True)
    registered = list(range(config.eval_types // 2))
    return queries, torch.utils.data.Subset(clean, registered), registered


def evaluate(model: DocumentEmbedder, config: TrainConfig, device: torch.device) -> dict:
    """TPR@FPR over all pairs of the evaluation images (unseen classes), and registration accuracy
    of all of them as queries at the FPR=1e-4 threshold (see :func:`evaluation_data`)."""
    queries, gallery_data, registered = evaluation_data(config)
    labels = torch.tensor(queries.labels)
    embeddings = embed_dataset(model, queries, device)
    report = verification_report(embeddings, labels)
    gallery = embed_dataset(model, gallery_data, device)
    threshold = report.at(1e-4).threshold
    registration = registration_accuracy(gallery, torch.tensor(registered), embeddings, labels, threshold)
    return {"verification": report.as_dict(), "registration": {**registration, "threshold": threshold},
            "roc": {"fpr": report.roc_fpr.tolist(), "tpr": report.roc_tpr.tolist()}}


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, step: int, model, loss_fn, optimizer, scheduler) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    state = {"step": step, "model": model.state_dict(), "loss": loss_fn.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()}
    partial = path.with_suffix(".tmp")
    torch.save(state, partial)
    os.replace(partial, path)


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Train (or resume) the run in ``config.run_dir``; returns the evaluation of the untrained and
    the trained network. Ctrl-C saves a checkpoint; a non-finite loss stops with an error naming
    the step and leaves the last checkpoint as it was."""
    from tqdm import tqdm

    run = Path(config.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(asdict(config), indent=2))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)
    model = DocumentEmbedder(config.backbone, config.embedding_size, config.image_size, config.head_norm,
                             config.weights).to(device)
    margin_args = {"s": config.scale} | ({"m": config.margin_m} if config.margin in ("cosface", "arcface") else {})
    data = training_data(config)
    loss_fn = PartialFCLoss(config.embedding_size, data.num_classes, create_margin(config.margin, **margin_args),
                            sample_rate=config.sample_rate, backend=config.backend, seed=config.seed).to(device)
    optimizer = torch.optim.AdamW([
        {"params": model.parameters(), "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": loss_fn.parameters(), "lr": config.center_lr, "weight_decay": 0.0},
    ])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_decay(config))
    checkpoint, start = run / "checkpoint.pt", 0
    untrained_path = run / "eval_untrained.json"
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start = state["step"]
    else:
        untrained_path.write_text(json.dumps(evaluate(model, config, device)))

    schedule = BatchSchedule(len(data), config.batch_size, config.seed, start, config.steps)
    loader = torch.utils.data.DataLoader(data, batch_sampler=schedule, num_workers=config.workers)
    step = start
    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="train")
    interrupted = _StopOnInterrupt()
    last = time.perf_counter()
    try:
        model.train()  # the evaluations before and after the loop switch it to eval mode
        for images, labels in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                embeddings = model(images.to(device))
            loss = loss_fn(embeddings.float(), labels.to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss.item()} at step {step}; stopped without saving, "
                                         f"the last checkpoint ({checkpoint}) is as it was")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            optimizer.step()
            scheduler.step()
            step += 1
            now = time.perf_counter()
            rate = len(labels) / (now - last)  # wall clock, data loading included
            last = now
            _append_metrics(run / "metrics.jsonl", {"step": step, "loss": loss.item(),
                                                    "lr": scheduler.get_last_lr()[0], "images_per_s": rate})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", img_s=f"{rate:.0f}")
            stop = interrupted.requested
            if step % config.checkpoint_every == 0 or stop:
                save_checkpoint(checkpoint, step, model, loss_fn, optimizer, scheduler)
            if stop:
                raise KeyboardInterrupt(f"interrupted: step {step} saved to {checkpoint}; run again to resume")
    finally:
        bar.close()
        interrupted.restore()
    save_checkpoint(checkpoint, step, model, loss_fn, optimizer, scheduler)
    results = {"untrained": json.loads(untrained_path.read_text()), "trained": evaluate(model, config, device)}
    (run / "eval.json").write_text(json.dumps(results, indent=2))
    _plot(run, results)
    return results


class _StopOnInterrupt:
    """The first Ctrl-C asks the loop to stop after the current step (which is then saved);
    a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _plot(run: Path, results: dict) -> None:
    """loss.png (the training curve) and roc.png (untrained vs trained), when matplotlib is there."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    fig.savefig(run / "loss.png", dpi=100)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        tpr_at = result["verification"]["points"][1]["tpr"]
        ax.plot(result["roc"]["fpr"], result["roc"]["tpr"], label=f"{name} (TPR@1e-4 = {tpr_at:.3f})")
    ax.set(xscale="log", xlim=(1e-5, 1), xlabel="FPR", ylabel="TPR", title="ROC, unseen document types")
    ax.legend()
    fig.savefig(run / "roc.png", dpi=100)
    plt.close("all")
