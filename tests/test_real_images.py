"""The real-image check (sample images shipped by scikit-image and matplotlib) and the baselines."""

import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

from fastpfc.doc.baselines import BASELINES, colour_histogram, colour_thumbnail, raw_pixels  # noqa: E402
from fastpfc.doc.evaluation import evaluate_embedder, evaluate_embedders, summary_table  # noqa: E402
from fastpfc.doc.real_images import (  # noqa: E402
    CARD_ASPECT,
    HARSH_LIGHT,
    RealImageCaptures,
    _homography,
    card_crops,
    photograph,
    real_image_check,
    real_templates,
    under_harsh_light,
)


@pytest.mark.parametrize("size", [(512, 512), (451, 300), (1000, 872), (191, 384), (97, 61), (448, 172)])
def test_card_crops_are_card_shaped_inside_and_disjoint(size):
    width, height = size
    boxes = card_crops(width, height)
    assert 1 <= len(boxes) <= 4
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert abs((right - left) / (bottom - top) - CARD_ASPECT) < 0.02 or bottom - top == height
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:  # no overlap: one box ends where the other starts
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_templates_are_real_and_distinct():
    templates = real_templates()
    names = [name for name, _ in templates]
    assert len(templates) >= 50 and len(set(names)) == len(names)
    assert any(name.startswith("grace_hopper") for name in names)  # matplotlib's sample photo
    for _, image in templates:
        assert image.mode == "RGB" and min(image.size) >= 60


def test_homography_maps_the_four_corners_float64():
    rng = np.random.default_rng(0)
    source = [(0.0, 0.0), (37.0, 0.0), (37.0, 23.0), (0.0, 23.0)]
    target = [tuple(p) for p in rng.uniform(0, 100, (4, 2))]
    a, b, c, d, e, f, g, h = _homography(source, target)
    for (u, v), (x, y) in zip(source, target, strict=True):
        w = g * x + h * y + 1
        assert (a * x + b * y + c) / w == pytest.approx(u, abs=1e-9)
        assert (d * x + e * y + f) / w == pytest.approx(v, abs=1e-9)


def test_photographs_are_reproducible_and_differ_by_seed():
    template = real_templates()[0][1]
    first, again, other = (np.asarray(photograph(template, seed, 48)) for seed in (5, 5, 6))
    assert first.shape == (48, 48, 3) and np.array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 3
    clean = np.asarray(template.resize((48, 48), Image.BILINEAR))
    assert np.abs(first.astype(int) - clean.astype(int)).mean() > 3  # a capture is not the template


def _card() -> Image.Image:
    """A card of random mid-tone colours (no pixel near black or white), 60 x 38."""
    pixels = np.random.default_rng(3).integers(60, 200, (38, 60, 3)).astype(np.uint8)
    return Image.fromarray(pixels)


def test_each_harsh_light_effect_changes_the_card_its_own_way():
    card = _card()
    before = np.asarray(card, dtype=np.int64)
    for seed in range(5):
        lit = {name: np.asarray(effect(card, np.random.default_rng(seed)), dtype=np.int64)
               for name, effect in HARSH_LIGHT.items()}
        assert all(image.shape == before.shape for image in lit.values())
        reflection = lit["reflection"] - before
        assert reflection.min() >= 0 and (lit["reflection"] == 255).all(axis=2).any()  # added light clips to white
        for name in ("shadow", "falloff"):  # darker somewhere, nowhere brighter, nowhere black
            change = lit[name] - before
            assert change.max() <= 0 and change.min() < -30 and lit[name].min() >= 0.3 * 60 - 1, name
        # a cast moves the channels apart: the ratio of the mean channels changes by a tenth or more
        ratio_before, ratio_after = before.mean(axis=(0, 1)), lit["cast"].mean(axis=(0, 1))
        assert np.abs(np.log(ratio_after / ratio_before) - np.log(ratio_after / ratio_before).mean()).max() > 0.1


def _effect_seen(before: np.ndarray, lit: np.ndarray) -> str:
    """Which :data:`HARSH_LIGHT` effect made ``lit`` of ``before``, told by how the pixels moved:
    only up (a reflection), up and down (a cast), only down over nearly all (a falloff; the light
    is 1 only at the corner nearest the lamp) or over part of the card (a shadow)."""
    change = lit.astype(np.int64) - before.astype(np.int64)
    if change.min() >= 0:
        return "reflection"
    if change.max() > 0:
        return "cast"
    return "falloff" if (change < -3).any(axis=2).mean() > 0.9 else "shadow"


def test_harsh_light_is_reproducible_and_draws_every_effect():
    card, before = _card(), np.asarray(_card())
    first, again = (np.asarray(under_harsh_light(card, 11)) for _ in range(2))
    assert np.array_equal(first, again) and not np.array_equal(first, before)
    for name, effect in HARSH_LIGHT.items():  # the signature tells each effect apart
        assert all(_effect_seen(before, np.asarray(effect(card, np.random.default_rng(seed)))) == name
                   for seed in range(10)), name
    drawn = [_effect_seen(before, np.asarray(under_harsh_light(card, seed))) for seed in range(40)]
    assert set(drawn) == set(HARSH_LIGHT) and max(drawn.count(name) for name in HARSH_LIGHT) < 20


