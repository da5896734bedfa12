"""PartialFC class-center sampling: keep every positive class, fill up with uniform negatives."""

from __future__ import annotations

import torch


def num_sampled(num_classes: int, sample_rate: float, num_positives: int) -> int:
    """``max(int(sample_rate * num_classes), num_positives)``, capped at ``num_classes``, at least 1."""
    return min(num_classes, max(int(sample_rate * num_classes), num_positives, 1))


def sample_centers(
    labels: torch.Tensor, num_classes: int, sample_rate: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the class centers for one step.

    Every class in ``labels`` is kept; the remaining slots are filled with classes drawn uniformly
    without replacement from the others, using ``generator`` only (never the global RNG).

    Args:
        labels: int64 [B], values in ``[0, num_classes)``.
        num_classes: number of classes to sample from.
        sample_rate: fraction of classes to keep, in ``(0, 1]``.
        generator: a ``torch.Generator`` on ``labels.device``.

    Returns:
        ``index``: int64 [C_sampled], sorted, unique class ids;
        ``target_pos``: int64 [B], the position of each label in ``index``.
    """
    positives = torch.unique(labels)
    num_sample = num_sampled(num_classes, sample_rate, positives.numel())
    scores = torch.rand(num_classes, generator=generator, device=labels.device)
    scores[positives] = 2.0  # above any uniform draw: positives always win the top-k
    index = torch.topk(scores, num_sample, sorted=False).indices.sort().values
    return index, torch.searchsorted(index, labels)
