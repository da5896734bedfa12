"""Procedurally generated documents: types that share a template, instances that differ in content.

A document *type* is a template drawn from its own seed: kind (ID card, bank card, form, receipt,
certificate), aspect ratio, background and pattern, header band and title, logo shapes, photo box,
chip, field labels, table, barcode, stamp. Types come in look-alike *families*: members share the
layout and differ in colours and issuer name, and each family has two format *generations* that
move a few elements. An *instance* fills the template with its own values (field text, photo,
numbers). With ``artwork`` a type also carries formula-drawn pictures (:mod:`fastpfc.doc.artwork`),
as real cards carry printed artwork: a faint fractal or dead-leaves picture over the whole card or
one half of it, picture logos, and a dead-leaves picture in the photo box that changes with every
instance, as a holder's photograph does. :func:`capture` then photographs it: perspective,
rotation, crop, lighting gradient, glare, shadow, blur, noise, JPEG and a colour cast.

Everything is deterministic from integer seeds. Training and evaluation types never overlap: their
type ids come from disjoint ranges (:data:`EVAL_TYPE_OFFSET`).
"""

from __future__ import annotations

import colorsys
import functools
import io
import math
import random
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from .artwork import dead_leaves_art, fractal_art
from .images import ClassItems, to_tensor

KINDS = ("id_card", "bank_card", "form", "receipt", "certificate")
ASPECT = {"id_card": 1.586, "bank_card": 1.586, "form": 0.707, "receipt": 0.4, "certificate": 1.414}
#: Types per look-alike family (same layout, other colours / issuer) and generations per family.
FAMILY_SIZE, GENERATIONS = 3, 2
#: Bumped whenever the same seed renders different images (caches of derived data key on it).
GENERATOR_VERSION = 4
#: ``--synthetic`` choices that are document types, and whether their types carry artwork.
DOCUMENT_SOURCES = {"documents": False, "art_documents": True}
#: Evaluation type ids start here, so no evaluation type is ever a training type.
EVAL_TYPE_OFFSET = 1_000_000
_WORDS = ("NATIONAL", "REPUBLIC", "BANK", "UNION", "CREDIT", "INSURANCE", "LICENSE", "PERMIT", "RESIDENT",
          "STATE", "CITY", "HEALTH", "TAX", "POSTAL", "TRANSIT", "UNIVERSITY", "MEMBER", "AGENCY")
#: With ``artwork``: the opacity range of a type's background picture over its plain background
#: (chosen among three ranges, docs/training.md round 8), and the share of families whose logos are
#: pictures (not varied).
ART_OPACITY, PICTURE_LOGOS = (0.1, 0.35), 0.7
_LABELS = ("NAME", "DATE", "NO.", "ADDRESS", "EXPIRES", "ISSUED", "CLASS", "SEX", "ID", "TOTAL", "REF")


def _colour(rng: random.Random, light: bool) -> tuple[int, int, int]:
    low, high = (170, 255) if light else (20, 140)
    return tuple(rng.randint(low, high) for _ in range(3))


