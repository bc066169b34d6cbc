"""Palettes (standard colours, choice by label names, generated ones) and overlays."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segformer.inference.segmenter import ClassShare
from segformer.inference.visualize import (
    ADE20K_LABELS,
    ADE20K_PALETTE,
    CAMVID_LABELS,
    CAMVID_PALETTE,
    CITYSCAPES_LABELS,
    CITYSCAPES_PALETTE,
    add_legend,
    blend,
    colorize,
    generate_palette,
    match_dataset,
    overlay,
    palette_for,
    palette_name,
)


def test_standard_palettes():
    assert len(ADE20K_LABELS) == len(ADE20K_PALETTE) == 150
    assert len(CITYSCAPES_LABELS) == len(CITYSCAPES_PALETTE) == 19
    assert len(CAMVID_LABELS) == len(CAMVID_PALETTE) == 11
    # spot checks against the data sets' published colours
    assert ADE20K_PALETTE[0] == (120, 120, 120) and ADE20K_PALETTE[149] == (92, 0, 255)
    assert ADE20K_LABELS[12] == "person" and ADE20K_PALETTE[12] == (150, 5, 61)
    assert CITYSCAPES_PALETTE[CITYSCAPES_LABELS.index("road")] == (128, 64, 128)
    assert CITYSCAPES_PALETTE[CITYSCAPES_LABELS.index("car")] == (0, 0, 142)
    assert CITYSCAPES_PALETTE[CITYSCAPES_LABELS.index("sky")] == (70, 130, 180)
    assert CAMVID_PALETTE[CAMVID_LABELS.index("road")] == (128, 64, 128)
    assert CAMVID_PALETTE[CAMVID_LABELS.index("bicyclist")] == (0, 128, 192)


def test_datasets_are_recognised_by_names_or_count():
    assert match_dataset(list(CITYSCAPES_LABELS)) == "cityscapes"
    assert match_dataset([f"LABEL_{i}" for i in range(19)]) == "cityscapes"
    assert (
        match_dataset(
            [
                "Sky",
                "Building",
                "Pole",
                "Road",
                "Sidewalk",
                "Tree",
                "SignSymbol",
                "Fence",
                "Car",
                "Pedestrian",
                "Bicyclist",
            ]
        )
        == "camvid"
    )
    # the names transformers' nvidia/*-ade models carry
    hf_ade = ["wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane"]
    assert match_dataset(hf_ade + list(ADE20K_LABELS[9:])) == "ade20k"
    assert match_dataset([f"part{i}" for i in range(19)]) is None  # 19 classes, other names
    assert match_dataset(["cat", "dog"]) is None


def test_palette_choice():
    own = [[1, 2, 3], [4, 5, 6]]
    np.testing.assert_array_equal(palette_for(["a", "b"], own), own)
    assert palette_name(["a", "b"], own) == "model"
    np.testing.assert_array_equal(palette_for(list(CITYSCAPES_LABELS)), CITYSCAPES_PALETTE)
    # a stored palette of the wrong length is ignored
    assert palette_name(list(CITYSCAPES_LABELS), own) == "cityscapes"
    generated = palette_for(["cat", "dog", "bird"])
    assert palette_name(["cat", "dog", "bird"]) == "generated"
    np.testing.assert_array_equal(generated, generate_palette(3))


def test_generated_palettes_are_deterministic_and_distinct():
    first, again = generate_palette(200), generate_palette(200)
    np.testing.assert_array_equal(first, again)
    assert first.dtype == np.uint8 and first.shape == (200, 3)
    assert len({tuple(c) for c in first}) == 200
    # neighbouring ids are far apart in colour
    distance = np.abs(first[1:].astype(int) - first[:-1].astype(int)).sum(1)
    assert distance.min() > 60


def test_colorize_and_blend():
    labels = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(colorize(labels, palette)), palette[labels])
    image = Image.fromarray(np.full((2, 2, 3), 100, np.uint8))
    np.testing.assert_array_equal(np.asarray(blend(image, labels, palette, 0.0)), np.asarray(image))
    np.testing.assert_array_equal(
        np.asarray(blend(image, labels, palette, 1.0, outline=False)), palette[labels]
    )
    half = np.asarray(blend(image, labels, palette, 0.5, outline=False)).astype(int)
    np.testing.assert_allclose(half, (100 + palette[labels].astype(int)) / 2, atol=1)
    with pytest.raises(ValueError, match="opacity"):
        blend(image, labels, palette, 1.5)


def test_outline_marks_region_borders():
    labels = np.zeros((8, 8), dtype=np.uint8)
    labels[:, 4:] = 1
    palette = np.array([[255, 0, 0], [0, 0, 255]], dtype=np.uint8)
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    outlined = np.asarray(blend(image, labels, palette, 0.3))
    assert tuple(outlined[0, 3]) == (255, 0, 0) and tuple(outlined[0, 4]) == (
        0,
        0,
        255,
    )  # solid at the border
    assert outlined[0, 0, 0] < 255  # blended inside


def entries():
    return [
        ClassShare(0, "road", 600, 0.6, (128, 64, 128)),
        ClassShare(2, "sky", 300, 0.3, (70, 130, 180)),
        ClassShare(1, "car", 100, 0.1, (0, 0, 142)),
    ]


def colours_in(picture: Image.Image) -> set[tuple[int, int, int]]:
    return {tuple(c) for c in np.asarray(picture).reshape(-1, 3)}


def test_side_legend_shows_every_class_colour():
    picture = Image.new("RGB", (200, 120), (255, 255, 255))
    with_legend = add_legend(picture, entries(), "side")
    assert with_legend.height == 120 and with_legend.width > 200
    np.testing.assert_array_equal(
        np.asarray(with_legend)[:, :200], np.asarray(picture)
    )  # picture untouched
    panel = with_legend.crop((200, 0, with_legend.width, with_legend.height))
    assert {e.color for e in entries()} <= colours_in(panel)


def test_side_legend_grows_for_small_images_and_summarises_long_lists():
    tiny = Image.new("RGB", (40, 30))
    many = [ClassShare(i, f"class {i}", 10, 0.01, (i * 7, 255 - i * 7, 100)) for i in range(30)]
    legend = add_legend(tiny, many, "side", max_rows=10)
    assert legend.height > 30  # taller than the image, to fit the rows
    panel_colours = colours_in(legend.crop((40, 0, legend.width, legend.height)))
    assert (
        many[8].color in panel_colours and many[9].color not in panel_colours
    )  # 9 rows + "+21 more"


def test_inside_legend_keeps_the_size():
    picture = Image.new("RGB", (320, 240), (255, 255, 255))
    inside = add_legend(picture, entries(), "inside")
    assert inside.size == picture.size
    assert {e.color for e in entries()} <= colours_in(inside)


def test_overlay_combines_blend_and_legend():
    labels = np.zeros((60, 80), dtype=np.uint8)
    labels[30:] = 1
    palette = np.array([[255, 0, 0], [0, 255, 0]], dtype=np.uint8)
    image = Image.new("RGB", (80, 60), (0, 0, 0))
    shares = [
        ClassShare(0, "top", 2400, 0.5, (255, 0, 0)),
        ClassShare(1, "bottom", 2400, 0.5, (0, 255, 0)),
    ]
    plain = overlay(image, labels, palette, shares, legend=False)
    assert plain.size == (80, 60)
    assert overlay(image, labels, palette, shares).width > 80
    with pytest.raises(ValueError, match="placement"):
        overlay(image, labels, palette, shares, legend="bottom")
