"""Formula-driven training images: as many classes as wanted, each one image reproducible from its id.

Three generators, each ``render(class_id) -> PIL RGB image``:

* ``fractal``: an iterated function system (2-4 random contractive affine maps, FractalDB-style),
  its attractor drawn by the chaos game, coloured by the map that placed each point, over a
  gradient background;
* ``dead_leaves``: occluding discs, boxes and polygons with power-law sizes in a class palette
  (the "dead leaves" image model of natural-image statistics);
* ``card``: a card, ID or form layout whose artwork, background and logo come from the two above,
  with header band, title and fields in one of matplotlib's bundled fonts, photo box, chip, barcode.

Every image is its own class (the "each ImageNet image a class" setting PartialFC is for); the
training loop sees them through :func:`fastpfc.doc.synthetic.capture`, the camera model.
:data:`SOURCES` names the mixes ``train.py --synthetic`` offers besides ``documents`` (the template /
instance generator of :mod:`fastpfc.doc.synthetic` alone, whose classes vary in their field text).
"""

from __future__ import annotations

import colorsys
import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .images import ClassItems, to_tensor
from .synthetic import EVAL_TYPE_OFFSET, DocumentType, capture

#: Bumped whenever the same id renders a different image (caches of derived data key on it).
PROCEDURAL_VERSION = 1
#: Fonts shipped inside matplotlib (mpl-data/fonts/ttf), used for card text.
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
              "DejaVuSansMono.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf")
_WORDS = ("NATIONAL", "REPUBLIC", "BANK", "UNION", "CREDIT", "CARD", "LICENSE", "PERMIT", "RESIDENT", "IDENTITY",
          "DRIVER", "HEALTH", "TAX", "POSTAL", "TRANSIT", "UNIVERSITY", "MEMBER", "CLUB", "PLATINUM", "GOLD")
_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"
SQUARE = 192  # side of fractal and dead-leaves images


def _rng(kind: str, class_id: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(kind.encode()), class_id, seed])


