"""Embeddings that learn nothing, the floors every learned number is shown beside.

Each maps images ``[B, 3, S, S]`` float in [0, 1] to L2-normalised rows ``[B, D]`` float32, like a
trained embedder, so :func:`fastpfc.doc.evaluation.evaluate_embedder` scores them the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

_GREY_WEIGHTS = (0.299, 0.587, 0.114)


def unit_centred(features: torch.Tensor) -> torch.Tensor:
    """Rows of ``features`` [B, ...] flattened, minus their own mean, L2-normalised (cosine then is
    a correlation coefficient): [B, D] float32."""
    features = features.flatten(1).float()
    return F.normalize(features - features.mean(dim=1, keepdim=True), dim=1)


def raw_pixels(images: torch.Tensor, side: int = 32) -> torch.Tensor:
    """Greyscale pixels at ``side`` x ``side``: [B, side * side]."""
    grey = torch.einsum("bchw,c->bhw", images.float(), images.new_tensor(_GREY_WEIGHTS).float())
    return unit_centred(F.interpolate(grey[:, None], size=(side, side), mode="area"))


def colour_thumbnail(images: torch.Tensor, side: int = 16) -> torch.Tensor:
    """RGB pixels at ``side`` x ``side``: [B, 3 * side * side]."""
    return unit_centred(F.interpolate(images.float(), size=(side, side), mode="area"))


def _hsv(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> hue, saturation, value in [0, 1]."""
    value, brightest = images.max(dim=1)
    spread = value - images.min(dim=1).values
    saturation = torch.where(value > 0, spread / value.clamp_min(1e-12), torch.zeros_like(value))
    red, green, blue = images.unbind(1)
    safe = spread.clamp_min(1e-12)
    hue = torch.stack([(green - blue) / safe, 2 + (blue - red) / safe, 4 + (red - green) / safe]).gather(
        0, brightest[None]).squeeze(0)
    hue = torch.where(spread > 0, (hue / 6) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value], dim=1)


def colour_histogram(images: torch.Tensor, bins: tuple[int, int, int] = (8, 8, 4)) -> torch.Tensor:
    """Joint HSV histogram (8 x 8 x 4 bins), square-rooted (Hellinger): [B, 256]."""
    hsv = _hsv(images.float())
    sizes = torch.tensor(bins, device=images.device)
    cells = (hsv * sizes[None, :, None, None]).long().clamp_max(sizes[None, :, None, None] - 1)
    flat = (cells[:, 0] * bins[1] + cells[:, 1]) * bins[2] + cells[:, 2]
    count = bins[0] * bins[1] * bins[2]
    histogram = torch.stack([torch.bincount(row.flatten(), minlength=count) for row in flat]).float()
    return F.normalize(histogram.sqrt(), dim=1)


#: The baselines by the name they carry in eval.json and printed summaries.
BASELINES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "raw_pixels": raw_pixels,
    "colour_thumbnail": colour_thumbnail,
    "colour_histogram": colour_histogram,
}
