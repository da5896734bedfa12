"""The synthetic document generator: deterministic, disjoint splits, template shared, content varies."""

import random

import numpy as np
import pytest
import torch

from fastpfc.doc.synthetic import (
    CANVAS_PAD,
    FAMILY_SIZE,
    FRAMINGS,
    DocumentType,
    SyntheticDocuments,
    _frame_quad,
    capture,
)


def test_deterministic_from_seeds():
    first, second = SyntheticDocuments(4, 3, seed=5), SyntheticDocuments(4, 3, seed=5)
    for item in (0, 5, 11):
        assert torch.equal(first[item][0], second[item][0]) and first[item][1] == second[item][1]
    assert not torch.equal(first[0][0], SyntheticDocuments(4, 3, seed=6)[0][0])


def test_train_and_eval_types_never_overlap():
    train = SyntheticDocuments(200, 1, split="train")
    evaluation = SyntheticDocuments(200, 1, split="eval")
    assert not {t.type_id for t in train.types} & {t.type_id for t in evaluation.types}
    assert not {t.family for t in train.types} & {t.family for t in evaluation.types}


def test_instances_share_the_template_and_differ_in_content():
    doc_type = DocumentType.from_id(7)
    a, b = (np.asarray(doc_type.render(i)) for i in (0, 1))
    band = round(doc_type.height * doc_type.layout["header"])
    assert np.array_equal(a[:band], b[:band]), "header band (title, logos) is part of the template"
    assert not np.array_equal(a, b), "field values differ between instances"


def test_look_alikes_share_layout_not_style():
    first, sibling = DocumentType.from_id(0), DocumentType.from_id(1)
    assert first.family == sibling.family and first.layout == sibling.layout
    assert first.style != sibling.style
    newer = DocumentType.from_id(FAMILY_SIZE)  # same family, next format generation
    assert newer.family == first.family and newer.generation == 1 and newer.layout != first.layout


def _first_artwork_type(wanted) -> DocumentType:
    """The first artwork document type whose layout ``wanted(layout)`` accepts."""
    return next(t for t in (DocumentType.from_id(i, artwork=True) for i in range(600)) if wanted(t.layout))


def test_artwork_types_carry_their_own_pictures_on_the_same_template():
    plain = DocumentType.from_id(7)
    art = DocumentType.from_id(7, artwork=True)
    assert "artwork" not in plain.layout
    assert {k: v for k, v in art.layout.items() if k not in ("artwork", "picture_logos")} == plain.layout
    assert art.style == plain.style  # the pictures take no draws from the colours
    a, b = (np.asarray(art.render(i), dtype=np.float32) for i in (0, 1))
    assert np.array_equal(a, np.asarray(DocumentType.from_id(7, artwork=True).render(0)))  # reproducible
    band = round(art.height * art.layout["header"])
    assert np.array_equal(a[:band], b[:band]), "the header and its logos are the template's"
    # a picture over the whole card changes most of its pixels, not only the field text
    full = _first_artwork_type(lambda layout: layout["artwork"][1] == "full")
    top = round(full.height * full.layout["header"])
    change = np.abs(np.asarray(full.render(0), dtype=np.float32)
                    - np.asarray(DocumentType.from_id(full.type_id).render(0)))
    assert np.median(change[top:]) > 3
    sibling = DocumentType.from_id(8, artwork=True)  # a look-alike: the same kind of picture, its own drawing
    assert sibling.layout["artwork"] == art.layout["artwork"]
    assert not np.array_equal(a[:band], np.asarray(sibling.render(0))[:band])


def test_artwork_photo_changes_with_the_instance_and_logos_are_pictures():
    doc_type = _first_artwork_type(lambda layout: layout["photo"])
    box = tuple(round(v) for v in (0.06 * doc_type.width if doc_type.layout["photo_left"] else 0.68 * doc_type.width,
                                   doc_type.height * (doc_type.layout["header"] + 0.1)))
    def photo(document_type: DocumentType, instance: int) -> np.ndarray:
        return np.asarray(document_type.render(instance), dtype=np.float32)[box[1] + 4:box[1] + 20,
                                                                             box[0] + 4:box[0] + 20]

    assert np.abs(photo(doc_type, 0) - photo(doc_type, 1)).mean() > 5
    # a picture, not the plain type's flat box with a head on it (std 8 here against 55)
    assert photo(doc_type, 0).std() > 3 * photo(DocumentType.from_id(doc_type.type_id), 0).std()
    with_logos = _first_artwork_type(lambda layout: layout["picture_logos"])
    without = DocumentType.from_id(with_logos.type_id)
    band = round(with_logos.height * with_logos.layout["header"])
    assert np.abs(np.asarray(with_logos.render(0), dtype=np.float32)[:band]
                  - np.asarray(without.render(0), dtype=np.float32)[:band]).mean() > 1


