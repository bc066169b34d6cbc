"""The annotation tools' exports (COCO, Pascal VOC, CVAT, Roboflow, Label Studio), built the way
each tool documents its files, decoded and compared pixel for pixel with masks drawn here by
hand with numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segformer.errors import DataError
from segformer.training.annotations import decode_brush_rle
from segformer.training.datacheck import scan
from segformer.training.datasets import open_dataset
from tests.segdata import brush_rle, coco_rle_counts, save_png

H, W = 30, 40


def labels_of(dataset, index: int = 0) -> np.ndarray:
    return dataset[index]["labels"].numpy()


def image_file(path: Path, height: int = H, width: int = W, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return save_png(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), path)


def rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """A COCO polygon: corners in pixel-edge coordinates, covering columns x0..x1−1, rows y0..y1−1."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


# ---------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------
def coco_export(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """annotations/instances_train.json + images/train/: a street (polygons, overlaps, a crowd
    region), a ring (RLE with a hole) and an empty image. Returns the expected label maps,
    with background, for categories road(1) → 1, car(3) → 2, person(7) → 3."""
    from pycocotools import mask as coco_mask

    for i, name in enumerate(("street.png", "ring.png", "empty.png")):
        image_file(root / "images" / "train" / name, seed=i)
    crowd = np.zeros((H, W), bool)
    crowd[0:7, 25:35] = True
    ring = np.zeros((H, W), bool)
    ring[5:25, 10:30] = True
    ring[12:18, 17:23] = False  # the hole: polygons cannot say this, RLE can
    compressed = coco_mask.encode(np.asfortranarray(ring.astype(np.uint8)))
    data = {
        "images": [
            {"id": 1, "file_name": "street.png", "height": H, "width": W},
            {"id": 2, "file_name": "ring.png", "height": H, "width": W},
            {"id": 5, "file_name": "empty.png", "height": H, "width": W},
        ],
        "categories": [  # not sorted by id in the file
            {"id": 7, "name": "person", "supercategory": "human"},
            {"id": 1, "name": "road", "supercategory": "surface"},
            {"id": 3, "name": "car", "supercategory": "vehicle"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [rect(0, 20, 40, 30)]},
            # a person in front of the car and the road: smaller, so drawn on top of both
            {"id": 11, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": [rect(8, 8, 14, 24)]},
            # one car in two pieces (two polygons), one piece over the crowd region
            {"id": 12, "image_id": 1, "category_id": 3, "iscrowd": 0,
             "segmentation": [rect(2, 2, 12, 12), rect(30, 5, 36, 9)]},
            {"id": 13, "image_id": 1, "category_id": 7, "iscrowd": 1,
             "segmentation": {"counts": coco_rle_counts(crowd), "size": [H, W]}},
            {"id": 14, "image_id": 2, "category_id": 3, "iscrowd": 0,
             "segmentation": {"counts": compressed["counts"].decode(), "size": [H, W]}},
        ],
    }  # fmt: skip
    path = root / "annotations" / "instances_train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))

    # by hand, in the documented order: crowd as ignore, then road (400 px), car (100 + 24
    # px), person (96 px): each later, smaller object covers the earlier ones
    street = np.zeros((H, W), np.uint8)
    street[crowd] = 255
    street[20:30, :] = 1
    street[2:12, 2:12] = 2
    street[5:9, 30:36] = 2
    street[8:24, 8:14] = 3
    expected_ring = np.where(ring, 2, 0).astype(np.uint8)
    return path, {
        "street.png": street,
        "ring.png": expected_ring,
        "empty.png": np.zeros((H, W), np.uint8),
    }


def test_coco_polygons_rle_overlaps_crowd_and_empty_images(tmp_path):
    _, expected = coco_export(tmp_path)
    dataset = open_dataset(tmp_path, "coco", "train")
    assert dataset.labels == ["background", "road", "car", "person"]  # sorted by category id
    got = {dataset.pairs[i][0].name: labels_of(dataset, i) for i in range(len(dataset))}
    assert set(got) == set(expected)
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name
    assert scan(dataset, 4).images == 3


def test_coco_without_background_ignores_unlabelled_pixels(tmp_path):
    _, expected = coco_export(tmp_path)
    dataset = open_dataset(tmp_path, "coco", "train", background=False)
    assert dataset.labels == ["road", "car", "person"]
    for i in range(len(dataset)):
        want = expected[dataset.pairs[i][0].name].astype(np.int64)
        want = np.where(want == 0, 255, np.where(want == 255, 255, want - 1))
        assert np.array_equal(labels_of(dataset, i), want)


def test_coco_unknown_category_and_missing_image_are_named(tmp_path):
    path, _ = coco_export(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotation 10 has category_id 99, not one of .*1, 3, 7"):
        open_dataset(tmp_path, "coco", "train")
    data["annotations"][0]["category_id"] = 1
    data["images"].append({"id": 9, "file_name": "gone.png", "height": H, "width": W})
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"image gone\.png not found"):
        open_dataset(tmp_path, "coco", "train")
    unpaired: list[str] = []
    assert len(open_dataset(tmp_path, "coco", "train", unpaired=unpaired)) == 3
    assert len(unpaired) == 1 and "gone.png" in unpaired[0]


def test_coco_roboflow_export_drops_the_project_category(tmp_path):
    folder = tmp_path / "valid"
    image_file(folder / "a_jpg.rf.0123.png")
    data = {
        "images": [{"id": 0, "file_name": "a_jpg.rf.0123.png", "height": H, "width": W}],
        # Roboflow's export: category 0 is the project, parent of the real classes
        "categories": [
            {"id": 0, "name": "cracks", "supercategory": "none"},
            {"id": 1, "name": "crack", "supercategory": "cracks"},
            {"id": 2, "name": "hole", "supercategory": "cracks"},
        ],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 2, "iscrowd": 0,
             "segmentation": [rect(5, 5, 15, 10)], "area": 50, "bbox": [5, 5, 10, 5]},
        ],
    }  # fmt: skip
    (folder / "_annotations.coco.json").write_text(json.dumps(data))
    dataset = open_dataset(tmp_path, "coco", "val")
    assert dataset.labels == ["background", "crack", "hole"]
    want = np.zeros((H, W), np.uint8)
    want[5:10, 5:15] = 2
    assert np.array_equal(labels_of(dataset), want)


