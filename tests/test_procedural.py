"""Formula-driven training images (fastpfc.doc.procedural) and the batch schedule that keeps a
class's views together."""

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")  # the card fonts

from fastpfc.doc.artwork import _ifs, fractal_art  # noqa: E402
from fastpfc.doc.procedural import GENERATORS, SOURCES, ProceduralImages  # noqa: E402
from fastpfc.doc.training_data import BatchSchedule  # noqa: E402


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_every_class_is_reproducible_from_its_id_and_differs_from_the_next(name):
    generate = GENERATORS[name]
    first = [np.asarray(generate(class_id)) for class_id in (3, 4, 5)]
    again = [np.asarray(generate(class_id)) for class_id in (3, 4, 5)]
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a, b)
        assert a.ndim == 3 and a.shape[2] == 3 and a.std() > 5  # not a flat image
    for a, b in zip(first[:-1], first[1:], strict=True):
        assert a.shape != b.shape or np.abs(a.astype(int) - b.astype(int)).mean() > 5
    if name != "document":  # a document type is seeded by its id alone (train / eval ranges keep them apart)
        assert not np.array_equal(first[0], np.asarray(generate(3, seed=1)))


def test_ifs_maps_are_contractive_and_neither_dust_nor_blob():
    for seed in range(60):
        maps, shifts, probabilities = _ifs(np.random.default_rng(seed))
        singular = np.linalg.svd(maps, compute_uv=False)
        assert singular.max() < 0.9 and singular.min() > 0.2
        assert 0.4 <= np.abs(np.linalg.det(maps)).sum() <= 1.1
        assert probabilities.sum() == pytest.approx(1.0) and (probabilities > 0).all()
        assert shifts.shape == (len(maps), 2)


def test_fractal_art_fills_ragged_sizes_and_draws_the_attractor():
    for width, height in ((37, 23), (64, 101), (9, 9)):
        image = fractal_art(np.random.default_rng(width), width, height, points=2_000)
        assert image.mode == "RGB" and image.size == (width, height)
    # the attractor, not just the background gradient: many pixels depart from a smooth ramp
    pixels = np.asarray(fractal_art(np.random.default_rng(1), 96, 96), dtype=float)
    roughness = np.abs(np.diff(pixels, 2, axis=0)).mean() + np.abs(np.diff(pixels, 2, axis=1)).mean()
    assert roughness > 2.4  # over 40 seeds: a bare gradient at most 1.5, a fractal at least 3.3 (this one 9.1)


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_dataset_items_labels_views_and_draws(source):
    data = ProceduralImages(num_classes=9, per_class=2, source=source, size=40, seed=3)
    assert len(data) == 18 and data.labels == [i // 2 for i in range(18)]
    image, label = data[(5, 0)]
    assert image.shape == (3, 40, 40) and image.dtype == torch.float32 and label == 2
    assert 0 <= image.min() and image.max() <= 1
    assert torch.equal(image, data[(5, 0)][0])  # deterministic
    assert not torch.equal(image, data[(5, 1)][0])  # another draw, another capture
    assert not torch.equal(image, data[(4, 0)][0])  # the other view of the class
    generators = SOURCES[source]
    assert [data.generators[c % len(generators)] for c in range(len(generators))] == list(generators)


def test_non_document_classes_are_one_image_and_documents_vary_their_fields():
    data = ProceduralImages(num_classes=8, per_class=2, source="mix", size=40)
    fractal_class, document_class = 0, 3
    assert data.generators[fractal_class % 4] == "fractal" and data.generators[document_class % 4] == "document"
    assert np.array_equal(np.asarray(data.render(fractal_class, 0)), np.asarray(data.render(fractal_class, 5)))
    assert not np.array_equal(np.asarray(data.render(document_class, 0)), np.asarray(data.render(document_class, 5)))


def test_bad_sources_and_too_many_document_classes_are_refused():
    with pytest.raises(ValueError, match="unknown synthetic source 'photos'"):
        ProceduralImages(4, 1, "photos")
    with pytest.raises(ValueError, match="at most 4000000 classes"):
        ProceduralImages(4_000_000, 1, "mix")


def test_grouped_batches_hold_whole_classes_and_resume_the_same():
    num_items, group, batch = 7 * 4, 4, 8  # 7 classes of 4 views
    full = list(BatchSchedule(num_items, batch, seed=2, start=0, stop=9, group=group))
    for items in full:
        indices = [i for i, _ in items]
        assert len(indices) == batch
        for first in range(0, batch, group):  # runs of one class, its views in order
            run = indices[first:first + group]
            assert run == list(range(run[0], run[0] + group)) and run[0] % group == 0
    assert full[4:] == list(BatchSchedule(num_items, batch, seed=2, start=4, stop=9, group=group))
    ranks = [list(BatchSchedule(num_items, batch // 2, seed=2, start=0, stop=9, rank=r, world=2, group=group))
             for r in range(2)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == full  # two ranks split each global batch
