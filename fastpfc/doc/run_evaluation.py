"""The evaluations a ``train.py`` run reports: unseen synthetic types (or an ``--eval-data``
folder) and the real-image check, each image rendered or read once per run and kept for the run's
later evaluations (the untrained network before training; the trained one and the baselines after)."""

from __future__ import annotations

import functools

import torch

from .config import TrainConfig
from .embedders import model_identity
from .evaluation import evaluate_embedders, registration_split
from .folders import LISTING_CACHE, ImageFolderDataset
from .model import DocumentEmbedder
from .real_images import real_image_check
from .synthetic import SyntheticDocuments


def evaluation_data(config: TrainConfig):
    """(queries, gallery, gallery labels): the first half of the classes is registered with one
    image each (a clean render for synthetic types, the first image of the class for a folder);
    the other half must be rejected."""
    if config.eval_data is not None:
        queries = ImageFolderDataset(config.eval_data, "subfolders", config.image_size, LISTING_CACHE)
        return registration_split(queries)
    queries = SyntheticDocuments(config.eval_types, config.eval_per_type, "eval", config.image_size, config.seed)
    clean = SyntheticDocuments(config.eval_types, 1, "eval", config.image_size, config.seed, clean=True)
    registered = list(range(config.eval_types // 2))
    return queries, torch.utils.data.Subset(clean, registered), registered


class Preloaded(torch.utils.data.Dataset):
    """The items of ``dataset`` (8-bit pictures as [3, S, S] float in [0, 1], label), read once and
    kept as uint8 (one byte per value: 49 KB per 128 px image); items come back bit for bit."""

    def __init__(self, dataset) -> None:
        pixels, labels = [], []
        for index in range(len(dataset)):
            image, label = dataset[index]
            byte = image.mul(255.0).round_().to(torch.uint8)
            if not torch.equal(byte.float().div_(255.0), image):
                raise ValueError(f"item {index} of {type(dataset).__name__} is not an 8-bit picture")
            pixels.append(byte)
            labels.append(label)
        self.pixels, self.labels = torch.stack(pixels), labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.pixels[index].float().div_(255.0), self.labels[index]


def preload(queries, gallery, registered: list[int]) -> tuple:
    """:class:`Preloaded` queries and gallery; a gallery that is a ``Subset`` of the queries stays
    one (of the preloaded queries), as :func:`evaluate_embedders` expects."""
    loaded = Preloaded(queries)
    if isinstance(gallery, torch.utils.data.Subset) and gallery.dataset is queries:
        return loaded, torch.utils.data.Subset(loaded, gallery.indices), registered
    return loaded, Preloaded(gallery), registered


#: The real-image checks a run reports beside the synthetic evaluation: the key of each in a
#: result (eval.json) -> whether its photographs are taken under harsh light.
REAL_CHECKS = {"real_images": False, "real_images_harsh_light": True}


class EvaluationSets:
    """A run's evaluation images, each read at its first use and then kept: ``synthetic``
    (:func:`evaluation_data`) and ``real`` (the real-image checks by their :data:`REAL_CHECKS`
    key; empty with ``--real-captures 0``), as (queries, gallery, registered) triples."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    @functools.cached_property
    def synthetic(self) -> tuple:
        return preload(*evaluation_data(self.config))

    @functools.cached_property
    def real(self) -> dict[str, tuple]:
        config = self.config
        if not config.real_captures:
            return {}
        return {key: preload(*real_image_check(config.image_size, config.real_captures, config.seed, harsh_light))
                for key, harsh_light in REAL_CHECKS.items()}


def evaluate(embedders: dict, sets: EvaluationSets) -> dict:
    """Each embedder's (name -> images [B, 3, S, S] -> unit rows) TPR@FPR over all pairs of the
    evaluation images (unseen classes) and registration accuracy at the FPR=1e-4 threshold (see
    :func:`evaluation_data`), with the same for each real-image check under its
    :data:`REAL_CHECKS` key when ``--real-captures`` is not 0."""
    results = evaluate_embedders(embedders, *sets.synthetic)
    for key, data in sets.real.items():
        real = evaluate_embedders(embedders, *data)
        for name, result in results.items():
            result[key] = real[name]
    return results


def evaluate_model(model: DocumentEmbedder, sets: EvaluationSets, device: torch.device) -> dict:
    """:func:`evaluate` of ``model``, with its ``model_id`` (which ties eval.json's thresholds to
    these weights)."""
    model.eval()
    result = evaluate({"model": lambda images: model.embed(images.to(device))}, sets)["model"]
    return {"model_id": model_identity(model), **result}