# ---------------------------------------------------------------------------------------
# Pascal VOC
# ---------------------------------------------------------------------------------------
# Colours from the VOC devkit's documentation of its class colour map.
VOC_COLOURS = {
    0: (0, 0, 0),
    1: (128, 0, 0),
    2: (0, 128, 0),
    15: (192, 128, 128),
    255: (224, 224, 192),
}


def test_voc_palette_masks_and_borders(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    label = np.zeros((H, W), np.uint8)
    label[5:20, 5:20] = 15  # person
    label[22:28, 25:38] = 1  # aeroplane
    border = np.zeros((H, W), bool)
    border[4, 4:21] = border[20, 4:21] = border[4:21, 4] = border[4:21, 20] = True
    label[border] = 255
    palette = np.zeros((256, 3), np.uint8)
    for index, colour in VOC_COLOURS.items():
        palette[index] = colour
    for name in ("2007_000032", "2007_000039"):
        image_file(base / "JPEGImages" / f"{name}.jpg")
    mask = Image.fromarray(label, "L").convert("P")
    mask.putpalette(palette.ravel().tolist())
    (base / "SegmentationClass").mkdir(parents=True)
    mask.save(base / "SegmentationClass" / "2007_000032.png")
    # the same mask re-saved as RGB by an image editor
    save_png(palette[label], base / "SegmentationClass" / "2007_000039.png")
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n2007_000039\n")

    dataset = open_dataset(tmp_path, "voc", "val")
    assert len(dataset.labels) == 21 and dataset.labels[15] == "person"
    assert dataset.labels[0] == "background" and dataset.labels[20] == "tvmonitor"
    for index, colour in VOC_COLOURS.items():
        if index < 21:
            assert tuple(dataset.palette[index]) == colour
    assert np.array_equal(labels_of(dataset, 0), label)
    assert np.array_equal(labels_of(dataset, 1), label)
    assert scan(dataset, 21).ignored_pixels == 2 * int(border.sum())


# ---------------------------------------------------------------------------------------
# CVAT "Segmentation mask 1.1"
# ---------------------------------------------------------------------------------------
def test_cvat_segmentation_mask_export(tmp_path):
    (tmp_path / "labelmap.txt").write_text(
        "# label:color_rgb:parts:actions\nbackground:0,0,0::\ncar:250,50,83::\nperson:61,61,245::\n"
    )
    colours = np.array([[0, 0, 0], [250, 50, 83], [61, 61, 245]], np.uint8)
    labels = []
    for i, name in enumerate(("frame_000000", "frame_000001")):
        label = np.zeros((H, W), np.uint8)
        label[3 + i : 12, 4:30] = 1
        label[10:25, 20 + i : 26] = 2
        labels.append(label)
        image_file(tmp_path / "JPEGImages" / f"{name}.jpg", seed=i)
        save_png(colours[label], tmp_path / "SegmentationClass" / f"{name}.png")
        save_png(colours[label], tmp_path / "SegmentationObject" / f"{name}.png")
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "default.txt").write_text(
        "frame_000000\nframe_000001\n"
    )
    dataset = open_dataset(tmp_path, "cvat", "train")  # no subsets: "default" stands for all
    assert dataset.labels == ["background", "car", "person"]
    assert dataset.palette == colours.tolist()
    for i in range(2):
        assert np.array_equal(labels_of(dataset, i), labels[i])
    (tmp_path / "labelmap.txt").write_text("background:0,0,0::\ncar:250,50::\n")
    with pytest.raises(DataError, match=r"labelmap.txt:2: expected 'name:r,g,b:parts:actions'"):
        open_dataset(tmp_path, "cvat", "train")


