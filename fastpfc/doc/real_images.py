"""A registration check on real images that needs no download: photographs and scans shipped
inside installed packages (scikit-image's and matplotlib's sample data), cut into card-shaped
templates, each template its own class.

Each template is registered once, clean, and queried by captures of a camera model written apart
from the training augmentation (:func:`photograph` here, not :func:`fastpfc.doc.synthetic.capture`):
another perspective and background, vignetting, white balance, gamma, defocus or motion blur,
resolution loss, sensor noise and JPEG. Nothing trained ever sees these images.

The check under harsh light (``harsh_light=True``) puts one lighting effect on each card before it
is photographed, drawn from :data:`HARSH_LIGHT` (a lamp's reflection that clips to white, a soft
shadow, light falling off from one corner, a strong colour cast): the effects a capture model of real
documents names beside the camera's geometry, written apart from the training capture's.
"""

from __future__ import annotations

import io
import math
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from .images import ClassItems, read_image, to_tensor

#: (package, path inside it) of the real photographs and scans; synthetic pictures (chessboards,
#: colour wheels, phantoms, logos) and images under 150 px are left out. brick, grass and gravel are
#: textures: one template each (crops of one texture are not told apart by anything).
PHOTOS = (
    ("skimage", "data/astronaut.png"), ("skimage", "data/camera.png"), ("skimage", "data/cell.png"),
    ("skimage", "data/chelsea.png"), ("skimage", "data/clock_motion.png"), ("skimage", "data/coffee.png"),
    ("skimage", "data/coins.png"), ("skimage", "data/hubble_deep_field.jpg"), ("skimage", "data/ihc.png"),
    ("skimage", "data/moon.png"), ("skimage", "data/motorcycle_left.png"), ("skimage", "data/page.png"),
    ("skimage", "data/retina.jpg"), ("skimage", "data/rocket.jpg"), ("skimage", "data/text.png"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)
TEXTURES = (("skimage", "data/brick.png"), ("skimage", "data/grass.png"), ("skimage", "data/gravel.png"))
CARD_ASPECT = 1.586
#: Templates are cut at least this wide (px of the source image).
MIN_TEMPLATE_WIDTH = 150


def _package_file(package: str, relative: str) -> Path:
    """The file ``relative`` inside installed ``package``; an ImportError naming the extra if absent."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ImportError(f"the real-image check reads sample images shipped by {package}, which is not "
                          "installed: pip install -e '.[train]'")
    path = Path(spec.origin).parent / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {package}")
    return path


def card_crops(width: int, height: int, max_side: int = 2) -> list[tuple[int, int, int, int]]:
    """Non-overlapping card-shaped boxes (left, top, right, bottom) on a grid of at most
    ``max_side`` x ``max_side`` over an image of ``width`` x ``height``, centred."""
    columns = max(1, min(max_side, width // MIN_TEMPLATE_WIDTH))
    box_w = width // columns
    box_h = round(box_w / CARD_ASPECT)
    if box_h > height:
        box_h, box_w = height, round(height * CARD_ASPECT)
    rows = max(1, min(max_side, height // box_h))
    left0, top0 = (width - columns * box_w) // 2, (height - rows * box_h) // 2
    return [(left0 + c * box_w, top0 + r * box_h, left0 + (c + 1) * box_w, top0 + (r + 1) * box_h)
            for r in range(rows) for c in range(columns)]


@lru_cache(maxsize=1)
def real_templates() -> tuple[tuple[str, Image.Image], ...]:
    """(name, RGB image) of every template, in a fixed order."""
    templates = []
    for package, relative in PHOTOS + TEXTURES:
        image = read_image(_package_file(package, relative))
        boxes = card_crops(*image.size, max_side=1 if (package, relative) in TEXTURES else 2)
        stem = Path(relative).stem
        templates += [(f"{stem}-{i}", image.crop(box)) for i, box in enumerate(boxes)]
    return tuple(templates)


def _homography(source: list[tuple[float, float]], target: list[tuple[float, float]]) -> tuple[float, ...]:
    """The 8 coefficients PIL's PERSPECTIVE transform takes to map output ``target`` points to
    input ``source`` points."""
    rows, values = [], []
    for (x, y), (u, v) in zip(target, source, strict=True):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        values += [u, v]
    return tuple(np.linalg.solve(np.array(rows, dtype=np.float64), np.array(values, dtype=np.float64)))


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random [size, size, 3] float field in [0, 1] (coarse noise upsampled)."""
    coarse = Image.fromarray((rng.random((cells, cells, 3)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0


def _lit(pixels: np.ndarray) -> Image.Image:
    """``pixels`` (float, 0..255 scale, any range) clipped to 8 bits as an RGB image."""
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _blurred_polygon(card: Image.Image, corners: list[tuple[float, float]], blur: float) -> np.ndarray:
    """A [H, W, 1] float32 mask in [0, 1] of the polygon ``corners`` (shares of the card's width
    and height) with edges softened by a Gaussian of ``blur`` times the card's longer side."""
    w, h = card.size
    mask = Image.new("L", card.size, 0)
    ImageDraw.Draw(mask).polygon([(x * w, y * h) for x, y in corners], fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(blur * max(w, h)))
    return np.asarray(mask, dtype=np.float32)[..., None] / 255.0


def lamp_reflection(card: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A lamp's or window's reflection on a glossy card: an elongated soft-edged streak of added
    light that clips to white at its core."""
    cx, cy = rng.uniform(0.2, 0.8, 2)
    length, width, turn = rng.uniform(0.3, 0.7), rng.uniform(0.06, 0.15), rng.uniform(0, math.pi)
    along, across = np.array([math.cos(turn), math.sin(turn)]), np.array([-math.sin(turn), math.cos(turn)])
    corners = [tuple(np.array([cx, cy]) + a * length / 2 * along + b * width / 2 * across)
               for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    streak = _blurred_polygon(card, corners, rng.uniform(0.15, 0.35) * width)  # soft edges, a full core
    return _lit(np.asarray(card, dtype=np.float32) + rng.uniform(0.6, 1.2) * 255.0 * streak)


def soft_shadow(card: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The soft shadow of a hand or a phone over one side of the card: a blurred region reaching in
    from one edge, darkened to 40-70%."""
    depth, spread = rng.uniform(0.25, 0.6), rng.uniform(0.1, 0.4)
    start = rng.uniform(-0.2, 0.6)
    end = start + rng.uniform(0.4, 0.9)  # along the edge: at least 0.2 of it in the shadow
    # a quad reaching in from the left edge, then turned to one of the four edges
    corners = [(-0.5, start - spread), (depth, start), (depth + rng.uniform(-0.15, 0.15), end), (-0.5, end + spread)]
    edge = int(rng.integers(4))
    turned = [[(x, y), (1 - x, y), (y, x), (y, 1 - x)][edge] for x, y in corners]
    shade = _blurred_polygon(card, turned, rng.uniform(0.02, 0.08))
    darkest = rng.uniform(0.4, 0.7)
    return _lit(np.asarray(card, dtype=np.float32) * (1 - (1 - darkest) * shade))


def corner_falloff(card: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Light from a lamp beyond one corner: brightness falling with the distance from it, to
    35-60% at the far side."""
    w, h = card.size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx, yy = xx / w, yy / h  # shares of the card's width and height
    lx, ly = rng.choice((-0.3, 1.3)) + rng.uniform(-0.2, 0.2), rng.choice((-0.3, 1.3)) + rng.uniform(-0.2, 0.2)
    distance = np.hypot(xx - lx, yy - ly)
    near, far = distance.min(), distance.max()
    light = 1.0 - (1.0 - rng.uniform(0.35, 0.6)) * (distance - near) / (far - near)
    return _lit(np.asarray(card, dtype=np.float32) * light[..., None])


def colour_cast(card: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A strong colour cast: a tungsten (warm) or a shade or fluorescent (cool or green) light
    not corrected by the camera's white balance."""
    gains = np.array([(1.25, 1.0, 0.7), (0.8, 0.95, 1.2), (0.9, 1.12, 0.85)][int(rng.integers(3))], dtype=np.float32)
    gains = gains * np.exp(rng.normal(0, 0.05, 3)).astype(np.float32)
    return _lit(np.asarray(card, dtype=np.float32) * gains)


#: The lighting effects of the check under harsh light, by name: (card, rng) -> card.
HARSH_LIGHT = {"reflection": lamp_reflection, "shadow": soft_shadow, "falloff": corner_falloff, "cast": colour_cast}


def under_harsh_light(template: Image.Image, seed: int) -> Image.Image:
    """``template`` with one :data:`HARSH_LIGHT` effect, chosen and drawn by ``seed``."""
    rng = np.random.default_rng([seed, 0x11647])
    effects = list(HARSH_LIGHT.values())
    return effects[int(rng.integers(len(effects)))](template.convert("RGB"), rng)


def photograph(template: Image.Image, seed: int, size: int = 128) -> Image.Image:
    """A ``size`` x ``size`` RGB photo of ``template`` lying on a surface, taken by a phone camera and
    cropped to the card (which, like the clean template, then fills a square)."""
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    render = 2 * size  # work at twice the output resolution, then lose resolution
    background = _smooth_field(rng, render, int(rng.integers(2, 6))) * rng.uniform(0.3, 0.9)
    w, h = template.size
    # where the card's corners land: the frame holds the card cropped to it, as a scanning app or a
    # user framing the card does (and as the clean template is stored), give or take a tilt, a
    # perspective, a loose or a tight crop
    fill = rng.uniform(0.8, 1.05) * render / 2
    angle = math.radians(rng.uniform(-10, 10))
    centre = render / 2 + rng.uniform(-0.05, 0.05, 2) * render
    corners = []
    for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
        x, y = sx * fill, sy * fill
        x, y = x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle)
        corners.append((centre[0] + x + rng.normal(0, 0.04) * render, centre[1] + y + rng.normal(0, 0.04) * render))
    coefficients = _homography([(0, 0), (w, 0), (w, h), (0, h)], corners)
    card = template.transform((render, render), Image.PERSPECTIVE, coefficients, resample=Image.BICUBIC)
    mask = Image.new("L", template.size, 255).transform((render, render), Image.PERSPECTIVE, coefficients,
                                                       resample=Image.BILINEAR)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    pixels = alpha * np.asarray(card, dtype=np.float32) / 255.0 + (1 - alpha) * background
    yy, xx = np.mgrid[0:render, 0:render].astype(np.float32) / render - 0.5
    vignette = 1.0 - rng.uniform(0.0, 0.6) * (xx ** 2 + yy ** 2) * 2
    white_balance = np.exp(rng.normal(0, 0.08, 3)).astype(np.float32)
    exposure = rng.uniform(0.75, 1.25)
    pixels = np.clip(pixels * vignette[..., None] * white_balance * exposure, 0, 1) ** rng.uniform(0.8, 1.25)
    photo = Image.fromarray((pixels * 255).astype(np.uint8))
    if pick.random() < 0.5:
        photo = photo.filter(ImageFilter.BoxBlur(rng.uniform(0.5, 2.0)))
    else:  # motion: a short line kernel in one of four directions
        length = pick.choice((3, 5))
        kernel = np.zeros((length, length), dtype=np.float32)
        direction = pick.randrange(4)
        for i in range(length):
            kernel[[length // 2, i, i, length - 1 - i][direction], [i, length // 2, i, i][direction]] = 1.0
        photo = photo.filter(ImageFilter.Kernel((length, length), kernel.flatten().tolist(), scale=length))
    photo = photo.resize((round(render * rng.uniform(0.3, 0.6)),) * 2, Image.BILINEAR).resize((size, size),
                                                                                           Image.BILINEAR)
    pixels = np.asarray(photo, dtype=np.float32)
    pixels = pixels + rng.normal(0, 1, pixels.shape) * np.sqrt(pixels + 1) * rng.uniform(0.2, 0.9)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG",
                                                                    quality=int(rng.integers(35, 90)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


class RealImageCaptures(ClassItems):
    """``captures`` photographs of every real template (``clean=False``; each under one
    :data:`HARSH_LIGHT` effect with ``harsh_light``), or the template itself resized (``clean=True``,
    one item per template), as ([3, size, size] float, template index)."""

    def __init__(self, captures: int, size: int = 128, seed: int = 0, clean: bool = False,
                 harsh_light: bool = False) -> None:
        self.templates = real_templates()
        self.num_classes, self.per_class = len(self.templates), 1 if clean else captures
        self.size, self.seed, self.clean, self.harsh_light = size, seed, clean, harsh_light

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        label, capture = divmod(item, self.per_class)
        template = self.templates[label][1]
        if self.clean:
            return to_tensor(template.resize((self.size, self.size), Image.BILINEAR)), label
        seed = (self.seed * 1_000_003 + label) * 101 + capture
        if self.harsh_light:
            template = under_harsh_light(template, seed)
        return to_tensor(photograph(template, seed=seed, size=self.size)), label


def real_image_check(size: int, captures: int = 8, seed: int = 0, harsh_light: bool = False) -> tuple:
    """(queries, gallery, registered classes) for :func:`fastpfc.doc.evaluation.evaluate_embedder`:
    every template registered once, clean; the queries are its photographs (under harsh light
    with ``harsh_light``: the same camera, each card lit by one :data:`HARSH_LIGHT` effect)."""
    gallery = RealImageCaptures(1, size, seed, clean=True)
    return RealImageCaptures(captures, size, seed, harsh_light=harsh_light), gallery, list(range(gallery.num_classes))
