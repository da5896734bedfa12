"""Fixed layout descriptors, appended to the learned document embedding (see
:class:`fastpfc.doc.model.DocumentEmbedder`).

Each part (a :class:`LayoutPart`) maps images ``[B, 3, H, W]`` float in [0, 1] to unit rows
``[B, channels * side * side]`` float32, computed from the central ``crop`` share of the image (a
photo's border is mostly background) average-pooled to ``side`` x ``side`` cells. A layout takes
some parts, each at one or several sides (a pyramid of cells: the coarse levels forgive more
misplacement by the camera, the fine ones tell more apart). The parts differ in which camera
changes they ignore:

- :data:`colour_layout`: each channel over its mean, so exposure and white balance (one gain per
  channel) cancel.
- :data:`chromaticity_layout`: each cell's share of each channel in its R + G + B, over the image's
  mean share, so any colourless light field (a lighting gradient, a shadow, glare that does not
  clip) cancels, and so does a colour cast. A grey picture has none.
- :data:`shading_free_layout`: the log of the cells with each channel's best-fitting plane over the
  cell grid removed, so exposure, white balance and a lighting gradient (linear in log) cancel.
- :data:`edge_layout`: how much edge of each orientation each cell holds (a coarse histogram of
  oriented gradients of the grey image), over the image's mean, so colour, exposure and contrast
  cancel and what is left is where the text lines, borders and picture outlines run.

:data:`LAYOUTS` names the combinations ``--layout`` offers; :func:`layout_embedding` computes one.
A layout may also be taken of the image turned a few degrees either way and averaged (its
``turns``): a camera's tilt then moves it less.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .baselines import unit_centred

#: Cells per side of a single-level layout, and the central share of the image's side every
#: layout is pooled from.
LAYOUT_SIDE, LAYOUT_CROP = 8, 0.7
#: Added to the cells (in [0, 1]) before ratios and logs, so dark cells stay finite and quiet.
_DARK = 0.02
#: Orientation bins over 0..180 degrees of :func:`oriented_edges`, and the side of the grey image it
#: takes gradients of (a smaller one than the input, so noise and JPEG blocks are averaged out).
EDGE_BINS, EDGE_RESOLUTION = 6, 64


def central_crop(images: torch.Tensor, crop: float = LAYOUT_CROP) -> torch.Tensor:
    """The central ``crop`` share of ``images`` [B, 3, H, W] (a photo's border is mostly
    background): [B, 3, H', W'] float32."""
    height, width = images.shape[-2:]
    rows, columns = (round(n * (1.0 - crop) / 2) for n in (height, width))
    return images[..., rows:height - rows, columns:width - columns].float()


def oriented_edges(images: torch.Tensor, crop: float = LAYOUT_CROP) -> torch.Tensor:
    """How much edge of each orientation each pixel holds: the central ``crop`` in grey at
    ``EDGE_RESOLUTION``², its gradient (central differences) split by orientation into
    ``EDGE_BINS`` bins, each gradient shared between its two nearest bins in proportion to
    closeness and weighted by its magnitude: [B, EDGE_BINS, R, R] float32."""
    grey = F.adaptive_avg_pool2d(central_crop(images, crop), EDGE_RESOLUTION).mean(dim=1, keepdim=True)
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    dx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    dy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    magnitude = torch.sqrt(dx * dx + dy * dy)
    orientation = torch.remainder(torch.atan2(dy, dx), math.pi)  # edges have no sign: 0..pi
    width = math.pi / EDGE_BINS
    centres = torch.arange(EDGE_BINS, dtype=grey.dtype, device=grey.device).view(1, EDGE_BINS, 1, 1) * width
    distance = (orientation - centres).abs()
    distance = torch.minimum(distance, math.pi - distance)  # around the circle: 170 degrees is near 0
    return magnitude * (1 - distance / width).clamp(min=0)


def _colour(cells: torch.Tensor) -> torch.Tensor:
    """Each channel divided by its mean, centred, unit."""
    return unit_centred(cells / (cells.mean(dim=(2, 3), keepdim=True) + _DARK))


def _chromaticity(cells: torch.Tensor) -> torch.Tensor:
    """Each cell's share of each channel (R, G, B over their sum), divided by the image's mean
    share, centred, unit."""
    cells = cells + _DARK
    shares = cells / cells.sum(dim=1, keepdim=True)
    return unit_centred(shares / shares.mean(dim=(2, 3), keepdim=True))


def _shading_free(cells: torch.Tensor) -> torch.Tensor:
    """The log of the cells, each channel's least-squares plane a + b·x + c·y over the cell grid
    removed, centred, unit."""
    logs = torch.log(cells + _DARK)  # [B, 3, side, side]
    side = logs.shape[-1]
    ramp = torch.arange(side, dtype=logs.dtype, device=logs.device) * (2.0 / max(side - 1, 1)) - 1.0
    across, down = ramp.view(1, 1, 1, side), ramp.view(1, 1, side, 1)
    # on this symmetric grid 1, x and y are orthogonal, so the plane is three separate projections
    squares = side * (ramp * ramp).sum()
    plane = (logs.mean(dim=(2, 3), keepdim=True) + across * (logs * across).sum(dim=(2, 3), keepdim=True) / squares
             + down * (logs * down).sum(dim=(2, 3), keepdim=True) / squares)
    return unit_centred(logs - plane)


def _edges(cells: torch.Tensor) -> torch.Tensor:
    """The oriented edges of each cell over the mean of all of them, square-rooted (so a few
    strong edges do not drown the rest), centred, unit."""
    return unit_centred((cells / (cells.mean(dim=(1, 2, 3), keepdim=True) + 1e-6)).sqrt())


@dataclass(frozen=True)
class LayoutPart:
    """One descriptor of a layout: ``source`` maps images [B, 3, H, W] and the crop share to a
    map [B, channels, H', W'], ``describe`` maps that map average-pooled to side x side cells to a
    unit row. A layout computes each source once, whatever the sides it pools it to.
    ``part(images, side, crop)`` gives [B, channels * side * side] float32."""

    source: Callable[[torch.Tensor, float], torch.Tensor]
    describe: Callable[[torch.Tensor], torch.Tensor]
    channels: int

    def __call__(self, images: torch.Tensor, side: int = LAYOUT_SIDE, crop: float = LAYOUT_CROP) -> torch.Tensor:
        return self.at_side(self.source(images, crop), side)

    def at_side(self, source_map: torch.Tensor, side: int) -> torch.Tensor:
        """The description of ``source_map`` (what ``source`` gave) average-pooled to side x side cells."""
        return self.describe(F.adaptive_avg_pool2d(source_map, side))


colour_layout = LayoutPart(central_crop, _colour, 3)
chromaticity_layout = LayoutPart(central_crop, _chromaticity, 3)
shading_free_layout = LayoutPart(central_crop, _shading_free, 3)
edge_layout = LayoutPart(oriented_edges, _edges, EDGE_BINS)


#: Cells per side of the levels of the pyramid layouts, each an equal share of its part.
PYRAMID_SIDES = (4, 6, 8)
#: One level of a layout: a part, its share of the layout's cosine, its cells per side.
Level = tuple[LayoutPart, float, int]

_PHOTOMETRIC_AND_EDGES = ((colour_layout, 1 / 6), (chromaticity_layout, 1 / 6), (shading_free_layout, 1 / 6),
                          (edge_layout, 1 / 2))
#: The edges at two thirds and the photometric parts at a ninth each (round 14: with
#: ``mobilenetv3_small_050``'s learned part beside it, above the even split in 120 of 144 numbers).
_EDGE_WEIGHTED = ((colour_layout, 1 / 9), (chromaticity_layout, 1 / 9), (shading_free_layout, 1 / 9),
                  (edge_layout, 2 / 3))


def _levels(parts, sides: tuple[int, ...] = (LAYOUT_SIDE,)) -> tuple[Level, ...]:
    """(part, share) pairs as levels at every side of ``sides``, sharing the part's share equally."""
    return tuple((part, share / len(sides), side) for part, share in parts for side in sides)


