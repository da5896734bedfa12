"""Embeddings that learn nothing, the floors every learned number is shown beside.

Each maps images ``[B, 3, S, S]`` float in [0, 1] to L2-normalised rows ``[B, D]`` float32, like a
trained embedder, so :func:`fastpfc.doc.evaluation.evaluate_embedder` scores them the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

_GREY_WEIGHTS = (0.299, 0.587, 0.114)


def _unit_centred(features: torch.Tensor) -> torch.Tensor:
    """Rows minus their own mean, L2-normalised (cosine then is a correlation coefficient)."""
    features = features.flatten(1).float()
    return F.normalize(features - features.mean(dim=1, keepdim=True), dim=1)


def raw_pixels(images: torch.Tensor, side: int = 32) -> torch.Tensor:
    """Greyscale pixels at ``side`` x ``side``: [B, side * side]."""
    grey = torch.einsum("bchw,c->bhw", images.float(), images.new_tensor(_GREY_WEIGHTS).float())
    return _unit_centred(F.interpolate(grey[:, None], size=(side, side), mode="area"))


def colour_thumbnail(images: torch.Tensor, side: int = 16) -> torch.Tensor:
    """RGB pixels at ``side`` x ``side``: [B, 3 * side * side]."""
    return _unit_centred(F.interpolate(images.float(), size=(side, side), mode="area"))


#: Side of the fixed colour layout that the document embedding appends (see
#: :class:`fastpfc.doc.model.DocumentEmbedder`), and the share of the image's side it is pooled
#: from (the central square: a photo's border is mostly background).
LAYOUT_SIDE, LAYOUT_CROP = 8, 0.7


def colour_layout(images: torch.Tensor, side: int = LAYOUT_SIDE, crop: float = LAYOUT_CROP) -> torch.Tensor:
    """A fixed descriptor: the central ``crop`` share of ``images`` [B, 3, H, W] average-pooled to
    ``side`` x ``side``, each channel divided by its mean (a camera's exposure and white balance
    undone), the mean removed, L2-normalised: [B, 3 * side * side] float32."""
    height, width = images.shape[-2:]
    rows, columns = (round(n * (1.0 - crop) / 2) for n in (height, width))
    pooled = F.adaptive_avg_pool2d(images[..., rows:height - rows, columns:width - columns].float(), side)
    return _unit_centred(pooled / (pooled.mean(dim=(2, 3), keepdim=True) + 0.02))


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