def _hsv(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


@dataclass(frozen=True)
class DocumentType:
    """A template. ``family`` and ``generation`` say which look-alikes it has."""

    type_id: int
    family: int
    generation: int
    kind: str
    width: int
    height: int
    layout: dict
    style: dict

    @classmethod
    def from_id(cls, type_id: int, base_width: int = 320, artwork: bool = False) -> DocumentType:
        family, member = divmod(type_id, FAMILY_SIZE * GENERATIONS)
        generation, issuer = divmod(member, FAMILY_SIZE)
        layout_rng = random.Random(f"layout-{family}")  # shared by the whole family
        style_rng = random.Random(f"style-{type_id}")  # this member's colours and issuer
        kind = layout_rng.choice(KINDS)
        aspect = ASPECT[kind] * layout_rng.uniform(0.95, 1.05)
        width, height = (base_width, round(base_width / aspect)) if aspect >= 1 else (round(base_width * aspect),
                                                                                       base_width)
        layout = {
            "header": layout_rng.uniform(0.12, 0.22),
            "pattern": layout_rng.choice(("stripes", "dots", "waves", "plain")),
            "photo": kind == "id_card" or layout_rng.random() < 0.2,
            "photo_left": layout_rng.random() < 0.5,
            "chip": kind == "bank_card",
            "table_rows": layout_rng.randint(3, 8) if kind in ("form", "receipt") else 0,
            "fields": [(layout_rng.uniform(0.05, 0.5), layout_rng.uniform(0.3, 0.9), layout_rng.choice(_LABELS))
                       for _ in range(layout_rng.randint(3, 6))],
            "logos": [(layout_rng.choice(("circle", "square", "triangle")), layout_rng.uniform(0.6, 0.9),
                       layout_rng.uniform(0.25, 0.75)) for _ in range(layout_rng.randint(1, 2))],
            "barcode": layout_rng.random() < 0.6,
            "stamp": kind in ("certificate", "form") and layout_rng.random() < 0.7,
        }
        if artwork:  # the family's picture kind, where it lies and how strong; each type draws its own
            art_rng = random.Random(f"artwork-{family}")
            layout["artwork"] = (art_rng.choice(("fractal", "dead_leaves")), art_rng.choice(("full", "left", "right")),
                                 art_rng.uniform(*ART_OPACITY))
            layout["picture_logos"] = art_rng.random() < PICTURE_LOGOS
        if generation == 1:  # the newer format: header grows, photo swaps sides, barcode toggles
            layout = {**layout, "header": layout["header"] * 1.3, "photo_left": not layout["photo_left"],
                      "barcode": not layout["barcode"]}
        # Each issuer of a family gets its own third of the hue circle (both generations of an
        # issuer share it): look-alikes, but told apart by colour even at 128 px, where the
        # issuer's name is not legible. Independent colour draws made some members identical.
        hue = layout_rng.random() + issuer / FAMILY_SIZE + style_rng.uniform(-0.06, 0.06)
        style = {
            "background": _hsv(hue + style_rng.uniform(-0.05, 0.05), style_rng.uniform(0.1, 0.3),
                               style_rng.uniform(0.88, 1.0)),
            "ink": _colour(style_rng, light=False),
            "band": _hsv(hue, style_rng.uniform(0.5, 0.9), style_rng.uniform(0.35, 0.7)),
            "accent": _colour(style_rng, light=False),
            "title": " ".join(style_rng.sample(_WORDS, 2)),
        }
        return cls(type_id, family, generation, kind, width, height, layout, style)

    def render(self, instance: int) -> Image.Image:
        """A clean image of instance ``instance`` of this type (RGB, ``width`` x ``height``)."""
        rng = random.Random(f"instance-{self.type_id}-{instance}")
        w, h, lay, sty = self.width, self.height, self.layout, self.style
        image = Image.new("RGB", (w, h), sty["background"])
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default()
        _pattern(draw, lay["pattern"], w, h, sty["accent"])
        if "artwork" in lay:
            kind, region, opacity = lay["artwork"]
            left, right = {"full": (0, w), "left": (0, w // 2), "right": (w // 2, w)}[region]
            picture = _type_picture(self.type_id, "background", kind, right - left, h)
            image.paste(Image.blend(image.crop((left, 0, right, h)), picture, opacity), (left, 0))
        band = round(h * lay["header"])
        draw.rectangle((0, 0, w, band), fill=sty["band"])
        draw.text((8, band // 3), sty["title"], fill=sty["background"], font=font)
        for number, (shape, fx, fy) in enumerate(lay["logos"]):
            if lay.get("picture_logos"):
                r = max(2, round(band * 0.35))
                logo = _type_picture(self.type_id, f"logo{number}", "fractal", 2 * r, 2 * r)
                image.paste(logo, (round(fx * w) - r, round(fy * band) - r))
            else:
                _shape(draw, shape, (fx * w, fy * band), band * 0.35, sty["accent"])
        if lay["photo"]:
            x0 = 0.06 * w if lay["photo_left"] else 0.68 * w
            box = (x0, band + 0.1 * h, x0 + 0.26 * w, band + 0.1 * h + 0.55 * (h - band))
            draw.rectangle(box, fill=_colour(rng, light=True), outline=sty["ink"])
            if "artwork" in lay:  # the holder's picture
                photo = dead_leaves_art(np.random.default_rng(rng.getrandbits(32)), round(box[2] - box[0]),
                                        round(box[3] - box[1]))
                image.paste(photo, (round(box[0]), round(box[1])))
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            draw.ellipse((cx - 0.3 * (box[2] - box[0]), cy - 0.35 * (box[3] - box[1]), cx + 0.3 * (box[2] - box[0]),
                          cy + 0.15 * (box[3] - box[1])), fill=_colour(rng, light=False))
        if lay["chip"]:
            draw.rounded_rectangle((0.1 * w, 0.42 * h, 0.24 * w, 0.6 * h), radius=4, fill=(212, 175, 55))
        offset = 0.3 * w if lay["photo"] and lay["photo_left"] else 0.0
        for fx, fy, label in lay["fields"]:
            x, y = offset + fx * (w - offset), band + fy * (h - band) * 0.8
            draw.text((x, y), label, fill=sty["accent"], font=font)
            draw.text((x, y + 11), _random_value(rng), fill=sty["ink"], font=font)
        if lay["table_rows"]:
            top, row_h = band + 0.35 * (h - band), 0.5 * (h - band) / lay["table_rows"]
            for r in range(lay["table_rows"] + 1):
                draw.line((0.05 * w, top + r * row_h, 0.95 * w, top + r * row_h), fill=sty["ink"])
            for r in range(lay["table_rows"]):
                draw.text((0.07 * w, top + r * row_h + 2), _random_value(rng), fill=sty["ink"], font=font)
        if lay["barcode"]:
            x = int(0.55 * w)
            while x < 0.95 * w:
                bar = rng.choice((1, 2, 3))
                draw.rectangle((x, 0.88 * h, x + bar - 1, 0.97 * h), fill=sty["ink"])
                x += bar + rng.choice((1, 2))
        if lay["stamp"]:
            cx, cy, r = rng.uniform(0.6, 0.85) * w, rng.uniform(0.6, 0.8) * h, 0.08 * min(w, h) + 8
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(170, 30, 30), width=3)
        return image


@functools.lru_cache(maxsize=4096)
def _type_picture(type_id: int, part: str, kind: str, width: int, height: int) -> Image.Image:
    """The ``kind`` picture of a type's ``part``, ``width`` x ``height``: drawn once per loader process
    (a training set's types fit the cache), the same in every instance. Callers must not draw on it."""
    rng = np.random.default_rng([type_id, zlib.crc32(part.encode()), width, height])
    return fractal_art(rng, width, height) if kind == "fractal" else dead_leaves_art(rng, width, height)


def _pattern(draw: ImageDraw.ImageDraw, kind: str, w: int, h: int, colour: tuple[int, int, int]) -> None:
    faint = tuple(int(0.25 * c + 0.75 * 235) for c in colour)
    if kind == "stripes":
        for x in range(-h, w, 12):
            draw.line((x, h, x + h, 0), fill=faint)
    elif kind == "dots":
        draw.point([(x, y) for y in range(4, h, 10) for x in range(4, w, 10)], fill=faint)
    elif kind == "waves":
        for y0 in range(10, h, 16):
            draw.line([(x, y0 + 4 * math.sin(x / 9)) for x in range(0, w, 3)], fill=faint)


def _shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], r: float, colour) -> None:
    cx, cy = centre
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)


def _random_value(rng: random.Random) -> str:
    alphabet = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 12)))


