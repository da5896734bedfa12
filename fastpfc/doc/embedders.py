"""Trained document embedders for inference: a ``train.py`` checkpoint or its ONNX export.

Both kinds are callables ``images [B, 3, S, S] float in [0, 1] -> [B, D] float32 unit rows`` with
the same attributes: ``image_size`` (S), ``dim`` (D), ``model_id`` (a digest of the weights and of
the appended layout, equal for a checkpoint and its export, so a registry built with one is usable
with the other) and ``operating_points`` (``{target FPR: threshold}`` from the run's evaluation, when known).
:func:`load_embedder` picks the kind by file suffix.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .checkpoints import read_checkpoint
from .files import file_digest
from .images import read_image, to_tensor
from .model import DocumentEmbedder
from .synthetic import capture

_META_PREFIX = "fastpfc."


def model_identity(model: nn.Module) -> str:
    """A digest of every parameter and buffer of ``model`` (names and bytes) and, when it appends a
    layout (a :class:`DocumentEmbedder` with ``layout_weight`` > 0), of the layout and its weight,
    and when it averages crops (``embed_crops`` other than ``full``), of their name: the same
    weights embedded another way give other embeddings, so they are another model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if getattr(model, "layout_weight", 0):
        digest.update(f"layout {model.layout} weight {float(model.layout_weight)!r}".encode())
    if getattr(model, "embed_crops", "full") != "full":
        digest.update(f"crops {model.embed_crops}".encode())
    return digest.hexdigest()[:20]


def _operating_points(eval_json: Path, model_id: str) -> dict[float, float]:
    """``{target FPR: threshold}`` from a ``train.py`` eval.json, when it evaluated this very
    model (its ``model_id``); ``{}`` otherwise."""
    if not eval_json.exists():
        return {}
    try:
        trained = json.loads(eval_json.read_text())["trained"]
        if trained.get("model_id") != model_id:
            warnings.warn(f"{eval_json} evaluated another model than the checkpoint beside it (other weights, "
                          "another layout or crops, or a model id of an earlier version); its thresholds are not used "
                          "(evaluate this checkpoint with `fastpfc-doc eval`, or pass --threshold)",
                          stacklevel=3)
            return {}
        return {float(p["target_fpr"]): float(p["threshold"]) for p in trained["verification"]["points"]
                if p["reliable"] and math.isfinite(p["threshold"])}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{eval_json} (beside the checkpoint) is damaged or not a train.py eval.json "
                         f"({type(error).__name__}: {error}); remove it, or evaluate the checkpoint again with "
                         "`fastpfc-doc eval`") from None


class CheckpointEmbedder:
    """The :class:`DocumentEmbedder` of a ``train.py`` checkpoint (config read from the checkpoint,
    or from ``config.json`` beside it); thresholds from ``eval.json`` beside it."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None) -> None:
        path = Path(path)
        state = read_checkpoint(path)
        config = state.get("config")
        if config is None:
            if not (path.parent / "config.json").exists():
                raise ValueError(f"{path} holds no config and there is no config.json beside it")
            config = json.loads((path.parent / "config.json").read_text())
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = DocumentEmbedder.from_config(config)
        self.model.load_state_dict(state["model"])
        # channels_last as in training: on the 2-core CPU 1.62 against 2.09 ms per image (batches of
        # 256), 6.1 against 11.0 with shifted crops; embeddings within 5e-8
        self.model.to(self.device, memory_format=torch.channels_last).eval()
        self.image_size, self.dim = config["image_size"], self.model.embedding_size
        self.model_id = model_identity(self.model)
        self.operating_points = _operating_points(path.parent / "eval.json", self.model_id)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images.to(self.device)).cpu()


def _onnx_digest(proto) -> str:
    """A digest of an ONNX model's graph (its operators and weights) and its fastpfc metadata."""
    digest = hashlib.blake2b(proto.graph.SerializeToString(), digest_size=20)
    for entry in sorted(proto.metadata_props, key=lambda e: e.key):
        if entry.key != _META_PREFIX + "digest":
            digest.update(f"<{entry.key}={entry.value}>".encode())
    return digest.hexdigest()


def _verify_onnx(path: Path, meta: dict[str, str]) -> None:
    """Refuse an export whose graph or metadata no longer match the digest written at export."""
    try:
        import onnx
    except ImportError:
        warnings.warn(f"the onnx package is not installed: {path} is run without verifying its digest",
                      stacklevel=3)
        return
    if _META_PREFIX + "digest" not in meta:
        warnings.warn(f"{path} has no digest (exported by an earlier version): its weights are not verified",
                      stacklevel=3)
    elif _onnx_digest(onnx.load(str(path))) != meta[_META_PREFIX + "digest"]:
        raise ValueError(f"{path} is damaged: its weights or metadata do not match the digest written at export "
                         "(a changed byte); export it again from the checkpoint")


class OnnxEmbedder:
    """An ONNX export of :func:`export_onnx`, run with onnxruntime (CUDA when it has it)."""

    def __init__(self, path: str | Path) -> None:
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError("running an ONNX model needs onnxruntime: pip install onnxruntime") from error
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"ONNX model {path} does not exist")
        if not path.is_file():
            raise ValueError(f"{path} is a folder; expected an .onnx file written by `fastpfc-doc export`")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in onnxruntime.get_available_providers()]
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as error:  # noqa: BLE001 - onnxruntime's errors share no base class worth naming
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"{path} is not a valid ONNX model ({detail[:200]}); expected an .onnx file written "
                             "by `fastpfc-doc export` (a train.py checkpoint must not end in .onnx)") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if _META_PREFIX + "model_id" not in meta:
            raise ValueError(f"{path} was not exported by fastpfc (no {_META_PREFIX}model_id metadata)")
        _verify_onnx(path, meta)
        self.model_id = meta[_META_PREFIX + "model_id"]
        self.image_size = int(meta[_META_PREFIX + "image_size"])
        self.dim = int(meta[_META_PREFIX + "dim"])
        self.operating_points = {float(k): v for k, v in json.loads(meta[_META_PREFIX + "operating_points"]).items()}
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: images.float().numpy()})[0])


