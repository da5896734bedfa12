"""Input checks with clear errors, instead of device-side asserts or silent NaNs."""

from __future__ import annotations

import numbers

import torch

#: The dtypes the Triton kernels take; backend 'auto' sends float64 to the torch backend.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_EMBEDDING_DTYPES = (*TRITON_DTYPES, torch.float64)


def flat_labels(labels):
    """``[B, 1]`` labels (insightface's loaders give them) as ``[B]``; anything else unchanged."""
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] == 1:
        return labels.reshape(-1)
    return labels


def check_constructor_arguments(embedding_size, num_classes, margin, sample_rate) -> None:
    """Types of ``PartialFCLoss``'s leading arguments, with what to write instead of an
    insightface-style call (``PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate,
    fp16)``) or an insightface margin module."""
    from .margins import Margin

    if isinstance(embedding_size, torch.nn.Module) or callable(embedding_size):
        raise TypeError(
            f"PartialFCLoss(embedding_size, num_classes, margin=..., sample_rate=...) got a "
            f"{type(embedding_size).__name__} as embedding_size: this looks like insightface's argument order "
            "PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate, fp16). Write "
            "PartialFCLoss(embedding_size, num_classes, margin=..., sample_rate=...) with margin_list (1, m, 0) as "
            "ArcFace(s, m, straight_through=True) and (1, 0, m) as CosFace(s, m) (docs/insightface.md); fp16 "
            "follows the embeddings' dtype")
    for name, value in (("embedding_size", embedding_size), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # NumPy integers are fine
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if margin is not None and not isinstance(margin, Margin):
        raise TypeError(
            f"margin must be a fastpfc margin (CosFace, ArcFace, CombinedMargin, Softmax), got "
            f"{type(margin).__name__}: a module that edits a logits matrix (such as insightface's "
            "CombinedMarginLoss) cannot run inside the fused kernels, which never build that matrix. "
            "insightface's margin_list (1, m, 0) is ArcFace(s, m, straight_through=True), (1, 0, m) is "
            "CosFace(s, m) (docs/insightface.md)")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
        raise TypeError(f"sample_rate must be a number in (0, 1], got {type(sample_rate).__name__} {sample_rate!r}")


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


def check_sample(index: torch.Tensor | None, target_pos: torch.Tensor | None, labels: torch.Tensor) -> None:
    """Types, shapes and devices of a sample ``index`` [C] and ``target_pos`` [B]: metadata only."""
    for name, tensor, length in (("index", index, None), ("target_pos", target_pos, labels.shape[0])):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.dtype.is_floating_point or tensor.dtype.is_complex \
                or tensor.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor (int64), got "
                            f"{tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
        if tensor.dim() != 1 or (length is not None and tensor.shape[0] != length):
            raise ValueError(f"{name} must have shape [{'C' if length is None else length}], got {list(tensor.shape)}")
        if tensor.device != labels.device:
            raise ValueError(f"{name} is on {tensor.device} but the labels are on {labels.device}")


def check_values(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 index: torch.Tensor | None = None, target_pos: torch.Tensor | None = None) -> None:
    """Label range, finite embeddings and (given ``index``) a usable sample, with one host sync.

    ``index`` must be sorted, unique, within ``[0, num_classes)`` and hold every label;
    ``target_pos``, if given, must point at each row's label in ``index`` (or be the label itself
    without an index). Labels of any integer dtype are compared as int64.
    """
    labels = labels.to(torch.int64).contiguous()
    checks = [labels.min() < 0, labels.max() >= num_classes, ~torch.isfinite(embeddings).all()]
    if index is not None:
        if index.numel() == 0:
            raise ValueError("index is empty, but every label must be among the sampled classes in index")
        index = index.to(torch.int64).contiguous()
        position = torch.searchsorted(index, labels).clamp_max(index.numel() - 1)
        checks += [(index[1:] <= index[:-1]).any(), (index.min() < 0) | (index.max() >= num_classes),
                   (index[position] != labels).any()]
    if target_pos is not None:
        size = num_classes if index is None else index.numel()
        target_pos = target_pos.to(torch.int64)
        inside = (target_pos >= 0) & (target_pos < size)
        found = target_pos.clamp(0, size - 1) if index is None else index[target_pos.clamp(0, size - 1)]
        checks.append((~inside | (found != labels)).any())
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
    if target_pos is not None and flags[-1]:
        raise ValueError("target_pos must give each row's label position "
                         + ("in index (index[target_pos] == labels)" if index is not None else "(== labels)"))