def test_check_under_harsh_light_keeps_the_gallery_and_lights_the_queries():
    plain_queries, plain_gallery, plain_registered = real_image_check(size=32, captures=2)
    queries, gallery, registered = real_image_check(size=32, captures=2, harsh_light=True)
    assert registered == plain_registered and queries.labels == plain_queries.labels
    assert all(torch.equal(gallery[i][0], plain_gallery[i][0]) for i in (0, 7))
    assert sum(not torch.equal(queries[i][0], plain_queries[i][0]) for i in range(6)) == 6


def test_check_registers_every_template_once_clean():
    queries, gallery, registered = real_image_check(size=32, captures=3)
    assert len(gallery) == gallery.num_classes == len(registered) == len(real_templates())
    assert len(queries) == 3 * len(registered) and queries.labels[:4] == [0, 0, 0, 1]
    image, label = queries[4]
    assert image.shape == (3, 32, 32) and label == 1
    assert isinstance(RealImageCaptures(2, 32, clean=True)[1][0], torch.Tensor)


def _images(batch: int = 5, height: int = 23, width: int = 37) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(batch * height + width))


def test_baselines_give_unit_rows_and_ignore_a_brightness_offset():
    images = _images()
    for name, embed in BASELINES.items():
        rows = embed(images)
        assert rows.dtype == torch.float32 and rows.shape[0] == 5, name
        assert torch.allclose(rows.norm(dim=1), torch.ones(5), atol=1e-5), name
    for embed in (raw_pixels, colour_thumbnail):  # centred: a constant offset changes nothing
        assert torch.allclose(embed(images * 0.5 + 0.2), embed(images * 0.5), atol=1e-5)


def test_raw_pixels_and_thumbnail_equal_a_float64_reference():
    images = _images(3, 64, 32)
    grey = (images.double() * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)[None, :, None, None]).sum(1)
    pooled = grey.reshape(3, 32, 2, 32, 1).mean(dim=(2, 4)).flatten(1)
    expected = torch.nn.functional.normalize(pooled - pooled.mean(1, keepdim=True), dim=1)
    assert torch.allclose(raw_pixels(images).double(), expected, atol=1e-5)
    pooled = images.double().reshape(3, 3, 16, 4, 16, 2).mean(dim=(3, 5)).flatten(1)
    expected = torch.nn.functional.normalize(pooled - pooled.mean(1, keepdim=True), dim=1)
    assert torch.allclose(colour_thumbnail(images).double(), expected, atol=1e-5)


def test_colour_histogram_equals_a_colorsys_reference():
    images = _images(2, 7, 9)
    histogram = np.zeros((2, 8, 8, 4))
    for b in range(2):
        for y in range(7):
            for x in range(9):
                h, s, v = colorsys.rgb_to_hsv(*images[b, :, y, x].double().tolist())
                histogram[b, min(int(h * 8), 7), min(int(s * 8), 7), min(int(v * 4), 3)] += 1
    expected = np.sqrt(histogram.reshape(2, -1))
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(colour_histogram(images).numpy(), expected, atol=1e-6)


def test_evaluating_several_embedders_at_once_equals_one_at_a_time():
    data = real_image_check(size=24, captures=2)
    together = evaluate_embedders(BASELINES, *data)
    for name, embed in BASELINES.items():
        alone = evaluate_embedder(embed, *data)
        assert together[name] == alone, name
    registration = together["colour_thumbnail"]["registration"]
    assert registration["rejection_rate"] is None  # every template is registered
    assert 0 < registration["top1"] <= 1 and registration["accuracy"] <= registration["top1"]


def test_summary_table_lists_every_embedder_and_marks_unmeasurable_points():
    data = real_image_check(size=24, captures=2)
    results = evaluate_embedders(BASELINES, *data)
    for result in results.values():
        result["real_images"] = result
    table = summary_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + len(BASELINES) and "real images" in lines[0] and "harsh light" not in lines[0]
    assert all(line.count("|") == 2 for line in lines)
    results["raw_pixels"]["real_images_harsh_light"] = results["raw_pixels"]
    lines = summary_table(results).splitlines()
    assert "| real, harsh light" in lines[0] and lines[1].count("top-1") == 3
    assert next(line for line in lines if line.startswith("raw_pixels")).count("|") == 3
    for name, result in results.items():
        row = next(line for line in lines if line.startswith(name))
        reliable = result["verification"]["points"][1]["reliable"]
        tpr = result["verification"]["points"][1]["tpr"]
        assert (f"{tpr:.3f}" if reliable else "n/a") in row
        assert f"{result['registration']['top1']:.3f}" in row
    assert math.isfinite(results["raw_pixels"]["registration"]["threshold"])
