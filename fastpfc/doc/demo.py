"""Synthetic registration and query folders (no download): the registry walkthrough and its tests.

``write_demo(root, ...)`` writes unseen synthetic document types (the evaluation types of
``train.py``) as::

    root/register/<type>/clean.png           one clean image for the first half of the types
    root/new/<type>/clean.png                one clean image for the other half (registered later)
    root/queries/<type>/<n>.png              camera captures of every type

With ``sub_labels=True`` every registered type also gets sub-labels, registered from one clean
image each and queried with captures: ``glare`` and ``damaged`` (:data:`VARIANTS`), and
``generation-2``, the family's newer format of the same type::

    root/register/<type>/<sub-label>/clean.png
    root/queries/<type>/<sub-label>/<n>.png
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from .synthetic import EVAL_TYPE_OFFSET, FAMILY_SIZE, GENERATIONS, VARIANTS, DocumentType, capture

GENERATION_SUB_LABEL = "generation-2"


def type_name(doc_type: DocumentType) -> str:
    return f"{doc_type.kind}-{doc_type.type_id - EVAL_TYPE_OFFSET:05d}"


def _first_generation_types(first_id: int, count: int) -> list[DocumentType]:
    ids = (i for i in range(first_id, first_id + 2 * count * GENERATIONS)
           if i % (FAMILY_SIZE * GENERATIONS) < FAMILY_SIZE)
    return [DocumentType.from_id(i) for i, _ in zip(ids, range(count), strict=False)]


def _views(doc_type: DocumentType, sub_label: str | None):
    """(render(instance), capture seed of instance) for a type or one of its sub-labels."""
    if sub_label == GENERATION_SUB_LABEL:
        newer = DocumentType.from_id(doc_type.type_id + FAMILY_SIZE)
        return newer.render, lambda i: newer.type_id * 1_000_003 + i
    if sub_label is not None:
        return (lambda i: VARIANTS[sub_label](doc_type.render(i), seed=doc_type.type_id * 997 + i),
                lambda i: doc_type.type_id * 1_000_003 + i + 500_000)
    return doc_type.render, lambda i: doc_type.type_id * 1_000_003 + i


def write_demo(root: str | Path, num_types: int = 100, captures: int = 8, seed: int = 0, size: int = 128,
               sub_labels: bool = False, progress: bool = False) -> list[str]:
    """Write the folders (layout: module docstring); returns the type names, registered half first.

    Without sub-labels the types and captures are exactly ``train.py``'s evaluation set when
    ``seed``, ``num_types``, ``captures`` and ``size`` equal its ``--seed``, ``--eval-types``,
    ``--eval-per-type`` and ``--image-size``, so the registry's accuracy can be compared with the
    run's eval.json.
    """
    root = Path(root)
    first_id = EVAL_TYPE_OFFSET + seed * num_types
    if sub_labels:
        types = _first_generation_types(first_id, num_types)
    else:
        types = [DocumentType.from_id(first_id + t) for t in range(num_types)]
    labels = [None] + (sorted(VARIANTS) + [GENERATION_SUB_LABEL] if sub_labels else [])
    for position, doc_type in enumerate(tqdm(types, desc="synthetic types", disable=not progress)):
        registered = position < num_types // 2
        for sub_label in labels if registered else [None]:
            render, capture_seed = _views(doc_type, sub_label)
            folder = Path(type_name(doc_type), *([sub_label] if sub_label else []))
            (root / ("register" if registered else "new") / folder).mkdir(parents=True, exist_ok=True)
            render(0).save(root / ("register" if registered else "new") / folder / "clean.png")
            (root / "queries" / folder).mkdir(parents=True, exist_ok=True)
            for instance in range(captures):
                view = capture(render(instance), seed=capture_seed(instance) * 7919 * 31 + seed, size=size)
                view.save(root / "queries" / folder / f"{instance}.png")
    return [type_name(t) for t in types]