@dataclass(frozen=True)
class Framing:
    """Where :func:`capture` puts the document in its frame: each corner moved by up to ``jitter``
    of the side, the frame grown around the document by a share drawn from ``margin`` (below 0: the
    frame cuts into it), and moved off-centre by up to ``shift`` of the side."""

    jitter: float
    margin: tuple[float, float]
    shift: float


#: Framings by name. ``snug``: the document fills the frame, as a scanning app crops it (the
#: synthetic evaluation's captures); ``loose``: framed by hand, tight or loose and off-centre (the
#: training default; its ranges cover the real-image check's camera, see docs/training.md).
FRAMINGS = {"snug": Framing(jitter=0.06, margin=(0.0, 0.1), shift=0.0),
            "loose": Framing(jitter=0.08, margin=(-0.05, 0.25), shift=0.06)}

#: Background around the document before framing, as a share of its longer side: enough that
#: every framing's quad stays on it (no black corners).
CANVAS_PAD = 0.4


def _frame_quad(rng: random.Random, width: int, height: int, pad: int, frame: Framing) -> tuple[float, ...]:
    """The quad (canvas coordinates, PIL's QUAD order) that a capture maps onto its square frame:
    around the ``width`` x ``height`` document pasted at (``pad``, ``pad``), tilted, its corners
    jittered, grown and moved as ``frame`` says."""
    tilt = math.radians(rng.uniform(-12, 12))
    jitter = [rng.uniform(-frame.jitter, frame.jitter) * s for s in (width, height) * 4]
    corners = [(pad + jitter[0], pad + jitter[1]), (pad + width + jitter[2], pad + jitter[3]),
               (pad + width + jitter[4], pad + height + jitter[5]), (pad + jitter[6], pad + height + jitter[7])]
    # the tilt turns the quad about the document's centre: one resampling (the quad's), not two
    cx, cy, cos, sin = pad + width / 2, pad + height / 2, math.cos(tilt), math.sin(tilt)
    corners = [(cx + (x - cx) * cos - (y - cy) * sin, cy + (x - cx) * sin + (y - cy) * cos) for x, y in corners]
    quad = _expand(corners, rng.uniform(*frame.margin))
    if frame.shift:
        dx, dy = (rng.uniform(-frame.shift, frame.shift) * side for side in (width, height))
        quad = tuple(v + (dx, dy)[i % 2] for i, v in enumerate(quad))
    return quad