def _palette(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` RGB colours in [0, 1] around one or two random hues: [count, 3]."""
    hues = rng.random() + rng.choice((0.0, 0.33, 0.5)) * rng.integers(0, 2, count) + rng.normal(0, 0.05, count)
    return np.array([colorsys.hsv_to_rgb(h % 1.0, rng.uniform(0.35, 1.0), rng.uniform(0.35, 1.0)) for h in hues])


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))


def _gradient(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A linear gradient between two random colours, computed on a coarse grid and resized."""
    start, stop = _palette(rng, 2)
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
    colours = _palette(rng, len(probabilities))[which[inside]]
    density = np.bincount(cell, minlength=width * height).astype(np.float32)
    paint = np.stack([np.bincount(cell, colours[:, c], width * height) for c in range(3)], axis=1)
    paint = (paint / np.maximum(density, 1)[:, None]).reshape(height, width, 3)
    coverage = 1 - np.exp(-density.reshape(height, width) * rng.uniform(0.3, 1.5))
    paint = _to_image(paint).resize((full_width, full_height), Image.BILINEAR)
    mask = Image.fromarray((coverage * 255).astype(np.uint8)).resize((full_width, full_height), Image.BILINEAR)
    return Image.composite(paint, _gradient(rng, full_width, full_height), mask)


def dead_leaves_art(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Occluding shapes with power-law radii (density ~ r^-3) in a class palette."""
    palette = _palette(rng, int(rng.integers(3, 8))) * 255
    count = int(rng.integers(80, 200))
    side = max(width, height)
    small, large = 0.02 * side, rng.uniform(0.25, 0.6) * side
    radii = (small ** -2 - rng.random(count) * (small ** -2 - large ** -2)) ** -0.5
    centres = rng.uniform(-0.1, 1.1, (count, 2)) * (width, height)
    colours = np.clip(palette[rng.integers(len(palette), size=count)] + rng.normal(0, 18, (count, 3)), 0, 255)
    shapes, squash = rng.integers(3, size=count), rng.uniform(0.3, 1.0, count)
    corners = np.sort(rng.uniform(0, 2 * np.pi, (count, 5)), axis=1)
    sides = rng.integers(3, 6, size=count)
    image = Image.new("RGB", (width, height), tuple(int(c) for c in palette[0]))
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


def fractal(class_id: int, seed: int = 0) -> Image.Image:
    return fractal_art(_rng("fractal", class_id, seed), SQUARE, SQUARE)


def dead_leaves(class_id: int, seed: int = 0) -> Image.Image:
    return dead_leaves_art(_rng("dead_leaves", class_id, seed), SQUARE, SQUARE)


@lru_cache(maxsize=64)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def _text(rng: np.random.Generator, low: int, high: int) -> str:
    return "".join(rng.choice(list(_LETTERS), int(rng.integers(low, high + 1))))


def card(class_id: int, seed: int = 0) -> Image.Image:
    """A card whose artwork, background and logo are formula-drawn; see the module docstring."""
    rng = _rng("card", class_id, seed)
    width = 256
    height = round(width / rng.choice((1.586, 1.586, 1.414, 0.707)))
    background = rng.integers(3)
    if background == 0:
        image = fractal_art(rng, width, height, points=12_000)
    elif background == 1:
        image = dead_leaves_art(rng, width, height)
    else:
        image = _gradient(rng, width, height)
    draw = ImageDraw.Draw(image, "RGBA")
    ink = tuple(int(c) for c in (_palette(rng, 1)[0] * rng.uniform(0.0, 0.4) * 255))
    light = rng.random() < 0.5
    if light:  # a pale panel under the text, the artwork showing around it
        top = rng.uniform(0.25, 0.45) * height
        draw.rectangle((rng.uniform(0, 0.1) * width, top, rng.uniform(0.9, 1) * width, rng.uniform(0.85, 1) * height),
                       fill=(255, 255, 255, int(rng.integers(150, 235))))
    else:
        ink = (255, 255, 255)
    band = rng.uniform(0.12, 0.25) * height
    band_colour = tuple(int(c) for c in _palette(rng, 1)[0] * 255) + (int(rng.integers(120, 255)),)
    draw.rectangle((0, 0, width, band), fill=band_colour)
    fonts = rng.choice(FONT_FILES, 2)
    title = " ".join(rng.choice(_WORDS, int(rng.integers(1, 4)), replace=False))
    draw.text((rng.uniform(0.03, 0.3) * width, band * 0.2), title, font=_font(fonts[0], max(8, int(band * 0.55))),
              fill=(255, 255, 255) if rng.random() < 0.7 else ink)
    logo = round(band * rng.uniform(0.7, 0.95))
    if logo >= 8:
        art = fractal_art(rng, logo, logo, points=3_000) if rng.random() < 0.5 else \
            dead_leaves_art(rng, logo, logo)
        image.paste(art, (int(width - logo - 0.03 * width), int((band - logo) / 2)))
    left = 0.05 * width
    if rng.random() < 0.5:  # photo box
        box = (left, band + 0.12 * height, left + 0.26 * width, band + 0.12 * height + 0.34 * width)
        image.paste(dead_leaves_art(rng, int(box[2] - box[0]), int(box[3] - box[1])), tuple(int(v) for v in box[:2]))
        left = box[2] + 0.04 * width
    elif rng.random() < 0.5:  # chip
        draw.rounded_rectangle((left, 0.4 * height, left + 0.14 * width, 0.56 * height), radius=4,
                               fill=(212, 175, 55, 255))
    font = _font(fonts[1], int(rng.integers(9, 14)))
    y = band + rng.uniform(0.08, 0.2) * height
    while y < 0.85 * height:
        draw.text((left, y), _text(rng, 4, 14), font=font, fill=ink)
        y += font.size * rng.uniform(1.3, 2.2)
    if rng.random() < 0.4:  # barcode along the bottom
        x = int(rng.uniform(0.4, 0.6) * width)
        while x < 0.95 * width:
            bar = int(rng.integers(1, 4))
            draw.rectangle((x, 0.9 * height, x + bar - 1, 0.97 * height), fill=ink)
            x += bar + int(rng.integers(1, 3))
    return image.convert("RGB")


def document(class_id: int, seed: int = 0, instance: int = 0) -> Image.Image:
    """Instance ``instance`` of document type ``class_id`` (:class:`fastpfc.doc.synthetic.DocumentType`)."""
    return DocumentType.from_id(class_id).render(instance)


#: Generators by name: ``(class_id, seed) -> image``.
GENERATORS: dict[str, Callable[..., Image.Image]] = {"fractal": fractal, "dead_leaves": dead_leaves, "card": card,
                                                     "document": document}
#: ``--synthetic`` choices: the generators whose classes are interleaved (class c uses generator c % n).
SOURCES = {"fractals": ("fractal", "dead_leaves"), "cards": ("card",),
           "mix": ("fractal", "dead_leaves", "card", "document")}


@lru_cache(maxsize=256)
def _recent_render(name: str, class_id: int, seed: int) -> Image.Image:
    """The image of a fixed-image class, kept for the other views of it in the same batch (a batch
    is loaded by one worker). Callers must not draw on it."""
    return GENERATORS[name](class_id, seed)


class ProceduralImages(ClassItems):
    """``num_classes`` generated classes x ``per_class`` items, as ([3, size, size] float, label).

    Class ``c`` is drawn by generator ``SOURCES[source][c % n]`` from its own id; item ``i`` is
    ``(class i // per_class, view i % per_class)``, and ``(item, draw)`` a new camera capture of it
    each draw. Document classes also vary their field text with the view and draw (a document type
    is a template); the other generators give one fixed image per class. Views below
    ``clean_views`` are the clean image resized, as a registered example is, not a capture; the
    others are captures with ``framing``.
    """

    def __init__(self, num_classes: int, per_class: int, source: str = "mix", size: int = 128, seed: int = 0,
                 clean_views: int = 0, framing: str = "snug") -> None:
        if source not in SOURCES:
            raise ValueError(f"unknown synthetic source {source!r}; choose one of {sorted(SOURCES)}")
        self.generators = SOURCES[source]
        if "document" in self.generators and num_classes // len(self.generators) >= EVAL_TYPE_OFFSET:
            raise ValueError(f"at most {EVAL_TYPE_OFFSET * len(self.generators)} classes (the evaluation's "
                             "document types follow)")
        self.num_classes, self.per_class, self.size, self.seed = num_classes, per_class, size, seed
        self.clean_views, self.framing = clean_views, framing

    def render(self, label: int, instance: int = 0) -> Image.Image:
        """The clean image of class ``label`` (instance ``instance`` for a document type)."""
        name = self.generators[label % len(self.generators)]
        class_id = label // len(self.generators)
        if name == "document":
            return document(class_id + self.seed * self.num_classes, instance=instance)
        return _recent_render(name, class_id, self.seed)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        item, draw = item if isinstance(item, tuple) else (item, 0)
        label, view = divmod(item, self.per_class)
        image = self.render(label, instance=view + self.per_class * draw)
        if view < self.clean_views:
            return to_tensor(image.resize((self.size, self.size), Image.BILINEAR)), label
        seed = ((label * 1_000_003 + view) * 7919 + draw) * 31 + self.seed
        return to_tensor(capture(image, seed=seed, size=self.size, framing=self.framing)), label
