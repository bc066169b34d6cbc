"""Every dataset format on small generated data, label mappings against the formats' published
conventions, the pre-flight scan's errors, and the loaders' order, sharding and resumption."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from segformer.errors import DataError
from segformer.training.config import DATASET_FORMATS
from segformer.training.datacheck import scan
from segformer.training.datasets import (
    CITYSCAPES_TRAIN_IDS,
    FORMATS,
    AugmentedDataset,
    ClassBalancedSampler,
    EpochSampler,
    eval_loader,
    open_dataset,
    open_splits,
    train_loader,
)
from segformer.training.files import read_labels_file
from tests.conftest import CAMVID, CITYSCAPES_SAMPLE
from tests.segdata import make_samples, save_png, write_ade20k, write_camvid, write_folder


def as_numpy(item: dict) -> tuple[np.ndarray, np.ndarray]:
    return item["image"].numpy(), item["labels"].numpy()


def test_format_lists_agree():
    assert FORMATS == DATASET_FORMATS


# ---------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------
def test_folder_with_split_subfolders_matches_by_stem(tmp_path):
    samples = make_samples(3)
    write_folder(tmp_path, samples, "train", image_suffix=".jpg")
    dataset = open_dataset(tmp_path, "folder", "train")
    assert len(dataset) == 3 and dataset.labels is None
    for i, (_, label) in enumerate(samples):
        got_image, got_label = as_numpy(dataset[i])
        assert np.array_equal(got_label, label)  # folder masks hold train ids as they are
        decoded = np.array(
            Image.open(tmp_path / "images" / "train" / f"{i:03d}.jpg").convert("RGB")
        )
        assert np.array_equal(got_image, decoded)


def test_folder_layouts_without_split_and_split_first(tmp_path):
    samples = make_samples(2)
    write_folder(tmp_path / "flat", samples, None, mask_dir="labels")
    assert len(open_dataset(tmp_path / "flat", "folder", None)) == 2
    for i, (image, label) in enumerate(samples):
        save_png(image, tmp_path / "nested" / "val" / "images" / f"a{i}.png")
        save_png(label, tmp_path / "nested" / "val" / "annotations" / f"a{i}_mask.png")
    dataset = open_dataset(tmp_path / "nested", "folder", "val")
    assert np.array_equal(as_numpy(dataset[1])[1], samples[1][1])


def test_binary_masks_become_zero_and_one(tmp_path):
    image = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    mask[0, 0] = 200  # a JPEG-ish in-between value: thresholded
    mask[0, 1] = 30
    save_png(image, tmp_path / "images" / "a.png")
    save_png(mask, tmp_path / "masks" / "a.png")
    save_png(image, tmp_path / "images" / "b.png")
    save_png((mask > 127).astype(np.uint8), tmp_path / "masks" / "b.png")  # already 0/1
    dataset = open_dataset(tmp_path, "binary", None)
    assert dataset.labels == ["background", "foreground"]
    expected = (mask >= 128).astype(np.int64)
    assert np.array_equal(as_numpy(dataset[0])[1], expected)
    assert np.array_equal(as_numpy(dataset[1])[1], expected)


def test_list_file_with_relative_paths(tmp_path):
    samples = make_samples(2)
    for i, (image, label) in enumerate(samples):
        save_png(image, tmp_path / "pics" / f"{i}.png")
        save_png(label, tmp_path / "gt" / f"{i}.png")
    (tmp_path / "train.txt").write_text(
        "# image mask\npics/0.png gt/0.png\n\npics/1.png, gt/1.png\n"
    )
    dataset = open_dataset(tmp_path, "list", "train")
    assert [np.array_equal(as_numpy(dataset[i])[1], samples[i][1]) for i in range(2)] == [
        True,
        True,
    ]
    assert len(open_dataset(tmp_path / "train.txt", "list", None)) == 2
    (tmp_path / "bad.txt").write_text("pics/0.png gt/missing.png\n")
    with pytest.raises(DataError, match=r"bad.txt:1: .*missing.png: missing mask"):
        open_dataset(tmp_path / "bad.txt", "list", None)


def test_camvid_void_is_ignored_and_names_and_colours_come_with_the_format(tmp_path):
    samples = make_samples(2)
    write_camvid(tmp_path, samples, "val")
    dataset = open_dataset(tmp_path, "camvid", "val")
    assert dataset.labels[:3] == ["sky", "building", "pole"] and len(dataset.labels) == 11
    assert dataset.palette[3] == [128, 64, 128]  # road
    stored = np.array(Image.open(tmp_path / "valannot" / "frame_001.png"))
    assert (stored == 11).any()
    assert np.array_equal(as_numpy(dataset[1])[1], samples[1][1])


def test_ade20k_labels_are_reduced(tmp_path):
    samples = make_samples(2)
    write_ade20k(tmp_path, samples, "val")
    (tmp_path / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\twall\n2\t0.1\t1\t1\tbuilding, edifice\n3\t0.1\t1\t1\tsky\n"
    )
    dataset = open_dataset(tmp_path, "ade20k", "val")
    assert dataset.labels == ["wall", "building", "sky"]
    assert np.array_equal(as_numpy(dataset[0])[1], samples[0][1])  # 0 → 255, k → k − 1
    raw = open_dataset(tmp_path, "ade20k", "validation", reduce_labels=False)
    assert np.array_equal(as_numpy(raw[0])[1], np.where(samples[0][1] == 255, 0, samples[0][1] + 1))


def test_cityscapes_label_ids_map_to_the_19_train_ids(tmp_path):
    # Every one of the 34 label ids once, plus the licence-plate id -1 stored as 255.
    label_ids = np.arange(-1, 34).reshape(5, 7) % 256
    image = np.zeros((5, 7, 3), np.uint8)
    save_png(image, tmp_path / "leftImg8bit" / "val" / "ulm" / "ulm_000000_000019_leftImg8bit.png")
    save_png(
        label_ids.astype(np.uint8),
        tmp_path / "gtFine" / "val" / "ulm" / "ulm_000000_000019_gtFine_labelIds.png",
    )
    dataset = open_dataset(tmp_path, "cityscapes", "val")
    got = as_numpy(dataset[0])[1]
    # the official table: road 7 → 0, sidewalk 8 → 1, … bicycle 33 → 18; all else ignored
    official = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
    assert official == CITYSCAPES_TRAIN_IDS
    expected = np.vectorize(lambda v: official.get(int(v), 255))(label_ids)
    assert np.array_equal(got, expected)
    assert dataset.labels[0] == "road" and dataset.labels[-1] == "bicycle"


@pytest.mark.shared
def test_cityscapes_sample_label_ids_agree_with_its_label_train_ids():
    dataset = open_dataset(CITYSCAPES_SAMPLE, "cityscapes", "val")
    train_ids = np.array(
        Image.open(next((CITYSCAPES_SAMPLE / "gtFine").rglob("*_labelTrainIds.png")))
    )
    # The sample's files were downscaled one by one, so ~0.2% of boundary pixels disagree.
    assert (as_numpy(dataset[0])[1] == train_ids).mean() > 0.995


@pytest.mark.shared
def test_joined_splits_and_file_name_filters(tmp_path):
    samples = make_samples(3)
    write_camvid(tmp_path, samples[:2], "train")
    write_camvid(tmp_path, samples[2:], "val")
    # two recordings, told apart by the file-name prefix, across the two splits
    for split, old, new in [
        ("train", "frame_001", "drive2_001"),
        ("val", "frame_000", "drive2_000"),
    ]:
        for folder in (split, f"{split}annot"):
            (tmp_path / folder / f"{old}.png").rename(tmp_path / folder / f"{new}.png")
    joined = open_splits(tmp_path, "camvid", "train+val")
    assert sorted(p[0].name for p in joined.pairs) == [
        "drive2_000.png",
        "drive2_001.png",
        "frame_000.png",
    ]
    held_out = open_splits(tmp_path, "camvid", "train+val", include=["drive2_*"])
    assert sorted(p[0].name for p in held_out.pairs) == ["drive2_000.png", "drive2_001.png"]
    assert "drive2_*" in held_out.name
    rest = open_splits(tmp_path, "camvid", "train+val", exclude=["drive2_*"])
    assert [p[0].name for p in rest.pairs] == ["frame_000.png"]
    # each image still comes with its own mask
    assert np.array_equal(as_numpy(rest[0])[1], samples[0][1])
    with pytest.raises(DataError, match="no images left after the file-name filters"):
        open_splits(tmp_path, "camvid", "train", include=["nothing_*"])


@pytest.mark.shared
def test_camvid_drives_by_file_name_prefix():
    # CamVid train + val hold three recordings: 0001TP (62 frames, dusk), 0006R0 (101) and
    # 0016E5 (305); val is 101 frames of 0016E5.
    counts = {
        drive: len(open_splits(CAMVID, "camvid", "train+val", include=[f"{drive}_*"]))
        for drive in ("0001TP", "0006R0", "0016E5")
    }
    assert counts == {"0001TP": 62, "0006R0": 101, "0016E5": 305}
    assert len(open_splits(CAMVID, "camvid", "train+val", exclude=["0006R0_*"])) == 367


def test_camvid_shared_folder_opens_and_passes_the_preflight_scan():
    train, val = open_dataset(CAMVID, "camvid", "train"), open_dataset(CAMVID, "camvid", "val")
    assert (len(train), len(val)) == (367, 101)
    report = scan(val, 11)
    assert report.images == 101 and report.ignored_pixels > 0 and (report.class_pixels > 0).all()


@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    samples = make_samples(3)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "annotation": datasets.Image(),
            "scene": datasets.Value("int32"),
        }
    )
    rows = {
        "image": [Image.fromarray(image) for image, _ in samples],
        # scene_parse_150 convention: 0 = other, class k stored as k + 1
        "annotation": [
            Image.fromarray(np.where(label == 255, 0, label + 1).astype(np.uint8))
            for _, label in samples
        ],
        "scene": [0, 1, 2],
    }
    table = datasets.Dataset.from_dict(rows, features=features)
    root = tmp_path_factory.mktemp("hf")
    datasets.DatasetDict({"train": table, "validation": table}).save_to_disk(str(root / "saved"))
    (root / "parquet").mkdir()
    table.to_parquet(str(root / "parquet" / "validation-00000-of-00001.parquet"))
    return root, samples


def test_hugging_face_dataset_saved_to_disk(hf_dataset):
    root, samples = hf_dataset
    dataset = open_dataset(root / "saved", "hf", "val", reduce_labels=True)
    assert len(dataset) == 3
    image, label = as_numpy(dataset[2])
    assert np.array_equal(image, samples[2][0]) and np.array_equal(label, samples[2][1])
    assert scan(dataset, 3).images == 3


def test_hugging_face_dataset_from_local_parquet_files(hf_dataset):
    root, samples = hf_dataset
    dataset = open_dataset(
        root / "parquet", "hf", "val", reduce_labels=True, mask_column="annotation"
    )
    assert np.array_equal(as_numpy(dataset[0])[1], samples[0][1])
    with pytest.raises(DataError, match="no column 'mask'"):
        open_dataset(root / "parquet", "hf", "val", mask_column="mask")


def test_labels_json_in_every_shape(tmp_path):
    cases = {
        "list.json": ["sky", "road"],
        "ids.json": {"0": "sky", "1": "road"},
        "full.json": {"labels": ["sky", "road"], "palette": [[0, 0, 255], [90, 90, 90]]},
        "hf.json": {"id2label": {"1": "road", "0": "sky"}},
    }
    for name, content in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        names, palette = read_labels_file(tmp_path / name)
        assert names == ["sky", "road"]
        assert palette == ([[0, 0, 255], [90, 90, 90]] if name == "full.json" else None)
    (tmp_path / "gap.json").write_text(json.dumps({"0": "a", "2": "c"}))
    with pytest.raises(DataError, match="without gaps"):
        read_labels_file(tmp_path / "gap.json")
    (tmp_path / "bad_palette.json").write_text(
        json.dumps({"labels": ["a", "b"], "palette": [[1, 2, 3]]})
    )
    with pytest.raises(DataError, match="palette must be 2"):
        read_labels_file(tmp_path / "bad_palette.json")


def test_colour_masks_are_read_through_a_palette(tmp_path):
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    label = np.array([[0, 1, 2, 1]] * 4, np.uint8)
    save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "images" / "a.png")
    save_png(np.array(palette, np.uint8)[label], tmp_path / "masks" / "a.png")
    dataset = open_dataset(tmp_path, "folder", None, mask_palette=palette)
    assert np.array_equal(as_numpy(dataset[0])[1], label)
    with pytest.raises(DataError, match=r"a colour mask; .*labels JSON"):
        open_dataset(tmp_path, "folder", None)[0]


# ---------------------------------------------------------------------------------------
# Bad data: one clear error naming the file, before training
# ---------------------------------------------------------------------------------------
def test_preflight_scan_names_the_bad_file(tmp_path):
    samples = make_samples(3)
    write_folder(tmp_path / "labels", samples, None)
    bad = samples[1][1].copy()
    bad[0, 0] = 7
    save_png(bad, tmp_path / "labels" / "masks" / "001.png")
    with pytest.raises(
        DataError, match=r"001\.png: label 7, but there are 3 classes \(0\.\.2, 255 = ignore\)"
    ):
        scan(open_dataset(tmp_path / "labels", "folder", None), 3)

    write_folder(tmp_path / "size", samples, None)
    save_png(samples[2][1][:, :40], tmp_path / "size" / "masks" / "002.png")
    with pytest.raises(
        DataError, match=r"002\.png: image is 64×64 but its mask .*002\.png is 40×64"
    ):
        scan(open_dataset(tmp_path / "size", "folder", None), 3)

    write_folder(tmp_path / "missing", samples, None)
    (tmp_path / "missing" / "masks" / "000.png").unlink()
    with pytest.raises(DataError, match=r"000\.png: no mask for this image"):
        open_dataset(tmp_path / "missing", "folder", None)

    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(DataError, match="no images found"):
        open_dataset(tmp_path / "empty", "folder", None)

    write_folder(tmp_path / "corrupt", samples, None)
    (tmp_path / "corrupt" / "images" / "001.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"001\.png: not a readable image"):
        scan(open_dataset(tmp_path / "corrupt", "folder", None), 3)

    with pytest.raises(DataError, match="not a CamVid"):
        open_dataset(tmp_path / "labels", "camvid", "train")
    with pytest.raises(DataError, match="unknown dataset format"):
        open_dataset(tmp_path / "labels", "pascal", "train")


def test_scan_counts_pixels_and_derives_class_weights(tmp_path):
    label = np.array([[0, 0, 0, 1], [0, 0, 1, 255]], np.uint8)
    save_png(np.zeros((2, 4, 3), np.uint8), tmp_path / "images" / "a.png")
    save_png(label, tmp_path / "masks" / "a.png")
    save_png(np.zeros((2, 4, 3), np.uint8), tmp_path / "images" / "b.png")
    save_png(np.full((2, 4), 2, np.uint8), tmp_path / "masks" / "b.png")
    report = scan(open_dataset(tmp_path, "folder", None), 3)
    assert report.class_pixels.tolist() == [5, 2, 8] and report.ignored_pixels == 1
    # median frequency: f = pixels / pixels of the images holding the class = 5/8, 2/8, 8/8
    frequency = np.array([5 / 8, 2 / 8, 1.0])
    assert report.class_weights("median-frequency") == pytest.approx(
        (np.median(frequency) / frequency).tolist()
    )
    share = np.array([5, 2, 8]) / 15
    assert report.class_weights("enet") == pytest.approx((1 / np.log(1.02 + share)).tolist())


def test_class_balanced_weights_by_hand(tmp_path):
    """Rare-class sampling: a class is drawn with probability ∝ exp((1 − share) / T), then one
    of the images holding it; the weights are those chances, computed here by hand."""
    road = np.zeros((4, 5), np.uint8)  # 20 pixels of class 0
    with_rider = road.copy()
    with_rider[0, :2] = 1  # 2 pixels of class 1
    with_sign = road.copy()
    with_sign[3, 4] = 2  # 1 pixel of class 2
    for name, label in {"a": road, "b": with_rider, "c": with_sign}.items():
        save_png(np.zeros((4, 5, 3), np.uint8), tmp_path / "images" / f"{name}.png")
        save_png(label, tmp_path / "masks" / f"{name}.png")
    report = scan(open_dataset(tmp_path, "folder", None), 3)
    assert report.class_pixels.tolist() == [57, 2, 1]
    temperature = 0.1
    chance = [math.exp((1 - pixels / 60) / temperature) for pixels in (57, 2, 1)]
    chance = [c / sum(chance) for c in chance]
    # Class 0 is in all three images, class 1 only in b, class 2 only in c.
    expected = [chance[0] / 3, chance[0] / 3 + chance[1], chance[0] / 3 + chance[2]]
    weights = report.class_balanced_weights(temperature)
    assert weights.tolist() == pytest.approx(expected)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[2] > weights[1] > weights[0]  # the rarer the class, the more its image


def test_class_balanced_sampler_draws_by_weight_resumes_and_shards():
    weights = np.array([0.1, 0.2, 0.7])
    sampler = ClassBalancedSampler(weights, seed=5)
    drawn = []
    for epoch in range(2000):
        sampler.set_epoch(epoch)
        drawn += [index for index, _, _ in sampler]
    frequency = np.bincount(drawn, minlength=3) / len(drawn)
    assert frequency == pytest.approx(weights, abs=0.015)  # 6000 draws
    sampler.set_epoch(7)
    whole = list(sampler)
    assert [key[1] for key in whole] == [7, 7, 7] and [key[2] for key in whole] == [0, 1, 2]
    sampler.set_epoch(7, skip=2)
    assert list(sampler) == whole[2:] and len(sampler) == 1  # a resume picks up mid-epoch
    shards = []
    for rank in range(2):
        shard = ClassBalancedSampler(weights, seed=5, rank=rank, world_size=2)
        shard.set_epoch(7)
        shards.append(list(shard))
    # Two processes split one epoch's draws (3 images, padded to 4): rank r takes r, r + 2.
    assert [[key[2] for key in shard] for shard in shards] == [[0, 2], [1, 3]]


def test_an_image_drawn_twice_is_augmented_twice(tmp_path):
    write_folder(tmp_path, make_samples(2), None)
    dataset = AugmentedDataset(open_dataset(tmp_path, "folder", None), _crop_transform, seed=0)
    loader, _ = train_loader(
        dataset, batch_size=2, num_workers=0, seed=0, weights=np.array([1.0, 0.0])
    )
    batch = next(iter(loader))["pixel_values"]
    image, _ = dataset.dataset.load(0)  # both draws are image 0, each with its own crop
    for draw in range(2):
        top = int(np.random.default_rng([0, 0, 0, draw]).integers(0, 8))
        assert torch.equal(batch[draw], torch.from_numpy(image[top : top + 16, :16].copy()))
    assert not torch.equal(batch[0], batch[1])


# ---------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------
def _crop_transform(image, label, rng):
    top = int(rng.integers(0, 8))
    return torch.from_numpy(image[top : top + 16, :16].copy()), torch.from_numpy(
        label[top : top + 16, :16].astype(np.int64)
    )


def test_training_batches_depend_only_on_seed_epoch_and_position(tmp_path):
    write_folder(tmp_path, make_samples(6), None)
    dataset = AugmentedDataset(open_dataset(tmp_path, "folder", None), _crop_transform, seed=3)

    def epoch_batches(num_workers: int, epoch: int, skip: int = 0) -> list[torch.Tensor]:
        loader, sampler = train_loader(dataset, batch_size=2, num_workers=num_workers, seed=3)
        sampler.set_epoch(epoch, skip=skip * 2)
        return [batch["pixel_values"] for batch in loader]

    first = epoch_batches(0, epoch=0)
    assert len(first) == 3
    assert all(
        torch.equal(a, b) for a, b in zip(first, epoch_batches(2, epoch=0), strict=True)
    )  # workers
    assert all(
        torch.equal(a, b) for a, b in zip(first[1:], epoch_batches(0, epoch=0, skip=1), strict=True)
    )
    assert not all(torch.equal(a, b) for a, b in zip(first, epoch_batches(0, epoch=1), strict=True))


def test_distributed_shards_cover_each_epoch_once(tmp_path):
    write_folder(tmp_path, make_samples(7), None)
    dataset = AugmentedDataset(open_dataset(tmp_path, "folder", None), _crop_transform, seed=0)
    shards = [list(EpochSampler(dataset, seed=0, rank=r, world_size=2)) for r in range(2)]
    indices = [i for shard in shards for i, _ in shard]
    assert len(shards[0]) == len(shards[1]) == 4 and set(indices) == set(
        range(7)
    )  # padded by one repeat
    eval_indices = [
        [item["index"] for batch in eval_loader(dataset.dataset, 0, r, 2) for item in batch]
        for r in range(2)
    ]
    assert sorted(eval_indices[0] + eval_indices[1]) == list(range(7))  # evaluation: no repeats


def test_hf_format_without_the_datasets_package_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        open_dataset(tmp_path, "hf", "train")


def test_photos_are_read_upright_as_prediction_reads_them(tmp_path):
    stored = np.zeros((30, 40, 3), np.uint8)  # 40 wide, 30 high as stored
    stored[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    (tmp_path / "images").mkdir()
    Image.fromarray(stored).save(tmp_path / "images" / "photo.jpg", exif=exif, quality=95)
    save_png(
        np.zeros((40, 30), np.uint8), tmp_path / "masks" / "photo.png"
    )  # drawn on the upright view
    dataset = open_dataset(tmp_path, "folder", None)
    assert scan(dataset, 1).images == 1
    image, label = dataset.load(0)
    assert image.shape == (40, 30, 3) and label.shape == (40, 30)
    assert image[:20].mean() > 225 and image[20:].mean() < 30  # the stored left half is on top


def test_a_decompression_bomb_in_a_dataset_is_one_line(tmp_path, monkeypatch):
    """An image claiming more pixels than the limit is refused from its header, by name, in the
    data check, the pre-flight and reading (limits shrunk so the test picture stays small)."""
    from PIL import Image as PILImage

    from segformer.cli import main
    from segformer.training import files

    root = write_folder(tmp_path / "data", make_samples(2, size=(64, 64)), "val")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 64×64 > 2×1000: Pillow's error
    monkeypatch.setattr(files, "MAX_PIXELS", 1000)
    image = sorted((root / "images" / "val").iterdir())[0]
    with pytest.raises(DataError, match="decompression bomb"):
        files.image_size(image)
    with pytest.raises(DataError, match="above the limit"):
        files.read_image_array(image)
    assert main(["data", "check", str(root), "--format", "folder", "--split", "val"]) == 2
