"""Input checks with clear errors, instead of device-side asserts or silent NaNs."""

from __future__ import annotations

import torch

_EMBEDDING_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_shapes(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> None:
    """Types, shapes, dtypes and devices: metadata only, no host sync."""
    if not isinstance(embeddings, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"embeddings and labels must be tensors, got {type(embeddings).__name__} "
                        f"and {type(labels).__name__}")
    if embeddings.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(f"embeddings must have shape [batch, {weight.shape[1]}], got {list(embeddings.shape)}")
    if embeddings.dtype not in _EMBEDDING_DTYPES:
        raise TypeError(f"embeddings must be a float tensor (fp32/fp16/bf16/fp64), got {embeddings.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must have shape [{embeddings.shape[0]}] to match the embeddings, "
                         f"got {list(labels.shape)}")
    for name, tensor in (("embeddings", embeddings), ("labels", labels)):
        if tensor.device != weight.device:
            raise ValueError(f"{name} are on {tensor.device} but the class centers are on {weight.device}; "
                             "move the loss module with .to(device)")


def check_values(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 index: torch.Tensor | None = None) -> None:
    """Label range, finite embeddings and (given ``index``) a usable sample, with one host sync.

    ``index`` must be sorted, unique, within ``[0, num_classes)`` and hold every label.
    """
    checks = [labels.min() < 0, labels.max() >= num_classes, ~torch.isfinite(embeddings).all()]
    if index is not None:
        position = torch.searchsorted(index, labels).clamp_max(max(index.numel() - 1, 0))
        checks += [(index[1:] <= index[:-1]).any(), (index.min() < 0) | (index.max() >= num_classes),
                   (index[position] != labels).any()]
    flags = torch.stack(checks).tolist()
    if flags[0] or flags[1]:
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(f"labels must be in [0, {num_classes}); got {bad[:5].tolist()}"
                         f"{' ...' if bad.numel() > 5 else ''} ({bad.numel()} out of range)")
    if flags[2]:
        rows = (~torch.isfinite(embeddings)).any(dim=1).nonzero().flatten()
        raise ValueError(f"embeddings contain NaN or Inf in rows {rows[:5].tolist()}"
                         f"{' ...' if rows.numel() > 5 else ''}")
    if index is not None and (flags[3] or flags[4]):
        raise ValueError(f"index must hold sorted, unique class ids in [0, {num_classes})")
    if index is not None and flags[5]:
        raise ValueError("every label must be among the sampled classes in index")