# ---------------------------------------------------------------------------------------
# Roboflow semantic segmentation masks
# ---------------------------------------------------------------------------------------
def test_roboflow_semantic_masks_export(tmp_path):
    labels = []
    for split, folder in (("train", "train"), ("val", "valid")):
        label = np.zeros((H, W), np.uint8)
        label[:10, :] = 1
        label[15:20, 5:35] = 2
        labels.append(label)
        stem = f"road_{split}_jpg.rf.3f9a2b"
        image_file(tmp_path / folder / f"{stem}.jpg")
        save_png(label, tmp_path / folder / f"{stem}_mask.png")
        (tmp_path / folder / "_classes.csv").write_text(
            "Pixel Value, Class\n0, background\n1, crack\n2, pothole\n"
        )
    dataset = open_dataset(tmp_path, "roboflow", "val")
    assert dataset.labels == ["background", "crack", "pothole"] and len(dataset) == 1
    assert np.array_equal(labels_of(dataset), labels[1])
    bad = labels[0].copy()
    bad[0, 0] = 5
    save_png(bad, tmp_path / "train" / "road_train_jpg.rf.3f9a2b_mask.png")
    with pytest.raises(DataError, match="label 5, but there are 3 classes"):
        scan(open_dataset(tmp_path, "roboflow", "train"), 3)


# ---------------------------------------------------------------------------------------
# Label Studio brush labels
# ---------------------------------------------------------------------------------------
def brush_result(mask: np.ndarray, label: str, rid: str) -> dict:
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask] = 255  # the brush layer as Label Studio stores it: RGBA, painted = opaque
    return {
        "id": rid,
        "type": "brushlabels",
        "from_name": "tag",
        "to_name": "image",
        "original_width": mask.shape[1],
        "original_height": mask.shape[0],
        "image_rotation": 0,
        "value": {"format": "rle", "rle": brush_rle(rgba.ravel()), "brushlabels": [label]},
    }


def test_brush_rle_decodes_the_documented_stream():
    values = np.array([7, 7, 1, 0, 0, 0, 0, 255, 255, 9], np.uint8)
    assert np.array_equal(decode_brush_rle(brush_rle(values)), values)
    assert np.array_equal(decode_brush_rle(brush_rle(values, literal_prefix=0)), values)
    long = np.repeat(np.array([0, 255, 0], np.uint8), [70_000, 300, 5])
    assert np.array_equal(decode_brush_rle(brush_rle(long)), long)


def test_labelstudio_brush_export(tmp_path):
    road = np.zeros((H, W), bool)
    road[18:, :] = True
    car = np.zeros((H, W), bool)
    car[12:22, 5:20] = True  # on the road, smaller: stays on top
    tree = np.zeros((H, W), bool)
    tree[0:8, 30:38] = True
    tasks = [
        {
            "id": 1,
            "data": {"image": "/data/upload/3/5a1b2c3d-street.png"},
            "annotations": [
                {"id": 5, "was_cancelled": True, "result": [brush_result(tree, "Tree", "x")]},
                {
                    "id": 6,
                    "was_cancelled": False,
                    "result": [brush_result(car, "Car", "a"), brush_result(road, "Road", "b")],
                },
            ],
            "predictions": [],
        },
        {
            "id": 2,
            "data": {"image": "/data/local-files/?d=photos/lane.png"},
            "annotations": [{"id": 7, "result": [brush_result(tree, "Tree", "c")]}],
        },
        {"id": 3, "data": {"image": "/data/upload/3/0badf00d-nothing.png"}, "annotations": []},
    ]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    image_file(tmp_path / "images" / "street.png")
    image_file(tmp_path / "photos" / "lane.png")
    image_file(tmp_path / "images" / "nothing.png")
    dataset = open_dataset(tmp_path, "labelstudio", "train")
    assert dataset.labels == ["background", "Car", "Road", "Tree"]
    street = np.zeros((H, W), np.uint8)
    street[road] = 2
    street[car] = 1
    lane = np.where(tree, 3, 0).astype(np.uint8)
    got = {dataset.pairs[i][0].name: labels_of(dataset, i) for i in range(len(dataset))}
    assert np.array_equal(got["street.png"], street)
    assert np.array_equal(got["lane.png"], lane)
    assert np.array_equal(got["nothing.png"], np.zeros((H, W), np.uint8))
    ignored = open_dataset(tmp_path, "labelstudio", "train", background=False)
    assert ignored.labels == ["Car", "Road", "Tree"]
    assert np.array_equal(labels_of(ignored, 0), np.where(street == 0, 255, street - 1))
