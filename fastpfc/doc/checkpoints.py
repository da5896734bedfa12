"""``train.py`` checkpoints: written atomically, read without running code.

A checkpoint holds only tensors and plain data (numbers, strings, lists, dicts; the random
number generators' states included), so it is read with ``torch.load(weights_only=True)``: a
file that holds anything else, such as a pickle crafted to run code when loaded, is refused
before any of it executes. Files of the wrong kind (text, a registry ``.npz``, an ONNX model,
empty, truncated, a folder) are named as such in the error. Every checkpoint carries a digest of
its content (``"digest"``), which loading verifies: a damaged file never loads with changed
tensors.
"""

from __future__ import annotations

import pickle
import random
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .files import atomic_output, content_digest

#: Options that may differ when a run is resumed; any other difference is refused.
RESUMABLE_CHANGES = frozenset({"run_dir", "steps", "time_budget", "workers", "checkpoint_every", "compile",
                               "channels_last", "teacher_cache", "precise_bn_batches"})
#: What ``-m`` expects, for error messages.
EXPECTED = "a train.py checkpoint (checkpoint.pt) or, where a model is only run, its .onnx export"
#: Checkpoints written before the RNG states were stored as tensors pickled NumPy's state as an
#: array; these are the only globals such a file needs, and none of them runs code.
_LEGACY_NUMPY_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType,
                         (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct]


class CheckpointError(ValueError):
    """A file that is not a checkpoint this code wrote, or that holds more than tensors and data."""


def rng_state() -> dict:
    """The torch, Python, NumPy (and CUDA) generator states, as tensors and plain data."""
    numpy_state = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"bit_generator": numpy_state["bit_generator"],
                      "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                      "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                      "gauss": float(numpy_state["gauss"])},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (or the NumPy tuple of older checkpoints)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        saved = {"bit_generator": saved["bit_generator"], "has_gauss": saved["has_gauss"], "gauss": saved["gauss"],
                 "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]}}
    np.random.set_state(saved)
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint.
    Under ``torch.distributed`` every rank has written its file before any replaces its previous one."""
    state = {**state, "digest": content_digest(state)}
    with atomic_output(path, path.with_suffix(".tmp")) as partial:
        torch.save(state, partial)
        if dist.is_initialized():
            dist.barrier()


def _kind_of(path: Path) -> str | None:
    """What a file that is not a torch checkpoint looks like, when that can be told from its bytes."""
    head = path.read_bytes()[:64] if path.stat().st_size else b""
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile:
            return "a damaged or truncated zip archive"
        if names and all(name.endswith(".npy") for name in names):
            return "a NumPy .npz archive (a registry?)"
        return None
    if path.suffix.lower() == ".onnx" or head[:1] == b"\x08":
        return "an ONNX model"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return None


def read_checkpoint(path: str | Path) -> dict:
    """The dict saved in ``path``, read with ``weights_only=True``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: ``path`` is a folder, a file of another kind, damaged, or holds Python
            objects other than tensors and plain data (then nothing of it was executed).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {EXPECTED}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected {EXPECTED}")
    kind = _kind_of(path)
    if kind is not None:
        raise CheckpointError(f"{path} is {kind}, not a checkpoint; expected {EXPECTED}")
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects other than tensors and plain data, which a "
                f"train.py checkpoint never does (nothing of it was run). Only if you trust its source, inspect it "
                f"with torch.load(..., weights_only=False)") from None
        raise CheckpointError(f"{path} is damaged or not a checkpoint ({error}); expected {EXPECTED}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is damaged, truncated or not a checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'no detail'}); expected {EXPECTED}") \
            from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is a torch file but not a train.py checkpoint (no 'model' entry)")
    digest = state.pop("digest", None)
    if digest is None:
        warnings.warn(f"{path} has no digest (written by an earlier version): its content is not verified",
                      stacklevel=2)
    elif digest != content_digest(state):
        raise CheckpointError(f"{path} is damaged: its content does not match the digest written with it "
                              "(a changed byte); restore it from a copy")
    return state


def check_resumable(path: Path, saved: dict, current: dict) -> None:
    """Refuse to resume from ``path`` (config ``saved``) with options that change the run."""
    changed = sorted(k for k in current.keys() | saved.keys()
                     if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if changed:
        raise ValueError(f"{path} was saved by a run with other options ("
                         + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} now {current.get(k)}" for k in changed)
                         + "); resuming would not continue that run: use its options or a new --run-dir")
    if saved["steps"] != current["steps"]:
        warnings.warn(f"resuming with --steps {current['steps']} instead of {saved['steps']}: the learning-rate "
                      "schedule from here on is the new one's", stacklevel=3)


def training_state(step: int, config, student, loss_fn, optimizers: list, schedulers: list, plan: dict) -> dict:
    """Everything a resume needs, and the config ``CheckpointEmbedder`` rebuilds the model from.
    ``optimizers`` (the network's, the centers') and their ``schedulers`` are saved as lists;
    ``plan`` is the step plan's state (``fastpfc.doc.schedule.StepPlan.state``)."""
    return {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "config": asdict(config), "model": student.embedder.state_dict(), "loss": loss_fn.state_dict(),
            "projection": student.projection.state_dict() if student.projection is not None else None,
            "optimizers": [o.state_dict() for o in optimizers], "schedulers": [s.state_dict() for s in schedulers],
            "plan": plan, "rng": rng_state()}