def test_captures():
    doc = DocumentType.from_id(3).render(0)
    shots = [np.asarray(capture(doc, seed=s, size=96), dtype=np.float32) for s in (1, 2)]
    assert shots[0].shape == (96, 96, 3)
    assert np.abs(shots[0] - shots[1]).mean() > 5, "two captures of one document differ"
    clean = np.asarray(doc.resize((96, 96)), dtype=np.float32)
    assert np.abs(shots[0] - clean).mean() > 5


def _quad_stats(framing: str, width: int, height: int, seeds: int = 400):
    """(area of the framed quad over the document's, offset of its centre from the document's as a
    share of the side, whether it lies on the canvas) for ``seeds`` captures."""
    pad = round(CANVAS_PAD * max(width, height))
    stats = []
    for seed in range(seeds):
        quad = np.array(_frame_quad(random.Random(seed), width, height, pad, FRAMINGS[framing])).reshape(4, 2)
        x, y = quad[:, 0], quad[:, 1]
        area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        offset = max(abs(x.mean() - pad - width / 2) / width, abs(y.mean() - pad - height / 2) / height)
        on_canvas = x.min() >= 0 and y.min() >= 0 and x.max() <= width + 2 * pad and y.max() <= height + 2 * pad
        stats.append((area / (width * height), offset, on_canvas))
    return np.array(stats)


@pytest.mark.parametrize("width, height", [(320, 202), (150, 370)])
def test_framings(width, height):
    """snug: the frame holds about the whole document, centred up to its corner jitter, never
    loose; loose: more often cut into the document, often far looser, often off-centre beyond
    snug's reach. Both stay on the background (the canvas), whatever the document's shape."""
    snug, loose = _quad_stats("snug", width, height), _quad_stats("loose", width, height)
    jitter = FRAMINGS["snug"].jitter
    assert snug[:, 2].all() and loose[:, 2].all()
    assert snug[:, 0].min() >= (1 - 2 * jitter) ** 2 and snug[:, 0].max() < 1.4 and snug[:, 1].max() <= jitter
    assert (loose[:, 0] < 0.9).mean() > 5 * (snug[:, 0] < 0.9).mean() and (loose[:, 0] > 1.4).mean() > 0.2
    assert (loose[:, 1] > jitter).mean() > 0.2
    doc = DocumentType.from_id(3).render(0)
    assert not np.array_equal(np.asarray(capture(doc, seed=1, framing="loose")), np.asarray(capture(doc, seed=1)))
    with pytest.raises(ValueError, match="unknown framing 'tight'"):
        capture(doc, seed=1, framing="tight")


def test_dataset_items():
    data = SyntheticDocuments(3, 2, size=64)
    image, label = data[5]
    assert len(data) == 6 and label == 2
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.02
    clean, _ = SyntheticDocuments(3, 2, size=64, clean=True)[5]
    assert not torch.equal(clean, image)


def test_demo_folders_are_the_training_evaluation_set(tmp_path):
    from fastpfc.doc.demo import type_name, write_demo
    from fastpfc.doc.images import load_image

    names = write_demo(tmp_path, num_types=4, captures=2)
    evaluation = SyntheticDocuments(4, 2, "eval", 128, seed=0)
    assert names == [type_name(t) for t in evaluation.types]
    assert sorted(p.name for p in (tmp_path / "register").iterdir()) == sorted(names[:2])
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(names[2:])
    for item in (0, 3, 7):
        label, instance = divmod(item, 2)
        saved = load_image(tmp_path / "queries" / names[label] / f"{instance}.png", 128)
        assert torch.equal(saved, evaluation[item][0])