@dataclass(frozen=True)
class Layout:
    """A layout: its ``levels``, and the ``turns`` (degrees) by which the image is also turned,
    each way, before the levels are taken; the layout is then the unit mean over the image and its
    turned copies."""

    levels: tuple[Level, ...]
    turns: tuple[float, ...] = ()


#: Layouts by the name ``--layout`` takes. ``colour`` is what runs before ``--layout`` existed
#: used; ``lighting_robust_edges`` gives half to the three photometric parts and half to the edges,
#: all at 8 x 8; ``lighting_robust_edges_pyramid`` is that at 4 x 4, 6 x 6 and 8 x 8, a third each;
#: ``edge_weighted_pyramid`` (the default) is the pyramid with the edges at two thirds and the
#: photometric parts at a third, averaged over the image and the image turned 7 degrees either way.
LAYOUTS: dict[str, Layout] = {
    "colour": Layout(_levels(((colour_layout, 1.0),))),
    "lighting_robust": Layout(_levels(((colour_layout, 1 / 3), (chromaticity_layout, 1 / 3),
                                       (shading_free_layout, 1 / 3)))),
    "lighting_robust_edges": Layout(_levels(_PHOTOMETRIC_AND_EDGES)),
    "lighting_robust_edges_pyramid": Layout(_levels(_PHOTOMETRIC_AND_EDGES, PYRAMID_SIDES)),
    "edge_weighted_pyramid": Layout(_levels(_EDGE_WEIGHTED, PYRAMID_SIDES), turns=(7.0,)),
}


