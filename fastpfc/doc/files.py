"""Atomic file writes (a crash, a full disk or a concurrent writer never leaves a half-written file
in place, and a failed write leaves no partial file behind) and file digests."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

#: What torch's zip writer says when a write comes up short (it does not raise an OSError).
_SHORT_WRITE_MESSAGES = ("unexpected pos", "file write failed", "No space left")


def _disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _SHORT_WRITE_MESSAGES)


@contextmanager
def atomic_output(path: Path, partial: Path) -> Iterator[Path]:
    """Write to ``partial`` inside the ``with`` block; at its end ``partial`` is renamed over
    ``path``. On any error ``partial`` is removed and ``path`` keeps its previous content; a full
    disk becomes an ``OSError(ENOSPC)`` that names the file and says so."""
    try:
        yield partial
        os.replace(partial, path)
    except BaseException as error:
        partial.unlink(missing_ok=True)
        if _disk_full(error):
            raise OSError(errno.ENOSPC, f"no space left on the device of {path.parent} while writing {path.name}; "
                          f"the partial file was removed and {path} was left as it was") from error
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a private temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with atomic_output(path, Path(partial)), os.fdopen(handle, "w") as f:
        f.write(text)


def content_digest(value) -> str:
    """A digest of nested dicts, lists and tuples of tensors and plain values: every tensor's
    dtype, shape and bytes, and every other value's ``repr``, in the containers' order. Equal for
    equal content, whatever the device; changed by any changed byte of a tensor."""
    digest = hashlib.blake2b(digest_size=20)

    def visit(item) -> None:
        if isinstance(item, dict):
            for key, child in item.items():
                digest.update(f"<{key!r}>".encode())
                visit(child)
        elif isinstance(item, list | tuple):
            digest.update(f"[{len(item)}]".encode())
            for child in item:
                visit(child)
        elif isinstance(item, torch.Tensor):
            tensor = item.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{item.dtype}{tuple(item.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        else:
            digest.update(repr(item).encode())

    visit(value)
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of the file's bytes, hex: the same content has the same digest wherever it lies."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
