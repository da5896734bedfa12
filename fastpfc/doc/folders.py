"""Image folders as training or evaluation data.

Two layouts:

* ``per_image``: every image under ``root`` (recursively) is its own class, as in the recipe that
  makes each ImageNet-1K training image a class (about 1.28M classes);
* ``subfolders``: ``root/<class>/.../image``, one class per top-level folder.

Listing 1.28M files takes a while, so the sorted listing is cached in ``cache_dir`` and reused while
the root folder's modification time is unchanged (delete the cache file to list again after
changing files deeper in the tree).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from PIL import Image

from .files import write_text_atomic
from .images import IMAGE_EXTENSIONS, read_image, to_tensor
from .synthetic import capture

LAYOUTS = ("per_image", "subfolders")
#: Where ``train.py`` caches folder listings.
LISTING_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastpfc"


def _walk(root: Path) -> list[str]:
    """Relative paths of the images below ``root``, sorted (os.scandir: no stat per file)."""
    found, pending = [], [root]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=True):
                    pending.append(Path(entry.path))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(os.path.relpath(entry.path, root))
    return sorted(found)


def list_images(root: str | Path, cache_dir: str | Path | None = None) -> list[str]:
    """Sorted relative paths of the images below ``root``, cached in ``cache_dir`` when given."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    cache = None
    if cache_dir is not None:
        key = hashlib.sha1(str(root).encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"listing-{key}-{root.stat().st_mtime_ns}.txt"
        if cache.exists():
            return cache.read_text().splitlines()
    paths = _walk(root)
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}")
    if cache is not None:  # several ranks may write the same cache at once
        write_text_atomic(cache, "\n".join(paths))
    return paths


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of a folder as ([3, size, size] float tensors in [0, 1], class) pairs.

    ``labels[i]`` is the class of item ``i``; ``num_classes`` the number of classes. Item ``i`` is
    the image resized. Items may also be ``(index, draw)`` pairs, as the training loop's batch
    schedule gives them: with ``augment=True`` each draw is another camera capture of the image
    (:func:`fastpfc.doc.synthetic.capture`: perspective, rotation, crop, lighting, glare, blur,
    noise, JPEG; framed as ``framing`` says), the augmentation that makes one image a class worth
    learning.
    """

    def __init__(self, root: str | Path, layout: str = "per_image", size: int = 128,
                 cache_dir: str | Path | None = None, augment: bool = False, framing: str = "snug") -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.root, self.size, self.augment, self.framing = Path(root), size, augment, framing
        self.paths = list_images(root, cache_dir)
        if layout == "per_image":
            self.labels = list(range(len(self.paths)))
            self.class_names = self.paths
        else:
            folders = [Path(p).parts[0] if len(Path(p).parts) > 1 else "" for p in self.paths]
            if "" in folders:
                raise ValueError(f"layout 'subfolders' needs every image in a class folder under {root}")
            self.class_names = sorted(set(folders))
            index = {name: i for i, name in enumerate(self.class_names)}
            self.labels = [index[name] for name in folders]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        item, draw = item if isinstance(item, tuple) else (item, None)
        image = read_image(self.root / self.paths[item])
        if self.augment and draw is not None:
            image.thumbnail((4 * self.size, 4 * self.size))  # capture() needs no more pixels than this
            image = capture(image, seed=(item * 7919 + draw) * 31 + 17, size=self.size, framing=self.framing)
        else:
            image = image.resize((self.size, self.size), Image.BILINEAR)
        return to_tensor(image), self.labels[item]

