"""A registry of documents by example: register images under a type (and optional sub-label),
classify new images by their nearest registered examples with faiss.

Labels come from a folder layout: ``root/<type>/image`` registers the type itself,
``root/<type>/<sub-label>/image`` a sub-label of it (glare, damaged, an older format...). A label
may have any number of examples. Adding or removing a label updates the index in place; nothing
else is re-embedded. The same file registered twice under one label is skipped and reported; the
same file under two labels is refused and reported (it would make answers depend on order).

Search is exact inner product (``IndexFlatIP``) by default, moved to the GPU when faiss has GPU
support and CUDA is present; ``index="ivf"`` or ``"hnsw"`` are approximate options for registries
of 100k+ entries. Answers are deterministic: faiss searches are, and the same file is never
registered under two labels.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .embedders import embed_paths
from .files import atomic_output, file_digest
from .folders import list_images

FORMAT_VERSION = 1
UNKNOWN = "unknown"
#: faiss index kinds: exact inner product, or approximate (inverted lists, HNSW graph).
INDEXES = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class Entry:
    """One registered example."""

    type: str
    sub_label: str | None
    source: str  # the file it came from
    digest: str  # sha256 of the file's bytes


@dataclass(frozen=True)
class Match:
    """A classification: ``type`` is :data:`UNKNOWN` when the best score is at or below the threshold;
    ``sub_label`` is ``None`` when the type matched but none of its sub-labels did."""

    type: str
    sub_label: str | None
    score: float
    source: str | None  # the registered example that decided the type
    best: str | None = None  # <type>[/<sub-label>] of the best example, also when it was rejected


@dataclass
class RegistrationReport:
    added: list[Entry] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (skipped file, registered copy)
    conflicts: list[tuple[str, str, str]] = field(default_factory=list)  # (refused file, its label, other label)


def label_of(path: Path, root: Path) -> tuple[str, str | None]:
    """(type, sub-label) of the image ``path`` in the layout ``root/<type>/[<sub-label>/]image``."""
    parts = path.relative_to(root).parts
    if len(parts) == 1:
        raise ValueError(f"{path} lies directly in {root}; put it in a <type>/ or <type>/<sub-label>/ folder")
    if len(parts) > 3:
        raise ValueError(f"{path} is nested too deep; the layout is {root}/<type>/[<sub-label>/]image")
    return parts[0], parts[1] if len(parts) == 3 else None


def labelled_images(root: str | Path) -> list[tuple[Path, str, str | None]]:
    """``(path, type, sub-label)`` of the images under ``root``, sorted by path."""
    root = Path(root)
    return [(root / relative, *label_of(root / relative, root)) for relative in list_images(root)]


#: A folder whose "types" average this many sub-labels, shared between them, looks like a folder
#: of type folders (e.g. demo/ holding register/, new/ and queries/) given one level too high.
_SUSPECT_SUB_LABELS_PER_TYPE = 8


def layout_warning(items: list[tuple[Path, str, str | None]]) -> str | None:
    """Why ``items`` (from :func:`labelled_images`) look like the parent of the intended folder:
    every image sits in a second-level folder, the "types" have many such folders each, and the
    same names recur under several of them (real sub-labels are few per type). ``None`` otherwise."""
    if not items or any(sub_label is None for _, _, sub_label in items):
        return None
    subs: dict[str, set[str]] = {}
    for _, doc_type, sub_label in items:
        subs.setdefault(doc_type, set()).add(sub_label)
    names = [name for group in subs.values() for name in group]
    shared = len(names) - len(set(names))
    if len(names) / len(subs) < _SUSPECT_SUB_LABELS_PER_TYPE or shared == 0:
        return None
    return (f"the folder looks like a folder of folders of types: its {len(subs)} top-level folders "
            f"({', '.join(sorted(subs)[:5])}{', ...' if len(subs) > 5 else ''}) would become types with "
            f"{len(names)} sub-labels, {shared} of them repeated under several types; register one of those "
            f"folders (the layout is <folder>/<type>/[<sub-label>/]image), or pass --force")


def _label(entry: Entry) -> str:
    return entry.type if entry.sub_label is None else f"{entry.type}/{entry.sub_label}"


def _on_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _build_index(kind: str, dim: int, features: np.ndarray):
    """An empty faiss index of ``kind`` (IVF: trained on ``features``); the caller adds the vectors."""
    import faiss

    if kind == "flat":
        base = faiss.IndexFlatIP(dim)
        return faiss.IndexIDMap2(faiss.index_cpu_to_all_gpus(base) if _on_gpu() else base)
    if kind == "ivf":
        lists = max(1, int(np.sqrt(len(features))))
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        base.train(features)
        base.nprobe = min(lists, 16)
        return base  # IVF keeps ids itself (and an id map around it breaks removals after a reload)
    if kind == "hnsw":
        return faiss.IndexIDMap2(faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT))
    raise ValueError(f"unknown index {kind!r}; choose one of {INDEXES}")


def _open_registry_file(path: str | Path):
    """``np.load`` of a registry (never unpickling), or a ValueError that says what the file is not."""
    expected = "-r expects the .npz file that `fastpfc-doc register` writes (a new path creates one)"
    try:
        saved = np.load(path, allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - np.load raises many kinds for files of other kinds
        raise ValueError(f"{path} is not a registry ({type(error).__name__}: {error}); {expected}") from None
    if not isinstance(saved, np.lib.npyio.NpzFile) or not {"meta", "features", "ids", "index"} <= set(saved.files):
        if isinstance(saved, np.lib.npyio.NpzFile):
            saved.close()
        raise ValueError(f"{path} is an archive without the entries of a registry; {expected}")
    return saved


class Registry:
    """Registered examples of ``embedder`` (see :mod:`fastpfc.doc.embedders`) and their faiss index.

    With ``views`` > 0 a registered example is the unit mean of the embeddings of its image and
    ``views`` simulated photos of it (:func:`fastpfc.doc.embedders.registration_views`); queries
    are embedded as they are. A registry keeps its ``views`` for every later registration."""

    def __init__(self, embedder, index: str = "flat", views: int = 0) -> None:
        if index not in INDEXES:
            raise ValueError(f"unknown index {index!r}; choose one of {INDEXES}")
        if views < 0:
            raise ValueError(f"views must be >= 0, got {views}")
        self.embedder, self.index_kind, self.views = embedder, index, views
        self.entries: dict[int, Entry] = {}
        self.features = np.zeros((0, embedder.dim), dtype=np.float32)
        self.ids = np.zeros(0, dtype=np.int64)
        self._next_id, self._index, self._trained_on = 0, None, 0

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labels(self) -> list[str]:
        """The registered labels, ``type`` or ``type/sub-label``, sorted."""
        return sorted({_label(e) for e in self.entries.values()})

    # ----- registration -------------------------------------------------------------------------
    def add_folder(self, root: str | Path, progress: bool = False) -> RegistrationReport:
        """Register every image under ``root`` (layout: module docstring)."""
        return self.add(labelled_images(root), progress=progress)

    def add(self, items: list[tuple[Path, str, str | None]], progress: bool = False) -> RegistrationReport:
        """Register ``(path, type, sub-label)`` items; duplicates are skipped and conflicts refused,
        both listed in the returned report."""
        report = RegistrationReport()
        by_digest = {e.digest: e for e in self.entries.values()}
        accepted: list[Entry] = []
        for path, doc_type, sub_label in items:
            if not doc_type or doc_type == UNKNOWN or "/" in doc_type or sub_label == "":
                raise ValueError(f"invalid label {doc_type!r}/{sub_label!r} for {path}")
            entry = Entry(doc_type, sub_label, str(path), file_digest(path))
            earlier = by_digest.get(entry.digest)
            if earlier is None:
                by_digest[entry.digest] = entry
                accepted.append(entry)
            elif _label(earlier) == _label(entry):
                report.duplicates.append((entry.source, earlier.source))
            else:
                report.conflicts.append((entry.source, _label(entry), _label(earlier)))
        features = embed_paths(self.embedder, [Path(e.source) for e in accepted], progress=progress, views=self.views)
        self._append(accepted, features)
        report.added = accepted
        return report

    def _append(self, entries: list[Entry], features: np.ndarray) -> None:
        ids = np.arange(self._next_id, self._next_id + len(entries), dtype=np.int64)
        self._next_id += len(entries)
        self.entries.update(zip(ids.tolist(), entries, strict=True))
        self.features = np.concatenate([self.features, features])
        self.ids = np.concatenate([self.ids, ids])
        outgrown = self.index_kind == "ivf" and len(self.ids) > 16 * self._trained_on  # retrain its lists
        if self._index is None or outgrown:
            self._rebuild()
        elif len(ids):
            self._index.add_with_ids(features, ids)

    def remove(self, doc_type: str, sub_label: str | None = None) -> int:
        """Remove a type (with all its sub-labels) or one sub-label; returns how many examples went."""
        gone = [i for i, e in self.entries.items()
                if e.type == doc_type and (sub_label is None or e.sub_label == sub_label)]
        if not gone:
            raise KeyError(f"{doc_type if sub_label is None else doc_type + '/' + sub_label} is not registered")
        keep = ~np.isin(self.ids, gone)
        self.features, self.ids = self.features[keep], self.ids[keep]
        for i in gone:
            del self.entries[i]
        if self.index_kind == "hnsw" or (self.index_kind == "flat" and _on_gpu()):
            self._rebuild()  # HNSW graphs and GPU indexes cannot delete: this one index is rebuilt
        else:
            self._index.remove_ids(np.asarray(gone, dtype=np.int64))
        return len(gone)

    def _rebuild(self) -> None:
        if self.index_kind == "ivf" and len(self.features) == 0:
            self._index = None  # IVF needs data to train on; built with the first examples
            return
        self._index = _build_index(self.index_kind, self.embedder.dim, self.features)
        self._trained_on = len(self.ids)
        if len(self.ids):
            self._index.add_with_ids(self.features, self.ids)

    # ----- search -------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int = 5) -> list[list[tuple[float, Entry]]]:
        """The ``k`` best ``(score, entry)`` of each query ``[Q, D]`` (unit rows), best first."""
        if not self.entries:
            raise ValueError("the registry is empty: register some documents first")
        k = min(k, len(self.entries))
        scores, ids = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        results = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            hits = sorted((-s, i) for s, i in zip(row_scores.tolist(), row_ids.tolist(), strict=True) if i >= 0)
            results.append([(-s, self.entries[i]) for s, i in hits])
        return results

    def classify_features(self, queries: np.ndarray, threshold: float,
                          sub_threshold: float | None = None) -> list[Match]:
        """Classify unit embeddings ``[Q, D]``: the best example decides the type (or
        :data:`UNKNOWN` at or below ``threshold``). When that example is a sub-label's (it beat the
        type's own examples and the other sub-labels) and scores above ``sub_threshold`` (default
        ``threshold``; a stricter one asks more of a sub-label), the sub-label is reported with its
        parent type; otherwise the parent type alone."""
        sub_threshold = threshold if sub_threshold is None else sub_threshold
        for name, value in (("threshold", threshold), ("sub-threshold", sub_threshold)):
            if not math.isfinite(value):  # NaN would accept every query: every comparison with it is False
                raise ValueError(f"the {name} must be a finite score, got {value}")
        matches = []
        for hits in self.search(queries, 1):
            score, best = hits[0] if hits else (-1.0, None)  # an IVF probe may find no list with entries
            best_label = None if best is None else _label(best)
            if best is None or score <= threshold:  # accepted strictly above, as in fastpfc.doc.evaluation
                matches.append(Match(UNKNOWN, None, score, None, best_label))
            else:
                matches.append(Match(best.type, best.sub_label if score > sub_threshold else None, score,
                                     best.source, best_label))
        return matches

    def classify(self, paths: list[Path], threshold: float, sub_threshold: float | None = None,
                 progress: bool = False) -> list[Match]:
        """Classify image files (see :meth:`classify_features`)."""
        return self.classify_features(embed_paths(self.embedder, paths, progress=progress), threshold, sub_threshold)

    def threshold_at(self, target_fpr: float) -> float:
        """The model's threshold at ``target_fpr``, from its evaluation (eval.json of the run)."""
        points = self.embedder.operating_points
        if target_fpr not in points:
            raise ValueError(f"no reliable threshold at FPR={target_fpr} in the model's evaluation "
                             f"(known: {sorted(points) or 'none; is eval.json beside the checkpoint?'}); "
                             "pass a threshold instead")
        return points[target_fpr]

    # ----- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write features, labels, index and model identity to one ``.npz`` (atomically)."""
        import faiss

        path = Path(path)
        approximate = self.index_kind != "flat" and self._index is not None  # flat is rebuilt on load (cheap)
        meta = {"version": FORMAT_VERSION, "model_id": self.embedder.model_id, "index": self.index_kind,
                "views": self.views,
                "next_id": self._next_id, "trained_on": self._trained_on,
                "entries": [asdict(self.entries[i]) for i in self.ids.tolist()]}
        with atomic_output(path, path.with_name(path.name + ".partial.npz")) as partial:
            np.savez(partial, features=self.features, ids=self.ids,
                     meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                     index=faiss.serialize_index(self._index) if approximate else np.zeros(0, np.uint8))

    @classmethod
    def load(cls, path: str | Path, embedder) -> Registry:
        """A saved registry; refused when ``embedder`` is not the model it was built with."""
        import faiss

        if Path(path).is_dir():
            raise ValueError(f"{path} is a folder; -r expects a registry file (.npz) written by `fastpfc-doc register`")
        if not Path(path).is_file():
            raise FileNotFoundError(f"registry {path} does not exist")
        with _open_registry_file(path) as saved:
            try:  # np.load reads lazily: a damaged member (zip CRC) shows up here
                arrays = {name: saved[name] for name in ("meta", "features", "ids", "index")}
                meta = json.loads(arrays["meta"].tobytes())
                meta["version"], meta["model_id"], meta["entries"]  # noqa: B018 - the keys every registry has
            except (zipfile.BadZipFile, KeyError, ValueError, TypeError, EOFError, OSError,
                    UnicodeDecodeError) as error:
                raise ValueError(f"{path} is a damaged registry ({type(error).__name__}: {error}); register the "
                                 "folder again") from None
            if meta["version"] != FORMAT_VERSION:
                raise ValueError(f"{path} has registry format {meta['version']}, this fastpfc reads {FORMAT_VERSION}")
            if meta["model_id"] != embedder.model_id:
                raise ValueError(f"{path} was built with model {meta['model_id']}, not with this model "
                                 f"({embedder.model_id}); register the folder again with this model")
            if arrays["features"].shape[1:] != (embedder.dim,):  # same weights, another --layout
                raise ValueError(f"{path} holds {arrays['features'].shape[1]}-dimensional examples, but this model "
                                 f"embeds in {embedder.dim} dimensions (another layout?); register the folder "
                                 "again with this model")
            registry = cls(embedder, meta["index"], meta.get("views", 0))  # registries before views: 0
            registry.features, registry.ids = arrays["features"], arrays["ids"]
            registry.entries = {i: Entry(**e) for i, e in zip(registry.ids.tolist(), meta["entries"], strict=True)}
            registry._next_id, registry._trained_on = meta["next_id"], meta["trained_on"]
            if len(arrays["index"]):
                try:
                    registry._index = faiss.deserialize_index(arrays["index"])
                except RuntimeError as error:
                    raise ValueError(f"{path} holds a damaged index ({str(error).splitlines()[0]}); register the "
                                     "folder again") from None
            else:
                registry._rebuild()
        return registry
