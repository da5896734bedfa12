"""Training of the document embedder with PartialFCLoss (and optional CLIP distillation) and
exact-resume checkpoints; one process or ``torchrun`` (DDP backbone, sharded centers). The options
are :mod:`fastpfc.doc.config`'s, the data and batches :mod:`fastpfc.doc.training_data`'s, the
processes and cores :mod:`fastpfc.doc.ranks`', the number of steps and their learning rates
:mod:`fastpfc.doc.schedule`'s, the run folder's records :mod:`fastpfc.doc.run_records`' and the
evaluations :mod:`fastpfc.doc.run_evaluation`'s."""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastpfc import PartialFCLoss, create_margin

from .baselines import BASELINES
from .checkpoints import check_resumable, read_checkpoint, save_checkpoint, set_rng_state, training_state
from .config import CENTER_OPTIMIZERS, TrainConfig, check_config
from .distill import DISTILL_LOSSES, ClipTeacher, teacher_features
from .files import write_text_atomic
from .layouts import layout_baseline
from .model import DocumentEmbedder, recalibrate_batchnorm
from .ranks import agree, loader_workers, set_step_threads, start_distributed
from .run_evaluation import EvaluationSets, evaluate, evaluate_model
from .run_records import append_metrics, plot_run, read_json, truncate_metrics
from .schedule import StepPlan, budget_minutes, warmup_then_decay
from .training_data import BatchSchedule, IndexedItems, training_data


@torch.no_grad()
def set_prototypes(loss_fn: PartialFCLoss, embeddings: torch.Tensor, labels: torch.Tensor, world: int) -> None:
    """Memory-bank centers: each class of the global batch gets the unit mean of its embeddings
    [B, D] there, written before the loss. A class seen once (every generated image its own class,
    more classes than a short run draws images) is then told apart from the centers of the images
    seen before it at its first and only encounter, where a learned center would still be random.
    Under ``torchrun`` the batch is all-gathered and each rank writes the classes of its shard."""
    features, labels = F.normalize(embeddings.detach().float(), dim=1), labels.to(embeddings.device)
    if world > 1:
        gathered = [torch.empty_like(features) for _ in range(world)], [torch.empty_like(labels) for _ in range(world)]
        dist.all_gather(gathered[0], features)
        dist.all_gather(gathered[1], labels)
        features, labels = torch.cat(gathered[0]), torch.cat(gathered[1])
    classes, inverse = torch.unique(labels, return_inverse=True)
    sums = features.new_zeros(len(classes), features.shape[1]).index_add_(0, inverse, features)
    mine = (classes >= loss_fn.class_start) & (classes < loss_fn.class_stop)
    loss_fn.weight[classes[mine] - loss_fn.class_start] = F.normalize(sums[mine], dim=1)


class Student(nn.Module):
    """The embedder plus, when distilling, a bias-free projection of its embedding to the teacher's
    dimension. ``forward`` gives ``(embeddings [B, D], projections [B, T] or None)``."""

    def __init__(self, embedder: DocumentEmbedder, teacher_dim: int | None) -> None:
        super().__init__()
        self.embedder = embedder
        self.projection = nn.Linear(embedder.learned_size, teacher_dim, bias=False) if teacher_dim else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeddings = self.embedder(images)
        return embeddings, (self.projection(embeddings) if self.projection is not None else None)


def _teacher(config: TrainConfig, device: torch.device, progress: bool):
    """(teacher features [N, T] memory-mapped, T), or (None, None) without ``--clip-model``. The
    teacher sees the training images rendered at its own input size."""
    if config.clip_model is None:
        return None, None
    if config.clip_weights is None:
        raise ValueError("--clip-model needs --clip-weights, a local file of the model's weights")
    if config.distill_loss not in DISTILL_LOSSES:
        raise ValueError(f"unknown distillation loss {config.distill_loss!r}; choose one of {sorted(DISTILL_LOSSES)}")
    teacher = ClipTeacher(config.clip_model, config.clip_weights).to(device)
    data, data_identity = training_data(config, image_size=teacher.size[0])
    weights = Path(config.clip_weights).resolve()
    identity = {"model": config.clip_model, "weights": str(weights), "weights_bytes": weights.stat().st_size,
                "weights_mtime_ns": weights.stat().st_mtime_ns, **data_identity}
    path = Path(config.teacher_cache or Path(config.run_dir) / "teacher.npy")
    features = teacher_features(teacher, data, path, identity, device, workers=loader_workers(config, device),
                                progress=progress)
    return features, teacher.dim


def _evaluate_untrained(path: Path, embedder: DocumentEmbedder, sets: EvaluationSets, device: torch.device) -> float:
    """Write the untrained network's evaluation to ``path``; returns its seconds (the evaluation
    images' rendering included)."""
    started = time.perf_counter()
    write_text_atomic(path, json.dumps(evaluate_model(embedder, sets, device)))
    return time.perf_counter() - started


