"""A run's evaluation images: read once, kept as 8-bit, given back bit for bit."""

import pytest
import torch

from fastpfc.doc.baselines import BASELINES
from fastpfc.doc.config import TrainConfig
from fastpfc.doc.evaluation import EXTRA_SETS, evaluate_embedders, registration_split
from fastpfc.doc.run_evaluation import REAL_CHECKS, EvaluationSets, Preloaded, evaluate, evaluation_data, preload
from fastpfc.doc.synthetic import SyntheticDocuments


def test_preloaded_items_are_the_originals_bit_for_bit():
    documents = SyntheticDocuments(3, 2, "eval", size=40, seed=5)
    loaded = Preloaded(documents)
    assert len(loaded) == 6 and loaded.labels == documents.labels and loaded.pixels.dtype == torch.uint8
    for index in range(6):
        image, label = documents[index]
        again, label_again = loaded[index]
        assert torch.equal(again, image) and label_again == label


class _Smooth(torch.utils.data.Dataset):
    """Two images that no 8-bit picture gives."""

    labels = [0, 1]

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        return torch.full((3, 8, 8), 0.3 + 1e-4 * index), index


def test_a_dataset_that_is_not_8_bit_is_refused():
    with pytest.raises(ValueError, match="item 0 of _Smooth is not an 8-bit picture"):
        Preloaded(_Smooth())


def test_a_gallery_taken_from_the_queries_stays_a_subset_of_them():
    queries = SyntheticDocuments(4, 2, "eval", size=32, seed=1)
    loaded, gallery, registered = preload(*registration_split(queries))
    assert isinstance(gallery, torch.utils.data.Subset) and gallery.dataset is loaded
    assert registered == [0, 1] and [loaded.labels[i] for i in gallery.indices] == [0, 1]


def test_the_evaluation_images_are_rendered_once_per_run(monkeypatch):
    """Two evaluations (as before and after training) render each synthetic and real-image item
    once, and give the same numbers as evaluating the datasets themselves."""
    calls = []
    render = SyntheticDocuments.__getitem__
    monkeypatch.setattr(SyntheticDocuments, "__getitem__", lambda self, item: calls.append(item) or render(self, item))
    config = TrainConfig(image_size=32, eval_types=4, eval_per_type=2, real_captures=2)
    sets = EvaluationSets(config)
    first = evaluate(BASELINES, sets)
    assert len(calls) == 4 * 2 + 2  # the captures, and the clean renders of the registered half
    second = evaluate(BASELINES, sets)
    assert len(calls) == 4 * 2 + 2 and first == second
    direct = evaluate_embedders(BASELINES, *evaluation_data(config))  # the datasets themselves
    assert all(first[name]["verification"] == direct[name]["verification"] for name in BASELINES)
    assert first["raw_pixels"]["real_images"]["registration"]["num_registered_queries"] > 0
    plain, harsh = (first["raw_pixels"][key]["verification"] for key in ("real_images", "real_images_harsh_light"))
    assert plain["num_genuine"] == harsh["num_genuine"] > 0 and plain != harsh  # the same pairs, other photographs
    assert set(first["raw_pixels"]) >= set(REAL_CHECKS) and set(REAL_CHECKS) <= set(EXTRA_SETS)  # each has a title