def layout_size(name: str) -> int:
    """Dimensions of layout ``name``: channels x side x side summed over its parts and levels."""
    return sum(part.channels * side * side for part, _, side in LAYOUTS[name].levels)


@functools.lru_cache(maxsize=16)
def _turn_grid(height: int, width: int, degrees: float) -> np.ndarray:
    """The [1, height, width, 2] float32 sampling grid of ``F.grid_sample`` (align_corners=False)
    that turns an image by ``degrees`` about its centre, in pixels whatever its aspect. A numpy
    array, not a tensor: a tensor cached while ``torch.export`` traces would be a fake one."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    y, x = np.meshgrid((2 * np.arange(height) + 1) / height - 1, (2 * np.arange(width) + 1) / width - 1,
                       indexing="ij")
    grid = np.stack([c * x - s * (height / width) * y, s * (width / height) * x + c * y], axis=-1)
    return grid[None].astype(np.float32)


def turned(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """``images`` [B, C, H, W] turned by ``degrees`` about their centre (bilinear; the border
    repeated where the turn brings in what lay outside): [B, C, H, W] float32."""
    grid = torch.as_tensor(_turn_grid(*images.shape[-2:], float(degrees)), device=images.device)
    return F.grid_sample(images.float(), grid.expand(images.shape[0], -1, -1, -1), mode="bilinear",
                         padding_mode="border", align_corners=False)


def _levels_embedding(images: torch.Tensor, levels: tuple[Level, ...]) -> torch.Tensor:
    """``levels`` of ``images`` side by side, each (a unit row) times the square root of its share;
    each part's source is computed once."""
    sources: dict[Callable, torch.Tensor] = {}
    rows = []
    for part, share, side in levels:
        if part.source not in sources:
            sources[part.source] = part.source(images, LAYOUT_CROP)
        rows.append(part.at_side(sources[part.source], side) * share ** 0.5)
    return torch.cat(rows, dim=1)


def layout_embedding(images: torch.Tensor, name: str) -> torch.Tensor:
    """Layout ``name`` of ``images`` [B, 3, H, W]: its parts' levels side by side, each (a unit
    row) times the square root of its share, so rows stay unit and each level contributes its
    share of a cosine; with ``turns``, the unit mean of that over the image and its turned copies:
    [B, layout_size(name)] float32."""
    layout = LAYOUTS[name]
    embedding = _levels_embedding(images, layout.levels)
    if not layout.turns:
        return embedding
    for degrees in layout.turns:
        for sign in (-1.0, 1.0):
            embedding = embedding + _levels_embedding(turned(images, sign * degrees), layout.levels)
    return F.normalize(embedding, dim=1)


def layout_baseline(layout_weight: float, name: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """``{"layout": layout name alone}`` when an embedding appends it (``layout_weight`` > 0), else
    ``{}``: the floor that shows what the learned part adds to the layout."""
    return {"layout": functools.partial(layout_embedding, name=name)} if layout_weight else {}
