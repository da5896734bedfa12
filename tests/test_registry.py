"""The document registry: folders to labels, faiss search, incremental updates, duplicates, sub-labels."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("faiss")

from fastpfc.doc.embedders import embed_paths, registration_views, view_seed  # noqa: E402
from fastpfc.doc.images import read_image  # noqa: E402
from fastpfc.doc.registry import INDEXES, UNKNOWN, Registry, labelled_images  # noqa: E402


class PixelEmbedder:
    """A deterministic stand-in model: a fixed random projection of the 8x8 pixels, normalised."""

    image_size, dim, model_id = 8, 16, "pixels-v1"

    def __init__(self) -> None:
        self.projection = torch.randn(3 * 8 * 8, self.dim, generator=torch.Generator().manual_seed(0))
        self.operating_points = {1e-4: 0.5}
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += len(images)
        return torch.nn.functional.normalize((images.flatten(1) - 0.5) @ self.projection, dim=1)


def _image(path, seed: int, base: np.ndarray | None = None, noise: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0, 255, (8, 8, 3)) if base is None else base + rng.normal(0, noise, (8, 8, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return pixels


def _tree(root, types: int = 4, per_type: int = 2, first_type: int = 0):
    """root/type<t>/<n>.png and root/type<t>/glare/0.png, random pixels."""
    for t in range(first_type, first_type + types):
        for n in range(per_type):
            _image(root / f"type{t}" / f"{n}.png", seed=100 * t + n)
        _image(root / f"type{t}" / "glare" / "0.png", seed=100 * t + 50)
    return root


def test_labels_from_the_folder_layout(tmp_path):
    root = _tree(tmp_path / "reg", types=2)
    items = labelled_images(root)
    assert [(p.relative_to(root).as_posix(), t, s) for p, t, s in items] == [
        ("type0/0.png", "type0", None), ("type0/1.png", "type0", None), ("type0/glare/0.png", "type0", "glare"),
        ("type1/0.png", "type1", None), ("type1/1.png", "type1", None), ("type1/glare/0.png", "type1", "glare")]
    _image(root / "loose.png", seed=1)
    with pytest.raises(ValueError, match="directly in"):
        labelled_images(root)
    (root / "loose.png").unlink()
    _image(root / "type0" / "glare" / "deeper" / "x.png", seed=2)
    with pytest.raises(ValueError, match="nested too deep"):
        labelled_images(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        labelled_images(tmp_path / "empty")


@pytest.mark.parametrize("index", INDEXES)
def test_round_trip_and_incremental_updates(tmp_path, index):
    embedder = PixelEmbedder()
    registry = Registry(embedder, index)
    registry.add_folder(_tree(tmp_path / "reg"))
    assert len(registry) == 12 and registry.labels == sorted(
        [f"type{t}" for t in range(4)] + [f"type{t}/glare" for t in range(4)])
    queries = embedder(torch.stack([torch.rand(3, 8, 8) for _ in range(5)])).numpy()
    before = registry.search(queries, k=3)
    registry.save(tmp_path / "reg.npz")
    loaded = Registry.load(tmp_path / "reg.npz", embedder)
    assert loaded.entries == registry.entries and np.array_equal(loaded.features, registry.features)
    assert [[(round(s, 5), e) for s, e in row] for row in loaded.search(queries, k=3)] == \
        [[(round(s, 5), e) for s, e in row] for row in before]

    embedder.calls = 0  # adding one type embeds only its images
    loaded.add_folder(_tree(tmp_path / "new", types=1, per_type=3, first_type=9))
    assert embedder.calls == 4 and len(loaded) == 16 and "type9/glare" in loaded.labels
    assert loaded.remove("type1", "glare") == 1 and "type1/glare" not in loaded.labels and "type1" in loaded.labels
    assert loaded.remove("type2") == 3 and not any(label.startswith("type2") for label in loaded.labels)
    hits = loaded.search(embedder(torch.stack([torch.rand(3, 8, 8)])).numpy(), k=len(loaded))[0]
    assert len(hits) == len(loaded) == 12 and all(e.type != "type2" for _, e in hits)
    with pytest.raises(KeyError, match="type2 is not registered"):
        loaded.remove("type2")


def test_registered_views_are_the_unit_mean_of_the_image_and_its_simulated_photos(tmp_path):
    """``views=2``: each example is the normalised sum of the embeddings of the image (resized) and
    two training-camera photos of it, seeded by the file's bytes (a copy elsewhere gets the same);
    the registry keeps its views through save and load, and one saved before views reads as 0."""
    embedder = PixelEmbedder()
    registry = Registry(embedder, views=2)
    registry.add_folder(_tree(tmp_path / "reg", types=2, per_type=1))
    path = tmp_path / "reg" / "type1" / "0.png"
    shutil.copy(path, tmp_path / "copy.png")
    assert view_seed(path) == view_seed(tmp_path / "copy.png") != view_seed(tmp_path / "reg" / "type0" / "0.png")
    shots = registration_views(read_image(path), 8, 2, view_seed(path))
    assert shots.shape == (3, 3, 8, 8) and not torch.equal(shots[1], shots[2])
    expected = torch.nn.functional.normalize(embedder(shots).sum(dim=0), dim=0)
    row = [i for i, e in registry.entries.items() if e.source == str(path)][0]
    np.testing.assert_allclose(registry.features[list(registry.ids).index(row)], expected.numpy(), atol=1e-6)
    plain = embed_paths(embedder, [path])[0]
    assert np.dot(plain, expected.numpy()) < 0.999  # the views moved it
    registry.save(tmp_path / "reg.npz")
    assert Registry.load(tmp_path / "reg.npz", embedder).views == 2
    with pytest.raises(ValueError, match="views must be >= 0"):
        Registry(embedder, views=-1)

    old = Registry(embedder)  # a registry file of the format before views: no "views" in its metadata
    old.add_folder(_tree(tmp_path / "old", types=1, per_type=1))
    old.save(tmp_path / "old.npz")
    with np.load(tmp_path / "old.npz") as saved:
        arrays = dict(saved)
    meta = json.loads(arrays["meta"].tobytes())
    del meta["views"]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "old.npz", **arrays)
    assert Registry.load(tmp_path / "old.npz", embedder).views == 0


def test_flat_search_equals_brute_force(tmp_path):
    embedder = PixelEmbedder()
    for n in range(60):
        _image(tmp_path / "reg" / f"type{n % 7}" / f"{n}.png", seed=n)
    registry = Registry(embedder)
    registry.add_folder(tmp_path / "reg")
    queries = embedder(torch.rand(9, 3, 8, 8, generator=torch.Generator().manual_seed(3))).numpy()
    scores = queries @ registry.features.T  # numpy's sums, not faiss's: equal to ~1e-7, not bitwise
    row_of = {registry.entries[int(i)]: row for row, i in enumerate(registry.ids)}
    for q, hits in enumerate(registry.search(queries, k=5)):
        best = np.sort(scores[q])[::-1][:5]
        np.testing.assert_allclose([s for s, _ in hits], best, atol=1e-5)  # the 5 best scores, in order
        # each hit is an example that has the score reported (which of two tied examples comes
        # first is up to the summation order, so the order of entries is not compared)
        assert len({e for _, e in hits}) == 5
        np.testing.assert_allclose([scores[q][row_of[e]] for _, e in hits], [s for s, _ in hits], atol=1e-5)


def test_duplicates_are_skipped_and_conflicts_refused_and_reported(tmp_path):
    root = _tree(tmp_path / "reg", types=2)
    shutil.copy(root / "type0" / "0.png", root / "type0" / "copy.png")  # same label: duplicate
    shutil.copy(root / "type0" / "1.png", root / "type1" / "stolen.png")  # other label: conflict
    registry = Registry(PixelEmbedder())
    report = registry.add_folder(root)
    assert [(a.split("/")[-1], b.split("/")[-1]) for a, b in report.duplicates] == [("copy.png", "0.png")]
    assert [(a.split("/")[-1], label, other) for a, label, other in report.conflicts] == [
        ("stolen.png", "type1", "type0")]
    assert len(registry) == len(report.added) == 6
    again = registry.add_folder(root)  # registering the same folder twice adds nothing
    assert not again.added and len(again.duplicates) == 7 and len(registry) == 6


def test_thresholds_and_sub_labels(tmp_path):
    embedder = PixelEmbedder()
    base = _image(tmp_path / "reg" / "form" / "0.png", seed=1)
    glare = np.clip(base + 90, 0, 255)  # a sub-label: the same document much brighter
    _image(tmp_path / "reg" / "form" / "glare" / "0.png", seed=2, base=glare)
    _image(tmp_path / "reg" / "card" / "0.png", seed=3)
    registry = Registry(embedder)
    registry.add_folder(tmp_path / "reg")
    _image(tmp_path / "q" / "plain.png", seed=4, base=base)
    _image(tmp_path / "q" / "glare.png", seed=5, base=glare)
    _image(tmp_path / "q" / "other.png", seed=6)
    paths = [tmp_path / "q" / name for name in ("plain.png", "glare.png", "other.png")]
    threshold = registry.threshold_at(1e-4)
    matches = registry.classify(paths, threshold)
    assert [(m.type, m.sub_label) for m in matches] == [("form", None), ("form", "glare"), (UNKNOWN, None)]
    assert matches[1].score > 0.99 and matches[2].score <= threshold
    strict = registry.classify(paths[1:2], threshold, sub_threshold=1.01)  # sub-label not sure enough: parent only
    assert (strict[0].type, strict[0].sub_label) == ("form", None)
    with pytest.raises(ValueError, match="no reliable threshold at FPR=1e-05"):
        registry.threshold_at(1e-5)


def test_a_registry_of_another_model_is_refused(tmp_path):
    registry = Registry(PixelEmbedder())
    registry.add_folder(_tree(tmp_path / "reg", types=1))
    registry.save(tmp_path / "reg.npz")
    other = PixelEmbedder()
    other.model_id = "pixels-v2"
    with pytest.raises(ValueError, match="built with model pixels-v1"):
        Registry.load(tmp_path / "reg.npz", other)
    wider = PixelEmbedder()  # the same identity with more dimensions: refused by the size, before any search
    wider.dim = 24
    with pytest.raises(ValueError, match="holds 16-dimensional examples, but this model embeds in 24"):
        Registry.load(tmp_path / "reg.npz", wider)
    with pytest.raises(ValueError, match="registry is empty"):
        Registry(other).search(np.zeros((1, 16), np.float32))


class DirectEmbedder(PixelEmbedder):
    """Reads the embedding off the image: the first 16 pixel values, centred and normalised."""

    model_id = "direct-v1"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(images.permute(0, 2, 3, 1).flatten(1)[:, :16] - 0.5, dim=1)


def _pointing(path, direction: int, seed: int) -> None:
    """An 8x8 image whose DirectEmbedder embedding is close to +e0 (direction 1) or -e0 (-1)."""
    pixels = np.full((8, 8, 3), 127.5) + np.random.default_rng(seed).normal(0, 4, (8, 8, 3))
    pixels[0, 0, 0] = 127.5 + 120 * direction
    _image(path, seed=0, base=pixels, noise=0.0)


def test_ivf_probes_that_find_nothing_give_unknown_after_removals(tmp_path):
    for n in range(400):  # 20 IVF lists, 16 probed: a query near +e0 never probes the lists near -e0
        _pointing(tmp_path / "reg" / "a" / f"{n}.png", 1, seed=n)
    for n in range(6):
        _pointing(tmp_path / "reg" / "b" / f"{n}.png", -1, seed=1000 + n)
    registry = Registry(DirectEmbedder(), "ivf")
    registry.add_folder(tmp_path / "reg")
    _pointing(tmp_path / "q" / "a.png", 1, seed=5000)
    assert registry.classify([tmp_path / "q" / "a.png"], threshold=0.5)[0].type == "a"
    registry.remove("a")  # the lists near +e0 are now empty
    query = embed_paths(registry.embedder, [tmp_path / "q" / "a.png"])
    assert registry.search(query, k=1) == [[]]  # faiss found nothing in the probed lists
    matches = registry.classify([tmp_path / "q" / "a.png"], threshold=0.5)
    assert matches[0].type == UNKNOWN


def test_labelled_summary_counts():
    from fastpfc.doc.cli import summarize
    from fastpfc.doc.registry import Entry, Match

    registry = Registry(PixelEmbedder())
    registry.entries = {0: Entry("a", None, "a.png", "1"), 1: Entry("a", "glare", "ag.png", "2"),
                        2: Entry("b", None, "b.png", "3")}
    truths = [("a", None), ("a", None), ("a", "glare"), ("a", "glare"), ("a", "glare"), ("b", None), ("c", None),
              ("c", None)]
    matches = [Match("a", None, 0.9, ""), Match("a", "glare", 0.9, ""),  # plain a: right, right type + a sub-label
               Match("a", "glare", 0.9, ""), Match("a", None, 0.9, ""), Match("b", None, 0.9, ""),  # glare queries
               Match(UNKNOWN, None, 0.1, ""),  # b rejected: wrong
               Match(UNKNOWN, None, 0.1, ""), Match("b", None, 0.9, "")]  # unregistered c: one rejected
    summary = summarize(matches, truths, registry)
    assert summary["type_accuracy"] == 4 / 6
    assert summary["sub_label_accuracy"] == summary["sub_label_accuracy[glare]"] == 1 / 3
    assert summary["parent_accuracy_of_sub_label_queries"] == 2 / 3
    assert summary["no_sub_label_reported_for_plain_queries"] == 2 / 3
    assert summary["rejection_rate"] == 1 / 2
    assert (summary["num_registered_type_queries"], summary["num_unregistered_type_queries"]) == (6, 2)