@functools.lru_cache(maxsize=4)
def _unit_grid(size: int) -> np.ndarray:
    """[2, size, size] float32 (row, column) / size, read-only, computed once per size rather than
    per capture."""
    grid = np.mgrid[0:size, 0:size].astype(np.float32) / size
    grid.flags.writeable = False
    return grid


def capture(image: Image.Image, seed: int, size: int = 128, framing: str = "snug") -> Image.Image:
    """Photograph ``image`` with a hand-held camera: a ``size`` x ``size`` RGB image, the document
    framed as :data:`FRAMINGS` ``[framing]`` says."""
    if framing not in FRAMINGS:
        raise ValueError(f"unknown framing {framing!r}; choose one of {sorted(FRAMINGS)}")
    rng = random.Random(f"capture-{seed}")
    w, h = image.size
    pad = round(CANVAS_PAD * max(w, h))
    canvas = Image.new("RGB", (w + 2 * pad, h + 2 * pad), _colour(rng, light=rng.random() < 0.5))
    canvas.paste(image, (pad, pad))
    quad = _frame_quad(rng, w, h, pad, FRAMINGS[framing])
    canvas = canvas.transform((size, size), Image.QUAD, quad, resample=Image.BILINEAR)
    pixels = np.asarray(canvas, dtype=np.float32)
    yy, xx = _unit_grid(size)
    angle = rng.uniform(0, 2 * math.pi)
    light = 1.0 + rng.uniform(-0.35, 0.2) * (math.cos(angle) * (xx - 0.5) + math.sin(angle) * (yy - 0.5)) * 2
    if rng.random() < 0.5:  # glare spot
        gx, gy, gr = rng.random(), rng.random(), rng.uniform(0.08, 0.25)
        light = light + 0.9 * np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * gr * gr))
    if rng.random() < 0.4:  # shadow over one side
        light = light * np.where(xx * math.cos(angle) + yy * math.sin(angle) > rng.uniform(0.3, 1.0), 0.6, 1.0)
    cast = np.array([rng.uniform(0.85, 1.15) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, rng.uniform(0, 8), pixels.shape).astype(np.float32)
    pixels = np.clip(pixels * light[..., None] * cast + noise, 0, 255).astype(np.uint8)
    photo = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))
    photo = ImageEnhance.Contrast(photo).enhance(rng.uniform(0.8, 1.2))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=rng.randint(40, 90))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def with_glare(image: Image.Image, seed: int) -> Image.Image:
    """A sub-label variant: a large blown-out glare patch over part of the document."""
    rng = random.Random(f"glare-{seed}")
    w, h = image.size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, rng.uniform(0.25, 0.35) * max(w, h)
    light = 1.6 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
    pixels = np.asarray(image, dtype=np.float32)
    return Image.fromarray(np.clip(pixels + light * (255 - pixels), 0, 255).astype(np.uint8))


