"""Formula-driven training images: as many classes as wanted, each one image reproducible from its id.

Three generators, each ``render(class_id) -> PIL RGB image``:

* ``fractal``: an IFS fractal over a gradient (:func:`fastpfc.doc.artwork.fractal_art`);
* ``dead_leaves``: a dead-leaves composition (:func:`fastpfc.doc.artwork.dead_leaves_art`);
* ``card``: a card, ID or form layout whose artwork, background and logo come from the two above,
  with header band, title and fields in one of matplotlib's bundled fonts, photo box, chip, barcode.

Every image is its own class (the "each ImageNet image a class" setting PartialFC is for); the
training loop sees them through :func:`fastpfc.doc.synthetic.capture`, the camera model.
:data:`SOURCES` names the mixes ``train.py --synthetic`` offers besides ``documents`` (the template /
instance generator of :mod:`fastpfc.doc.synthetic` alone, whose classes vary in their field text).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .artwork import dead_leaves_art, fractal_art, gradient, palette
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
        image = gradient(rng, width, height)
    draw = ImageDraw.Draw(image, "RGBA")
    ink = tuple(int(c) for c in (palette(rng, 1)[0] * rng.uniform(0.0, 0.4) * 255))
    light = rng.random() < 0.5
    if light:  # a pale panel under the text, the artwork showing around it
        top = rng.uniform(0.25, 0.45) * height
        draw.rectangle((rng.uniform(0, 0.1) * width, top, rng.uniform(0.9, 1) * width, rng.uniform(0.85, 1) * height),
                       fill=(255, 255, 255, int(rng.integers(150, 235))))
    else:
        ink = (255, 255, 255)
    band = rng.uniform(0.12, 0.25) * height
    band_colour = tuple(int(c) for c in palette(rng, 1)[0] * 255) + (int(rng.integers(120, 255)),)
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
