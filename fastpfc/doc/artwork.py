"""Formula-drawn pictures: the artwork of the built-in training images, with no download.

* :func:`fractal_art`: an iterated function system (2-4 random contractive affine maps,
  FractalDB-style), its attractor drawn by the chaos game, coloured by the map that placed each
  point, over a gradient;
* :func:`dead_leaves_art`: occluding discs, boxes and polygons with power-law sizes in one palette
  (the "dead leaves" image model of natural-image statistics);
* :func:`gradient`: a linear gradient between two colours.

Each takes a ``numpy`` generator, so a picture is reproducible from whatever seeds it.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw


def palette(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` RGB colours in [0, 1] around one or two random hues: [count, 3]."""
    hues = rng.random() + rng.choice((0.0, 0.33, 0.5)) * rng.integers(0, 2, count) + rng.normal(0, 0.05, count)
    return np.array([colorsys.hsv_to_rgb(h % 1.0, rng.uniform(0.35, 1.0), rng.uniform(0.35, 1.0)) for h in hues])


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))


def gradient(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A linear gradient between two random colours, computed on a coarse grid and resized."""
    start, stop = palette(rng, 2)
    angle = rng.uniform(0, 2 * np.pi)
    coarse_w, coarse_h = min(width, 16), min(height, 16)
    t = np.cos(angle) * np.linspace(0, 1, coarse_w)[None, :] + np.sin(angle) * np.linspace(0, 1, coarse_h)[:, None]
    t = ((t - t.min()) / max(float(np.ptp(t)), 1e-6))[..., None]
    return _to_image(start * (1 - t) + stop * t).resize((width, height), Image.BILINEAR)


def _rotation(angle: np.ndarray) -> np.ndarray:
    """[K, 2, 2] rotations by ``angle`` [K] radians."""
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)


def _ifs(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(maps [K, 2, 2], shifts [K, 2], probabilities [K]) of a contractive IFS whose attractor is
    neither dust, nor thin streaks, nor a filled blob: each map a rotation, an axis scaling by
    singular values in [0.2, 0.9] (one axis mirrored at random) and a rotation, the summed area
    ratio |det| in [0.4, 1.1]."""
    while True:
        count = int(rng.integers(2, 5))
        singular = rng.uniform(0.2, 0.9, (count, 2))
        areas = singular.prod(axis=1)
        if 0.4 <= areas.sum() <= 1.1:
            break
    mirror = np.where(rng.random(count) < 0.5, -1.0, 1.0)
    scale = np.zeros((count, 2, 2))
    scale[:, 0, 0], scale[:, 1, 1] = singular[:, 0] * mirror, singular[:, 1]
    maps = _rotation(rng.uniform(0, 2 * np.pi, count)) @ scale @ _rotation(rng.uniform(0, 2 * np.pi, count))
    return maps, rng.uniform(-1, 1, (count, 2)), (areas + 0.03) / (areas + 0.03).sum()


def fractal_art(rng: np.random.Generator, width: int, height: int, points: int = 20_000) -> Image.Image:
    """An IFS attractor over a gradient. The points are binned at half resolution, which draws
    them two pixels wide."""
    full_width, full_height = width, height
    width, height = max(1, width // 2), max(1, height // 2)
    maps, shifts, probabilities = _ifs(rng)
    chains, burn_in = 1024, 6
    steps = burn_in + points // chains
    x = rng.uniform(-1, 1, (chains, 2))
    choices = rng.choice(len(probabilities), size=(steps, chains), p=probabilities)
    placed, which = [], []
    for step in range(steps):
        k = choices[step]
        x = np.einsum("cij,cj->ci", maps[k], x) + shifts[k]
        if step >= burn_in:
            placed.append(x)
            which.append(k)
    xy, which = np.concatenate(placed), np.concatenate(which)
    low, high = np.percentile(xy, 0.5, axis=0), np.percentile(xy, 99.5, axis=0)
    margin = rng.uniform(0.03, 0.15)
    span = np.maximum(high - low, 1e-6)
    column = ((xy[:, 0] - low[0]) / span[0] * (1 - 2 * margin) + margin) * (width - 1)
    row = ((xy[:, 1] - low[1]) / span[1] * (1 - 2 * margin) + margin) * (height - 1)
    inside = (column >= 0) & (column < width) & (row >= 0) & (row < height)
    cell = row[inside].astype(np.int64) * width + column[inside].astype(np.int64)
    colours = palette(rng, len(probabilities))[which[inside]]
    density = np.bincount(cell, minlength=width * height).astype(np.float32)
    paint = np.stack([np.bincount(cell, colours[:, c], width * height) for c in range(3)], axis=1)
    paint = (paint / np.maximum(density, 1)[:, None]).reshape(height, width, 3)
    coverage = 1 - np.exp(-density.reshape(height, width) * rng.uniform(0.3, 1.5))
    paint = _to_image(paint).resize((full_width, full_height), Image.BILINEAR)
    mask = Image.fromarray((coverage * 255).astype(np.uint8)).resize((full_width, full_height), Image.BILINEAR)
    return Image.composite(paint, gradient(rng, full_width, full_height), mask)


def dead_leaves_art(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Occluding shapes with power-law radii (density ~ r^-3) in a class palette."""
    picture_palette = palette(rng, int(rng.integers(3, 8))) * 255
    count = int(rng.integers(80, 200))
    side = max(width, height)
    small, large = 0.02 * side, rng.uniform(0.25, 0.6) * side
    radii = (small ** -2 - rng.random(count) * (small ** -2 - large ** -2)) ** -0.5
    centres = rng.uniform(-0.1, 1.1, (count, 2)) * (width, height)
    picks = picture_palette[rng.integers(len(picture_palette), size=count)]
    colours = np.clip(picks + rng.normal(0, 18, (count, 3)), 0, 255)
    shapes, squash = rng.integers(3, size=count), rng.uniform(0.3, 1.0, count)
    corners = np.sort(rng.uniform(0, 2 * np.pi, (count, 5)), axis=1)
    sides = rng.integers(3, 6, size=count)
    image = Image.new("RGB", (width, height), tuple(int(c) for c in picture_palette[0]))
    draw = ImageDraw.Draw(image)
    for (cx, cy), radius, colour, shape, flat, angles, n in zip(centres, radii, colours.astype(int).tolist(), shapes,
                                                                 squash, corners, sides, strict=True):
        box = (cx - radius, cy - radius * flat, cx + radius, cy + radius)
        if shape == 0:
            draw.ellipse(box, fill=tuple(colour))
        elif shape == 1:
            draw.rectangle(box, fill=tuple(colour))
        else:
            draw.polygon(list(zip(cx + radius * np.cos(angles[:n]), cy + radius * np.sin(angles[:n]), strict=True)),
                         fill=tuple(colour))
    return image