def damaged(image: Image.Image, seed: int) -> Image.Image:
    """A sub-label variant: a torn-off corner, a stain and creases."""
    rng = random.Random(f"damage-{seed}")
    image = image.copy()
    w, h = image.size
    draw = ImageDraw.Draw(image, "RGBA")
    corner = rng.choice(((0, 0), (w, 0), (w, h), (0, h)))
    tear = [corner, (abs(corner[0] - rng.uniform(0.25, 0.4) * w), corner[1]),
            (abs(corner[0] - rng.uniform(0.05, 0.15) * w), abs(corner[1] - rng.uniform(0.1, 0.2) * h)),
            (corner[0], abs(corner[1] - rng.uniform(0.3, 0.5) * h))]
    draw.polygon(tear, fill=(40, 40, 40, 255))
    cx, cy, r = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0.1, 0.2) * min(w, h)
    draw.ellipse((cx - r, cy - 0.8 * r, cx + r, cy + 0.8 * r), fill=(120, 80, 30, 110))
    for _ in range(2):
        x = rng.uniform(0.2, 0.8) * w
        draw.line((x, 0, x + rng.uniform(-0.1, 0.1) * w, h), fill=(90, 90, 90, 160), width=2)
    return image


#: Sub-label variants of a rendered document, by name (applied before :func:`capture`).
VARIANTS = {"glare": with_glare, "damaged": damaged}


def _expand(corners: list[tuple[float, float]], margin: float) -> tuple[float, ...]:
    """Quad corners (upper-left, lower-left, lower-right, upper-right for PIL) grown by ``margin``."""
    cx = sum(x for x, _ in corners) / 4
    cy = sum(y for _, y in corners) / 4
    grown = [(cx + (x - cx) * (1 + margin), cy + (y - cy) * (1 + margin)) for x, y in corners]
    ul, ur, lr, ll = grown
    return (*ul, *ll, *lr, *ur)


class SyntheticDocuments(ClassItems):
    """``num_types`` document types x ``per_type`` captures, as ([3, size, size] float tensors, label).

    Labels are ``0 .. num_types - 1``. ``split='train'`` and ``split='eval'`` draw disjoint types;
    ``artwork`` gives the types their pictures (see the module docstring).
    With ``clean=True`` an item is the uncaptured document resized (a registration image); otherwise
    a :func:`capture` with ``framing``.
    """

    def __init__(self, num_types: int, per_type: int, split: str = "train", size: int = 128, seed: int = 0,
                 clean: bool = False, framing: str = "snug", artwork: bool = False) -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        offset = EVAL_TYPE_OFFSET if split == "eval" else 0
        self.types = [DocumentType.from_id(offset + seed * num_types + t, artwork=artwork) for t in range(num_types)]
        self.num_classes, self.per_class = num_types, per_type
        self.size, self.seed, self.clean, self.framing = size, seed, clean, framing

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """Item ``item``, or ``(item, draw)``: another capture of the same document for each draw."""
        item, draw = item if isinstance(item, tuple) else (item, 0)
        label, instance = divmod(item, self.per_class)
        doc_type = self.types[label]
        image = doc_type.render(instance)
        if self.clean:
            image = image.resize((self.size, self.size), Image.BILINEAR)
        else:
            seed = ((doc_type.type_id * 1_000_003 + instance) * 7919 + draw) * 31 + self.seed
            image = capture(image, seed=seed, size=self.size, framing=self.framing)
        return to_tensor(image), label
