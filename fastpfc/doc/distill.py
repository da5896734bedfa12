"""CLIP distillation: an open_clip image teacher, its features cached on disk, and the losses.

The teacher sees every training image once: :func:`teacher_features` runs it over the dataset and
keeps the L2-normalised features in a memory-mapped ``[N, T]`` float16 ``.npy`` file (1.28M images
x 512 features of ViT-B-32 = 1.3 GB), reused by every later run with the same teacher and data. The student's
embedding goes through a bias-free linear projection to ``T`` and is pulled towards its image's
teacher feature by one of :data:`DISTILL_LOSSES`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .files import write_text_atomic


class ClipTeacher(nn.Module):
    """The image tower of open_clip model ``name`` with weights from the local file ``weights``.

    ``forward`` takes images ``[B, 3, S, S]`` in [0, 1] at any size ``S``, resizes them to the
    teacher's input size, normalises them with its mean/std and returns L2-normalised fp32
    features ``[B, T]``.
    """

    def __init__(self, name: str, weights: str) -> None:
        super().__init__()
        try:
            import open_clip
        except ImportError as error:
            raise ImportError("CLIP distillation needs open_clip: pip install 'fastpfc[train]'") from error
        if name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {name!r}; open_clip.list_models() lists the known ones")
        if not Path(weights).is_file():
            raise FileNotFoundError(f"CLIP weights file {weights} does not exist (nothing is downloaded)")
        self.visual = open_clip.create_model(name, pretrained=weights).visual.eval().requires_grad_(False)
        config = self.visual.preprocess_cfg
        self.size = tuple(config["size"]) if isinstance(config["size"], (tuple, list)) else (config["size"],) * 2
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1))
        self.dim = self.visual.output_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images, size=self.size, mode="bicubic", antialias=True, align_corners=False)
        return F.normalize(self.visual((images.clamp(0, 1) - self.mean) / self.std).float(), dim=1)


def save_random_clip(name: str, vision: dict, dim: int, folder: Path, seed: int = 0) -> Path:
    """Register an open_clip model ``name`` (image tower ``vision``, a minimal text tower, ``dim``
    features) from a config file written to ``folder``, and save randomly initialised weights
    there; returns the weights file. For tests and measurements, where no CLIP weights can be
    downloaded. Call it (or ``open_clip.add_model_config`` on the same file) in every process.
    """
    import open_clip

    config = {"embed_dim": dim, "vision_cfg": vision,
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(seed)
    weights = folder / f"{name}.pt"
    torch.save(open_clip.create_model(name).state_dict(), weights)
    return weights


def _cache_matches(path: Path, sidecar: Path, identity: dict, rows: int) -> bool:
    """Whether ``path`` holds the features ``identity`` describes: its sidecar says so and the file
    reads as ``rows`` rows. A missing, cut or damaged cache or sidecar is rebuilt, not an error."""
    try:
        return json.loads(sidecar.read_text()) == identity and np.load(path, mmap_mode="r").shape[0] == rows
    except (OSError, ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        return False


def teacher_features(teacher: ClipTeacher, dataset, path: Path, identity: dict, device: torch.device,
                     batch_size: int = 64, workers: int = 0, progress: bool = True) -> np.ndarray:
    """The teacher's features of every item of ``dataset``, ``[len(dataset), T]`` float16, memory-mapped.

    Items are read as ``dataset[i]``: give a dataset that renders at the teacher's input size
    (an image folder's image resized, a synthetic document's first capture). The cache ``path`` is
    reused when its sidecar ``path.json`` equals ``identity`` (teacher, weights, data), as rank 0
    sees it; otherwise it is recomputed.

    Under torch.distributed each rank computes a contiguous share of the rows into its own part
    file, then rank 0 joins the parts, so ``path`` must be on a filesystem all ranks see. The file
    is written under a temporary name and renamed, and the sidecar is written last, so an
    interrupted build is never taken for a finished one.
    """
    from tqdm import tqdm

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    sidecar = path.with_suffix(".json")
    valid = [_cache_matches(path, sidecar, identity, len(dataset))]
    if world > 1:
        dist.broadcast_object_list(valid, src=0)  # one decision for all ranks
    if valid[0]:
        return np.load(path, mmap_mode="r")
    path.parent.mkdir(parents=True, exist_ok=True)
    share = np.array_split(np.arange(len(dataset)), world)[rank]
    items = torch.utils.data.Subset(_ImagesOnly(dataset), share.tolist())
    loader = torch.utils.data.DataLoader(items, batch_size=batch_size, num_workers=workers)
    part = np.lib.format.open_memmap(path.with_name(f"{path.name}.part{rank}.npy"), mode="w+", dtype=np.float16,
                                     shape=(len(share), teacher.dim))
    row = 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for images in tqdm(loader, desc="teacher features", disable=not progress or rank != 0):
            batch = teacher(images.to(device)).cpu().numpy()
            part[row:row + len(batch)] = batch
            row += len(batch)
    part.flush()
    del part
    if world > 1:
        dist.barrier()
    if rank == 0:
        sidecar.unlink(missing_ok=True)
        partial = path.with_name(path.name + ".partial.npy")
        features = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(len(dataset), teacher.dim))
        start = 0
        for r in range(world):
            part_path = path.with_name(f"{path.name}.part{r}.npy")
            rows = np.load(part_path, mmap_mode="r")
            features[start:start + len(rows)] = rows
            start += len(rows)
            del rows
            part_path.unlink()
        features.flush()
        del features
        os.replace(partial, path)
        write_text_atomic(sidecar, json.dumps(identity))
    if world > 1:
        dist.barrier()
    return np.load(path, mmap_mode="r")


class _ImagesOnly(torch.utils.data.Dataset):
    """The images of ``dataset`` without their labels."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int) -> torch.Tensor:
        return self.dataset[item][0]


def cosine_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos(student_i, teacher_i)`` over rows: [B, T], [B, T] -> scalar, in [0, 2]."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()


def kl_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(softmax(t) || softmax(s)) of the unit vectors over the feature axis, averaged over rows.

    The published recipe's loss, kept for comparison: the softmax of a unit vector's components is
    nearly uniform (every logit lies in [-1, 1]), so this loss is close to zero and its gradient
    small; the README quotes a side-by-side measurement against :func:`cosine_distill_loss`.
    """
    log_student = F.log_softmax(F.normalize(student.float(), dim=1), dim=1)
    log_teacher = F.log_softmax(F.normalize(teacher.float(), dim=1), dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")


#: Distillation losses by name: (student projection [B, T], teacher features [B, T]) -> scalar.
DISTILL_LOSSES = {"cosine": cosine_distill_loss, "kl": kl_distill_loss}
