"""What the training steps see: the training set (an image folder or the built-in synthetic images),
the batches of every step as a function of (seed, step), and items tagged with their index."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .config import TrainConfig
from .folders import LISTING_CACHE, ImageFolderDataset
from .procedural import PROCEDURAL_VERSION, ProceduralImages
from .synthetic import DOCUMENT_SOURCES, GENERATOR_VERSION, SyntheticDocuments


class BatchSchedule:
    """The batches of every step, a function of (seed, step) alone: resuming at step k replays
    exactly what an uninterrupted run would have drawn. Each epoch is a new permutation and a new
    capture of every document (the ``draw``). With ``world`` ranks a step's global batch holds
    ``world * batch_size`` items and rank ``rank`` takes its slice. With ``group`` > 1 the
    permutation moves runs of ``group`` consecutive items together (the views of one class)."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stop: int,
                 rank: int = 0, world: int = 1, group: int = 1) -> None:
        if num_items < batch_size * world:
            raise ValueError(f"the training set has {num_items} items, fewer than one global batch of "
                             f"{world} x {batch_size}")
        self.num_items, self.batch_size, self.seed, self.start, self.stop = num_items, batch_size, seed, start, stop
        self.group = group
        self.per_epoch = num_items // (batch_size * world)
        self.offset = rank * batch_size
        self.global_batch = batch_size * world

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        epoch_of_order, order = None, None
        for step in range(self.start, self.stop):
            epoch, position = divmod(step, self.per_epoch)
            if epoch != epoch_of_order:  # one permutation per epoch, not per step
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                groups = torch.randperm(self.num_items // self.group, generator=generator)
                epoch_of_order, order = epoch, (groups[:, None] * self.group + torch.arange(self.group)).flatten()
            first = position * self.global_batch + self.offset
            yield [(int(i), epoch) for i in order[first:first + self.batch_size]]


def training_data(config: TrainConfig, image_size: int | None = None):
    """The training set at ``image_size`` (default ``--image-size``) and a description of its
    content (for the teacher cache): an image folder (``--data``, camera-capture augmented) or the
    built-in synthetic documents."""
    size = image_size or config.image_size
    if config.data is not None:
        data = ImageFolderDataset(config.data, config.data_layout, size, LISTING_CACHE, augment=True,
                                  framing=config.framing)
        listing = hashlib.sha1("\n".join(data.paths).encode()).hexdigest()
        return data, {"folder": str(Path(config.data).resolve()), "layout": config.data_layout, "listing": listing,
                      "framing": config.framing}
    identity = {"synthetic": [config.synthetic, config.train_types, config.per_type, config.seed, config.clean_views],
                "generator": [GENERATOR_VERSION, PROCEDURAL_VERSION], "framing": config.framing}
    if config.synthetic in DOCUMENT_SOURCES:
        return SyntheticDocuments(config.train_types, config.per_type, "train", size, config.seed,
                                  framing=config.framing, artwork=DOCUMENT_SOURCES[config.synthetic]), identity
    return ProceduralImages(config.train_types, config.per_type, config.synthetic, size, config.seed,
                            config.clean_views, config.framing), identity


class IndexedItems(torch.utils.data.Dataset):
    """``dataset``'s (image, label) plus the item's index, for the teacher feature lookup."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        return *self.dataset[item], item[0]
