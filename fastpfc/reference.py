"""The plain, unfused implementation: the oracle for tests and the baseline for benchmarks.

It does what the standard PartialFC code does: normalize, gather the sampled centers, build the
full [B, C] cosine matrix, clamp, put the margin on the target logit, scale, cross entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .margins import Margin


def reference_partial_fc_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: Margin,
    index: torch.Tensor | None = None,
    reduction: str = "mean",
    interclass_filtering_threshold: float = 0.0,
) -> torch.Tensor:
    """Same contract as :func:`fastpfc.functional.partial_fc_loss`, materializing the [B, C] logits.

    Like the standard code under autocast, the matmul runs in the dtype of ``embeddings`` (the
    centers are cast to it) and everything after it in fp32 (fp64 for fp64 inputs). Inter-class
    filtering is insightface's: non-target cosines above the threshold are multiplied by a 0 that
    carries no gradient.
    """
    centers = weight if index is None else weight[index]
    targets = labels if index is None else torch.searchsorted(index, labels)
    cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(centers, dim=1).to(embeddings.dtype))
    cos = cos.to(torch.promote_types(cos.dtype, torch.float32)).clamp(-1, 1)
    if interclass_filtering_threshold > 0:
        with torch.no_grad():
            keep = (cos <= interclass_filtering_threshold).scatter(1, targets[:, None], True)
        cos = cos * keep
    target_logit = margin(cos.gather(1, targets[:, None]).squeeze(1))
    logits = (cos * margin.scale).scatter(1, targets[:, None], target_logit[:, None])
    return F.cross_entropy(logits, targets, reduction=reduction)
