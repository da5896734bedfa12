"""The fixed layouts appended to the document embedding: float64 references on ragged images, and
the camera changes each part ignores."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastpfc.doc.layouts import (
    EDGE_BINS,
    EDGE_RESOLUTION,
    LAYOUTS,
    PYRAMID_SIDES,
    Layout,
    _turn_grid,
    chromaticity_layout,
    colour_layout,
    edge_layout,
    layout_baseline,
    layout_embedding,
    layout_size,
    shading_free_layout,
    turned,
)


def _cells(images: torch.Tensor, side: int, crop: float) -> torch.Tensor:
    """float64 reference: the central ``crop`` of ``images`` cut as written, each of adaptive
    pooling's cells averaged: [B, 3, side, side]."""
    height, width = images.shape[-2:]
    top, left = round(height * (1 - crop) / 2), round(width * (1 - crop) / 2)
    centre = images.double()[..., top:height - top, left:width - left]
    height, width = centre.shape[-2:]
    rows = [((height * i) // side, -(-height * (i + 1) // side)) for i in range(side)]
    columns = [((width * i) // side, -(-width * (i + 1) // side)) for i in range(side)]
    return torch.stack([torch.stack([centre[:, :, a:b, c:d].mean(dim=(2, 3)) for c, d in columns], -1)
                        for a, b in rows], -2)


def _unit_centred(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.flatten(1)
    rows = rows - rows.mean(dim=1, keepdim=True)
    return rows / rows.norm(dim=1, keepdim=True)


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(3, 3, 45, 61)  # 7 and 9 px of border cut at crop 0.7; cells of unequal size


def test_colour_layout_matches_float64_reference(images):
    cells = _cells(images, 5, 0.7)
    expected = _unit_centred(cells / (cells.mean(dim=(2, 3), keepdim=True) + 0.02))
    torch.testing.assert_close(colour_layout(images, side=5, crop=0.7).double(), expected, rtol=1e-5, atol=1e-6)


def test_chromaticity_layout_matches_float64_reference(images):
    cells = _cells(images, 5, 0.7) + 0.02
    shares = cells / cells.sum(dim=1, keepdim=True)
    expected = _unit_centred(shares / shares.mean(dim=(2, 3), keepdim=True))
    torch.testing.assert_close(chromaticity_layout(images, side=5, crop=0.7).double(), expected, rtol=1e-5,
                               atol=1e-6)


def test_shading_free_layout_matches_float64_reference(images):
    logs = np.log(_cells(images, 6, 0.7).numpy() + 0.02).reshape(3, 3, 36)
    y, x = np.meshgrid(np.linspace(-1, 1, 6), np.linspace(-1, 1, 6), indexing="ij")
    basis = np.stack([np.ones(36), x.ravel(), y.ravel()], axis=1)
    residuals = np.empty_like(logs)
    for b in range(3):
        for channel in range(3):
            plane, *_ = np.linalg.lstsq(basis, logs[b, channel], rcond=None)
            residuals[b, channel] = logs[b, channel] - basis @ plane
    expected = _unit_centred(torch.from_numpy(residuals))
    torch.testing.assert_close(shading_free_layout(images, side=6, crop=0.7).double(), expected, rtol=1e-4,
                               atol=1e-5)


def test_edge_layout_matches_float64_reference(images):
    """numpy in float64: edge-padded central differences of the grey cells, each gradient's weight
    in every orientation bin by its angular distance to the bin's centre, pooled into 5 x 5 cells."""
    grey = _cells(images, EDGE_RESOLUTION, 0.7).mean(dim=1).numpy()  # [3, R, R]
    padded = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
    dx, dy = (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]) / 2, (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]) / 2
    angle = np.degrees(np.arctan2(dy, dx)) % 180
    step = 180 / EDGE_BINS
    binned = np.zeros((3, EDGE_BINS) + grey.shape[1:])
    for k in range(EDGE_BINS):
        apart = np.abs(angle - k * step)
        apart = np.minimum(apart, 180 - apart)
        binned[:, k] = np.hypot(dx, dy) * np.clip(1 - apart / step, 0, None)
    bounds = [((EDGE_RESOLUTION * i) // 5, -(-EDGE_RESOLUTION * (i + 1) // 5)) for i in range(5)]
    cells = np.stack([np.stack([binned[:, :, a:b, c:d].mean(axis=(2, 3)) for c, d in bounds], -1)
                      for a, b in bounds], -1).transpose(0, 1, 3, 2)  # [3, bins, row, column]
    cells = np.sqrt(cells / (cells.mean(axis=(1, 2, 3), keepdims=True) + 1e-6))
    expected = _unit_centred(torch.from_numpy(cells))
    torch.testing.assert_close(edge_layout(images, side=5, crop=0.7).double(), expected, rtol=1e-4, atol=1e-5)


def test_edge_layout_sees_orientation_not_exposure():
    """Exposure (a gain) and a constant offset leave it as it was; the same picture turned by 90
    degrees moves its edges into other bins, and stripes across are far from stripes down."""
    torch.manual_seed(2)
    pictures = 0.2 + 0.6 * F.interpolate(torch.rand(3, 3, 9, 9), size=(80, 80), mode="bilinear")
    base = edge_layout(pictures)
    for changed in (pictures * 0.6, pictures + 0.1):
        assert (edge_layout(changed) - base).norm(dim=1).max() < 1e-3
    assert (edge_layout(pictures.transpose(-1, -2)) - base).norm(dim=1).min() > 1.0  # about 1.35-1.53
    stripes = 0.5 + 0.4 * torch.sin(torch.arange(80.0) / 2).view(1, 1, 1, 80).expand(1, 3, 80, 80)
    across, down = edge_layout(stripes), edge_layout(stripes.transpose(-1, -2))
    assert (across - down).norm() > 1.0  # unit rows: 1.41 would be orthogonal


def test_each_part_ignores_its_camera_change():
    """On smooth pictures: a colourless light field (glare) barely moves the chromaticity layout,
    a per-channel gradient linear in log barely moves the shading-free layout, per-channel gains
    barely move the colour and shading-free layouts; the colour layout moves under the first two
    by several times as much. Other pictures are far (about 1.2)."""
    torch.manual_seed(1)
    smooth, other = (0.15 + 0.7 * F.interpolate(torch.rand(4, 3, 5, 5), size=(64, 64), mode="bilinear")
                     for _ in range(2))
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    glare = 1 + 0.8 * torch.exp(-((x - 0.6) ** 2 + (y - 0.4) ** 2) / (2 * 0.15 ** 2))
    slopes = torch.tensor([[0.4, 0.1, -0.3], [-0.2, 0.3, 0.2]]).view(2, 1, 3, 1, 1)
    gradient = torch.exp(slopes[0] * (x - 0.5) + slopes[1] * (y - 0.5))
    gains = torch.tensor([1.2, 0.9, 0.8]).view(1, 3, 1, 1)

    def moved(layout, change):
        return (layout(smooth * change) - layout(smooth)).norm(dim=1).max().item()

    assert moved(chromaticity_layout, glare) < 0.05 < 0.4 < moved(colour_layout, glare)  # about 0.014, 0.7
    assert moved(shading_free_layout, gradient) < 0.05 < 0.2 < moved(colour_layout, gradient)  # 0.009, 0.37
    assert max(moved(colour_layout, gains), moved(shading_free_layout, gains)) < 0.06  # 0.035, 0.008
    for part in (colour_layout, chromaticity_layout, shading_free_layout):
        assert (part(other) - part(smooth)).norm(dim=1).min() > 0.8


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_embedding_is_its_levels_in_their_shares(name, images):
    """Each level is its part at its side times the square root of its share; a layout with turns
    is the unit mean of that over the image and the image turned each way."""
    got = layout_embedding(images, name)
    levels, turns = LAYOUTS[name].levels, LAYOUTS[name].turns
    sizes = [part.channels * side * side for part, _, side in levels]
    assert got.shape == (3, layout_size(name)) == (3, sum(sizes))
    assert sum(share for _, share, _ in levels) == pytest.approx(1.0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3))
    views = [images] + [turned(images, sign * degrees) for degrees in turns for sign in (-1, 1)]
    expected = sum(torch.cat([part(view, side) * share ** 0.5 for part, share, side in levels], dim=1)
                   for view in views)
    torch.testing.assert_close(got, F.normalize(expected, dim=1))


def test_turned_is_a_turn_in_pixels():
    """A quarter turn of a square image moves every pixel centre onto another (a rot90, the two
    ways for -90 and 90 degrees), a half turn of a ragged one flips both axes; a small turn equals
    a float64 bilinear reference (border repeated) on a ragged, non-square image."""
    torch.manual_seed(0)
    square = torch.rand(2, 3, 9, 9)
    quarter = {degrees: turned(square, degrees) for degrees in (-90, 90)}
    rotations = [torch.rot90(square, k, dims=(2, 3)) for k in (1, 3)]
    for result in quarter.values():
        assert min((result - rotation).abs().max() for rotation in rotations) < 1e-5
    assert (quarter[90] - quarter[-90]).abs().max() > 0.1
    ragged = torch.rand(2, 3, 11, 17)
    torch.testing.assert_close(turned(ragged, 180), ragged.flip(2, 3), atol=1e-5, rtol=0)

    height, width, degrees = 13, 21, 7.0
    images = torch.rand(1, 2, height, width, dtype=torch.float64)
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    expected = np.zeros((2, height, width))
    source = images[0].numpy()
    for i in range(height):
        for j in range(width):
            x, y = j + 0.5 - width / 2, i + 0.5 - height / 2  # pixel centre about the image centre
            u, v = c * x - s * y + width / 2 - 0.5, s * x + c * y + height / 2 - 0.5  # where it samples
            u, v = min(max(u, 0.0), width - 1.0), min(max(v, 0.0), height - 1.0)
            j0, i0 = min(int(u), width - 2), min(int(v), height - 2)
            fu, fv = u - j0, v - i0
            expected[:, i, j] = ((1 - fv) * ((1 - fu) * source[:, i0, j0] + fu * source[:, i0, j0 + 1])
                                 + fv * ((1 - fu) * source[:, i0 + 1, j0] + fu * source[:, i0 + 1, j0 + 1]))
    np.testing.assert_allclose(turned(images, degrees)[0].double().numpy(), expected, atol=1e-5)


def test_a_turned_layout_exports_and_then_still_runs_eagerly():
    """``torch.export`` (what the ONNX export uses) traces a turned layout with a dynamic batch from
    an empty grid cache, and the eager layout afterwards equals the exported one (a tensor cached
    while tracing would be a fake one and break the eager call)."""
    class Layout_(torch.nn.Module):
        def forward(self, images):
            return layout_embedding(images, "edge_weighted_pyramid")

    _turn_grid.cache_clear()
    exported = torch.export.export(Layout_(), (torch.rand(2, 3, 40, 40),),
                                   dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}})
    images = torch.rand(3, 3, 40, 40)
    torch.testing.assert_close(exported.module()(images), Layout_()(images))


def test_turns_make_the_layout_forgive_a_tilt(monkeypatch):
    """The same smooth pictures tilted by 6 degrees: the turned layout moves less than the same
    levels without turns; different pictures stay far apart."""
    torch.manual_seed(1)
    pictures = 0.2 + 0.6 * F.interpolate(torch.rand(4, 3, 10, 10), size=(96, 96), mode="bilinear")
    monkeypatch.setitem(LAYOUTS, "unturned", Layout(LAYOUTS["edge_weighted_pyramid"].levels))
    tilted = turned(pictures, 6.0)

    def moved(name):
        return (layout_embedding(tilted, name) - layout_embedding(pictures, name)).norm(dim=1)

    assert (moved("edge_weighted_pyramid") / moved("unturned")).max() < 0.9
    others = layout_embedding(pictures.roll(1, dims=0), "edge_weighted_pyramid")
    assert (others - layout_embedding(pictures, "edge_weighted_pyramid")).norm(dim=1).min() > 0.5


def test_the_edges_are_half_of_the_edges_layouts(images):
    """Of the cosine of two ``lighting_robust_edges`` layouts the edges part gives half and the
    three photometric parts a sixth each (a cosine of identical images: 1 = 1/2 + 3 x 1/6)."""
    got = layout_embedding(images, "lighting_robust_edges")
    photometric, edges = got.split([576, 64 * EDGE_BINS], dim=1)
    torch.testing.assert_close(edges.norm(dim=1) ** 2, torch.full((3,), 0.5))
    torch.testing.assert_close(edges, edge_layout(images) * 0.5 ** 0.5)
    torch.testing.assert_close(photometric, layout_embedding(images, "lighting_robust") * 0.5 ** 0.5)


@pytest.mark.parametrize("name, edges_share", [("lighting_robust_edges_pyramid", 1 / 2),
                                               ("edge_weighted_pyramid", 2 / 3)])
def test_a_pyramid_gives_each_part_its_share_split_equally_over_its_sides(name, edges_share, images, monkeypatch):
    """The edges part gets its share of the cosine, the three photometric parts the rest equally,
    and each of the three sides a third of every part."""
    levels = LAYOUTS[name].levels
    monkeypatch.setitem(LAYOUTS, name, Layout(levels))  # the shares, without the turns' mean
    blocks = layout_embedding(images, name).split([part.channels * side * side for part, _, side in levels], dim=1)
    by_part, by_side = {}, {}
    for (part, _, side), block in zip(levels, blocks, strict=True):
        energy = block.norm(dim=1) ** 2
        by_part[part] = by_part.get(part, 0) + energy
        by_side[side] = by_side.get(side, 0) + energy
    assert sorted(by_side) == sorted(PYRAMID_SIDES) == [4, 6, 8]
    for side_energy in by_side.values():
        torch.testing.assert_close(side_energy, torch.full((3,), 1 / 3))
    torch.testing.assert_close(by_part[edge_layout], torch.full((3,), edges_share))
    for part in (colour_layout, chromaticity_layout, shading_free_layout):
        torch.testing.assert_close(by_part[part], torch.full((3,), (1 - edges_share) / 3))
    for side in PYRAMID_SIDES:  # each level is its part at that side, not merely of the right size
        block = next(b for (part, _, s), b in zip(levels, blocks, strict=True) if part is edge_layout and s == side)
        torch.testing.assert_close(block, edge_layout(images, side) * (edges_share / 3) ** 0.5)


def test_the_pyramid_forgives_a_shifted_frame_more_than_eight_by_eight_cells():
    """The same smooth pictures framed 4 px lower and 2 px further right (of 88): the 8 x 8
    layout moves by about 0.8 (unit rows), the pyramid with its coarser levels by about 0.86-0.9 of
    that; different pictures stay far apart in both."""
    torch.manual_seed(0)
    pictures = 0.2 + 0.6 * F.interpolate(torch.rand(4, 3, 12, 12), size=(104, 104), mode="bilinear")
    framed, shifted = pictures[..., 8:96, 8:96], pictures[..., 12:100, 10:98]

    def moved(name):
        return (layout_embedding(shifted, name) - layout_embedding(framed, name)).norm(dim=1)

    flat, pyramid = moved("lighting_robust_edges"), moved("lighting_robust_edges_pyramid")
    assert flat.min() > 0.6
    assert (pyramid / flat).max() < 0.95
    others = layout_embedding(framed.roll(1, dims=0), "lighting_robust_edges_pyramid")
    assert (others - layout_embedding(framed, "lighting_robust_edges_pyramid")).norm(dim=1).min() > 1.0


def test_the_layout_baseline_exists_only_where_a_layout_is_appended(images):
    assert layout_baseline(0.0, "lighting_robust") == {}
    (name, embed), = layout_baseline(0.5, "lighting_robust").items()
    assert name == "layout"
    torch.testing.assert_close(embed(images), layout_embedding(images, "lighting_robust"))