#: Embedder kinds by file suffix; anything else is taken for a checkpoint.
EMBEDDERS = {".onnx": OnnxEmbedder}


def load_embedder(path: str | Path):
    """A :class:`CheckpointEmbedder` or :class:`OnnxEmbedder`, by ``path``'s suffix."""
    return EMBEDDERS.get(Path(path).suffix.lower(), CheckpointEmbedder)(path)


class _Normalized(nn.Module):
    """The model's :meth:`DocumentEmbedder.embed` as its ``forward`` (what ONNX records)."""

    def __init__(self, model: DocumentEmbedder) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images)


def export_onnx(embedder: CheckpointEmbedder, path: str | Path, opset: int = 18,
                tolerance: float = 1e-4) -> float | None:
    """Write ``embedder`` as ONNX: input ``images [batch, 3, S, S]`` (dynamic batch), output the
    L2-normalised embedding ``[batch, D]``, with the model identity and thresholds as metadata.

    Returns the largest absolute difference from the PyTorch model (fp32, CPU) on a random batch of
    3 when onnxruntime is installed (``None`` otherwise); a difference above ``tolerance`` raises
    ``ValueError`` and writes nothing. The file is written under a temporary name and renamed into
    place only once checked.
    """
    import onnx

    if opset < 17:
        raise ValueError(f"opset must be at least 17 (LayerNormalization), got {opset}")
    path = Path(path)
    model = copy.deepcopy(_Normalized(embedder.model)).cpu().float().eval()  # the embedder keeps its device
    model.to(memory_format=torch.contiguous_format)
    size = embedder.image_size
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    partial = path.with_name(path.name + ".partial")
    torch.onnx.export(model, (example,), str(partial), input_names=["images"], output_names=["embeddings"],
                      opset_version=opset, dynamo=True, external_data=False, verbose=False,
                      dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}})
    proto = onnx.load(str(partial))
    metadata = {"model_id": embedder.model_id, "image_size": size, "dim": embedder.dim,
                "operating_points": json.dumps(embedder.operating_points)}
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = _META_PREFIX + key, str(value)
    digest = _onnx_digest(proto)
    entry = proto.metadata_props.add()
    entry.key, entry.value = _META_PREFIX + "digest", digest
    onnx.save(proto, str(partial))
    difference = None
    try:
        exported = OnnxEmbedder(partial)
    except ImportError:
        pass
    else:
        images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            difference = float((exported(images) - model(images)).abs().max())
        if not difference <= tolerance:  # NaN included
            partial.unlink()
            raise ValueError(f"the ONNX export differs from the PyTorch model by {difference:.2e} (tolerance "
                             f"{tolerance:.0e}); nothing was written")
    os.replace(partial, path)
    return difference


def view_seed(path: Path) -> int:
    """Seed of the simulated photos of the image file ``path``: a digest of its bytes, so that the
    same image gets the same views wherever and whenever it is registered."""
    return int.from_bytes(bytes.fromhex(file_digest(path))[:8], "little")


def registration_views(image: Image.Image, size: int, views: int, seed: int) -> torch.Tensor:
    """``image`` resized to ``size`` followed by ``views`` photos of it by the training camera
    (:func:`fastpfc.doc.synthetic.capture`, snug framing): [1 + views, 3, size, size] float in [0, 1]."""
    shots = [image.resize((size, size), Image.BILINEAR)]
    shots += [capture(image, seed=seed * 101 + view, size=size) for view in range(views)]
    return torch.stack([to_tensor(shot) for shot in shots])


class _PathImages(torch.utils.data.Dataset):
    """The image files ``paths``, each as :func:`registration_views` ([1 + views, 3, size, size])."""

    def __init__(self, paths: list[Path], size: int, views: int) -> None:
        self.paths, self.size, self.views = paths, size, views

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int) -> torch.Tensor:
        path = self.paths[item]
        return registration_views(read_image(path), self.size, self.views, view_seed(path) if self.views else 0)


def embed_paths(embedder, paths: list[Path], batch_size: int = 64, progress: bool = False,
                workers: int = 0, views: int = 0) -> np.ndarray:
    """Unit embeddings ``[len(paths), D]`` float32 of the image files ``paths``. With ``views`` > 0
    each is the unit mean of the embeddings of the image and ``views`` simulated photos of it
    (:func:`registration_views`): a registered example nearer to how its photos will look."""
    from tqdm import tqdm

    if not paths:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    loader = torch.utils.data.DataLoader(_PathImages(list(paths), embedder.image_size, views),
                                         batch_size=max(1, batch_size // (1 + views)), num_workers=workers)
    batches = []
    for shots in tqdm(loader, desc="embed", disable=not progress):  # [B, 1 + views, 3, S, S]
        embeddings = embedder(shots.flatten(0, 1))
        if views:
            embeddings = torch.nn.functional.normalize(embeddings.view(len(shots), 1 + views, -1).sum(dim=1), dim=1)
        batches.append(embeddings.numpy())
    return np.concatenate(batches).astype(np.float32)
