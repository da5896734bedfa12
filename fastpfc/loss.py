"""``PartialFCLoss``: the drop-in loss module that owns, samples and trains the class centers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .functional import BACKENDS, REDUCTIONS, partial_fc_loss
from .margins import CosFace, Margin
from .sampling import sample_centers
from .validation import check_shapes, check_values


class PartialFCLoss(nn.Module):
    """Margin softmax (ArcFace, CosFace, ...) over many classes with PartialFC center sampling.

    Example::

        loss_fn = PartialFCLoss(embedding_size=512, num_classes=1_300_000,
                                margin=CosFace(s=64.0, m=0.4), sample_rate=0.3)
        loss = loss_fn(embeddings, labels)  # embeddings [B, 512] fp32/fp16/bf16, labels [B] int64
        loss.backward()                     # grads reach the embeddings and loss_fn.weight

    Args:
        embedding_size: D, the embedding dimension.
        num_classes: C, the number of classes (rows of ``weight``).
        margin: the target-logit margin; default ``CosFace(s=64, m=0.4)``.
        sample_rate: fraction of classes used per call. Every class present in the batch is kept
            and the other slots are uniform random negatives, ``max(int(rate * C), #positives)``
            in all. ``1.0`` is the exact full softmax, with no sampling work at all.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        backend: ``'auto'`` (Triton for CUDA tensors, torch otherwise), ``'triton'`` or ``'torch'``.
        validate: check label range and finite embeddings on every call (one host sync).
        seed: seed of the module's own sampling generator; ``None`` draws one from the global RNG
            at construction. The generator state is part of ``state_dict()``, so a resumed run
            samples exactly what the uninterrupted run would have.

    Attributes:
        weight: ``nn.Parameter`` [num_classes, embedding_size], fp32, initialised N(0, 0.01).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: Margin | None = None,
        sample_rate: float = 1.0,
        reduction: str = "mean",
        backend: str = "auto",
        validate: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(f"embedding_size and num_classes must be positive, got {embedding_size}, {num_classes}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.margin = margin if margin is not None else CosFace()
        self.sample_rate, self.reduction, self.backend, self.validate = sample_rate, reduction, backend, validate
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, embedding_size)))
        self.seed = seed if seed is not None else int(torch.randint(2**62, ()).item())
        self._generator: torch.Generator | None = None
        self._saved_generator_state: dict[str, Any] | None = None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of ``embeddings`` [B, D] with class ids ``labels`` [B]: scalar, or [B] fp32 for 'none'."""
        check_shapes(embeddings, labels, self.weight)
        if self.validate and labels.numel() > 0:
            check_values(embeddings, labels, self.num_classes)
        labels = labels.long()
        index = target_pos = None
        if self.sample_rate < 1.0 and labels.numel() > 0:
            index, target_pos = sample_centers(labels, self.num_classes, self.sample_rate, self._sampler())
        return partial_fc_loss(embeddings, self.weight, labels, self.margin, index, target_pos,
                               self.reduction, self.backend)

    def _sampler(self) -> torch.Generator:
        """The sampling generator on the weight's device, created (and restored) on first use there."""
        device = self.weight.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            saved = self._saved_generator_state
            if saved is not None and saved["device_type"] == device.type:
                self._generator.set_state(saved["state"])
            else:
                self._generator.manual_seed(self.seed)
        return self._generator

    def get_extra_state(self) -> dict[str, Any]:
        state = {"seed": self.seed, "generator": self._saved_generator_state}
        if self._generator is not None:
            state["generator"] = {"device_type": self._generator.device.type, "state": self._generator.get_state()}
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self._saved_generator_state = state["generator"]
        self._generator = None

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, margin={self.margin}, "
                f"sample_rate={self.sample_rate}, reduction={self.reduction!r}, backend={self.backend!r}")
