"""Reading images from disk: RGB conversion with clear errors, and the tensor layout the models take."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
#: PIL modes that convert to RGB meaningfully (16-bit and float images do not: their range is unknown).
READABLE_MODES = frozenset({"RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1"})


def read_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as RGB; a ``ValueError`` naming the file if it cannot be read or its
    mode (16-bit, float) has no meaningful RGB conversion."""
    try:
        with Image.open(path) as image:
            if image.mode not in READABLE_MODES:
                raise ValueError(f"image {path} has mode {image.mode!r}; expected one of {sorted(READABLE_MODES)} "
                                 "(convert it to 8-bit RGB first)")
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a [3, H, W] float tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """The image at ``path`` resized to ``size`` x ``size``: [3, size, size] float in [0, 1]."""
    return to_tensor(read_image(path).resize((size, size), Image.BILINEAR))


class ClassItems(torch.utils.data.Dataset):
    """Base of the datasets of ``num_classes`` classes x ``per_class`` items, item ``i`` of class
    ``i // per_class`` (subclasses set both attributes)."""

    num_classes: int
    per_class: int

    def __len__(self) -> int:
        return self.num_classes * self.per_class

    @property
    def labels(self) -> list[int]:
        """Class of every item, in item order."""
        return [item // self.per_class for item in range(len(self))]