def _load_checkpoint(path: Path, config: TrainConfig, student: Student, loss_fn, optimizers: list,
                     schedulers: list, plan: StepPlan, world: int, device: torch.device) -> int:
    """Restore everything from ``path`` (the step plan included); returns its step. If any rank
    fails, every rank raises."""
    error, step = None, -1
    try:
        state = read_checkpoint(path)
        check_resumable(path, state["config"], asdict(config))
        if state.get("world_size", 1) != world:
            raise ValueError(f"{path} was written by {state.get('world_size', 1)} processes and this run has "
                             f"{world}; resume with the same number (or start a new --run-dir)")
        student.embedder.load_state_dict(state["model"])
        if student.projection is not None:
            student.projection.load_state_dict(state["projection"])
        if len(state.get("optimizers", ())) != len(optimizers):
            raise ValueError(f"{path} was written by an earlier version, which trained the class centers with "
                             "the network's dense optimizer; it cannot resume here (start a new --run-dir; "
                             "`classify`/`register` still read it)")
        loss_fn.load_state_dict(state["loss"])
        for optimizer, scheduler, saved, saved_schedule in zip(optimizers, schedulers, state["optimizers"],
                                                               state["schedulers"], strict=True):
            optimizer.load_state_dict(saved)
            scheduler.load_state_dict(saved_schedule)
        set_rng_state(state["rng"])
        plan.load_state(state.get("plan"), state["config"]["steps"])
        step = state["step"]
    except Exception as caught:  # noqa: BLE001 - whatever it is, every rank must learn of it
        error = caught
    failed, low, high = agree([error is not None, -step, step], world, device)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"another rank could not load its checkpoint from {path.parent} (see its error)")
    if -low != high:
        raise ValueError(f"the ranks' checkpoints in {path.parent} hold different steps ({-low} to {high}): the "
                         "run stopped while saving; resume needs every rank's file of one step")
    return step


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Train (or resume) the run in ``config.run_dir``; returns the evaluation of the untrained and
    the trained network (on rank 0; other ranks return ``{}``). Ctrl-C saves a checkpoint; a
    non-finite loss stops with an error naming the step and leaves the last checkpoint as it was.

    Under ``torchrun`` the backbone runs under DistributedDataParallel, ``--batch-size`` is per rank,
    PartialFCLoss shards the class centers, and every rank keeps its own checkpoint file.
    """
    from tqdm import tqdm

    check_config(config)
    plan = StepPlan(config.steps, budget_minutes(config), config.warmup_steps, started=time.perf_counter())
    rank, world, device = start_distributed()
    lead = rank == 0
    progress = progress and lead
    run = Path(config.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    data, _ = training_data(config)
    teacher_bank, teacher_dim = _teacher(config, device, progress)
    torch.manual_seed(config.seed)  # after the teacher: the same initial weights with or without one
    embedder = DocumentEmbedder.from_config(asdict(config), config.weights)
    student = Student(embedder, teacher_dim).to(device)
    if config.channels_last:
        student = student.to(memory_format=torch.channels_last)
    margin_args = {"s": config.scale} | ({"m": config.margin_m} if config.margin in ("cosface", "arcface") else {})
    loss_fn = PartialFCLoss(config.embedding_size, data.num_classes, create_margin(config.margin, **margin_args),
                            sample_rate=config.sample_rate, backend=config.backend, seed=config.seed,
                            sparse_grad=True).to(device)
    if config.freeze_backbone:
        embedder.backbone.requires_grad_(False)
    trained = [p for p in student.parameters() if p.requires_grad]
    optimizers = [torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)]
    prototypes = CENTER_OPTIMIZERS[config.center_optimizer] is None
    if prototypes:
        loss_fn.weight.requires_grad_(False)
    else:
        optimizers.append(CENTER_OPTIMIZERS[config.center_optimizer](loss_fn.parameters(), lr=config.center_lr))
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, warmup_then_decay(config, plan)) for o in optimizers]
    checkpoint, start = run / ("checkpoint.pt" if world == 1 else f"checkpoint-rank{rank}.pt"), 0
    other_layout = list(run.glob("checkpoint-rank*.pt")) if world == 1 else list(run.glob("checkpoint.pt"))
    if other_layout:
        raise ValueError(f"{other_layout[0]} was written by a run with {'more than ' if world == 1 else ''}one "
                         f"process; resume with the same number of processes, or start a new --run-dir")
    untrained_path, evaluation_sets = run / "eval_untrained.json", EvaluationSets(config)
    some_have, some_lack = agree([checkpoint.exists(), not checkpoint.exists()], world, device)
    if some_have and some_lack:
        raise ValueError(f"some ranks find their checkpoint in {run} and others do not: a resume needs the "
                         "same number of processes as the run that saved it (and all its checkpoint-rank*.pt)")
    if some_have:
        if lead and read_json(untrained_path) is None:  # the network still has its initial weights here
            warnings.warn(f"{untrained_path} is missing or unreadable: evaluating the untrained network again",
                          stacklevel=2)
            plan.evaluation_seconds = _evaluate_untrained(untrained_path, embedder, evaluation_sets, device)
        start = _load_checkpoint(checkpoint, config, student, loss_fn, optimizers, schedulers, plan, world, device)
        if lead:
            truncate_metrics(run / "metrics.jsonl", start)
    elif lead:
        plan.evaluation_seconds = _evaluate_untrained(untrained_path, embedder, evaluation_sets, device)
    if lead:
        write_text_atomic(run / "config.json", json.dumps(asdict(config), indent=2))
    network = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    if config.compile:
        network = torch.compile(network)

    group = config.views if config.data is None else 1
    schedule = BatchSchedule(len(data), config.batch_size, config.seed, start, max(start, plan.steps), rank, world,
                             group)
    workers = loader_workers(config, device)
    loader = torch.utils.data.DataLoader(IndexedItems(data), batch_sampler=schedule, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    distill = DISTILL_LOSSES.get(config.distill_loss)
    step = start
    bar = tqdm(total=plan.steps, initial=start, disable=not progress, desc="train")
    interrupted = _StopOnInterrupt()
    last = time.perf_counter()
    threads = set_step_threads(workers, device)
    try:
        student.train()  # the evaluations before and after the loop switch it to eval mode
        for images, labels, items in loader:
            images = images.to(device, non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                embeddings, projections = network(images)
            if prototypes:
                set_prototypes(loss_fn, embeddings, labels, world)
            try:
                loss = loss_fn(embeddings.float(), labels.to(device))
            except ValueError as rejected:  # the loss refuses non-finite embeddings: the run diverged
                if torch.isfinite(embeddings).all():
                    raise
                raise FloatingPointError(f"the embeddings are not finite at step {step} (the run diverged); "
                                         f"stopped without saving, the last checkpoint ({checkpoint}) is as it "
                                         "was") from rejected
            parts = {"pfc_loss": loss}
            if projections is not None:
                targets = torch.from_numpy(teacher_bank[items.numpy()]).to(device).float()
                distill_loss = distill(projections, targets)
                loss = loss + config.distill_weight * distill_loss
                parts |= {"distill_loss": distill_loss,
                          "teacher_cos": torch.cosine_similarity(projections.detach().float(), targets).mean()}
            total, *values = torch.stack([loss, *parts.values()]).detach().tolist()  # one host sync per step
            record = dict(zip(parts, values, strict=True))
            non_finite, stop = agree([not math.isfinite(total), interrupted.requested], world, device)
            if non_finite:
                raise FloatingPointError(f"the loss is not finite at step {step} ({record}); stopped without "
                                         f"saving, the last checkpoint ({checkpoint}) is as it was")
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), config.clip_grad)
            for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
                optimizer.step()
                scheduler.step()
            step += 1
            now = time.perf_counter()
            rate = world * len(labels) / (now - last)  # wall clock, data loading included
            shortened = plan.after_step(step, now - last, now, world, device)
            last = now
            if shortened is not None:
                bar.total = plan.steps
                if lead:
                    warnings.warn(shortened, stacklevel=2)
            if lead:
                append_metrics(run / "metrics.jsonl", {"step": step, "loss": total, **record,
                                                        "lr": schedulers[0].get_last_lr()[0], "images_per_s": rate})
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{schedulers[0].get_last_lr()[0]:.2e}", img_s=f"{rate:.0f}")
            if step % config.checkpoint_every == 0 or stop:
                save_checkpoint(checkpoint, training_state(step, config, student, loss_fn, optimizers, schedulers,
                                                           plan.state()))
            if stop:
                raise KeyboardInterrupt(f"interrupted: step {step} saved to {checkpoint}; run again to resume")
            if step >= plan.steps:
                break
    finally:
        bar.close()
        interrupted.restore()
        torch.set_num_threads(threads)
    if config.precise_bn_batches > 0:
        schedule = BatchSchedule(len(data), config.batch_size, config.seed, 0, config.precise_bn_batches, rank, world,
                                 group)
        recalibrate_batchnorm(student.embedder, (torch.stack([data[item][0] for item in batch]).to(device)
                                                 for batch in schedule))
    save_checkpoint(checkpoint, training_state(step, config, student, loss_fn, optimizers, schedulers, plan.state()))
    if not lead:
        dist.barrier()
        return {}
    results = {"untrained": json.loads(untrained_path.read_text()),
               "trained": evaluate_model(embedder, evaluation_sets, device),
               **evaluate(layout_baseline(config.layout_weight, config.layout) | BASELINES, evaluation_sets)}
    write_text_atomic(run / "eval.json", json.dumps(results, indent=2))
    plot_run(run, results)
    if world > 1:
        dist.barrier()
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


