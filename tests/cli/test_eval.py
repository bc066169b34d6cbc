"""``segformer eval`` on data it cannot score: one line naming the file, exit 2, no report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import segformer
from tests.segdata import make_samples, write_ade20k, write_folder


def _small_model(folder: Path, classes: int = 3) -> Path:
    from segformer.models.config import SegformerConfig
    from segformer.models.segformer import SegformerForSemanticSegmentation

    config = SegformerConfig(
        hidden_sizes=[8, 16, 40, 64],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 2, 5, 8],
        decoder_hidden_size=16,
        id2label={i: f"c{i}" for i in range(classes)},
    )
    return segformer.save(SegformerForSemanticSegmentation(config), folder)


def _eval(model: Path, data: Path, out: Path, fmt: str, *extra: str) -> list[str]:
    return [
        "eval",
        "--model",
        str(model),
        "--data",
        str(data),
        "--format",
        fmt,
        "--native",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_out_of_range_label_without_preflight_is_one_line_naming_the_mask(
    tmp_path, capsys, workers
):
    from segformer.cli import main

    root = write_folder(tmp_path / "data", make_samples(3, size=(48, 64)), "val")
    mask = root / "masks" / "val" / "001.png"
    label = np.array(Image.open(mask))
    label[0, 0] = 9
    Image.fromarray(label).save(mask)
    model = _small_model(tmp_path / "model")
    out = tmp_path / "out"
    args = _eval(model, root, out, "folder", "--no-preflight", "--num-workers", workers)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"error: {mask}: label 9, but there are 3 classes (0..2, 255 = ignore)\n"
    assert not out.exists()
    # with the pre-flight scan, the same problem (under its kind) before any inference
    assert main(_eval(model, root, out, "folder", "--num-workers", workers)) == 2
    assert capsys.readouterr().err == err.replace(
        "error: ", "error: labels outside the label set: "
    )


def test_the_stored_value_is_named_when_the_format_maps_it(tmp_path, capsys):
    from segformer.cli import main

    # ADE20K stores class k as k + 1 (0 = other, ignored): a stored 9 is label 8
    root = write_ade20k(tmp_path / "ade", make_samples(2, size=(48, 64)), "val")
    mask = root / "annotations" / "validation" / "ADE_validation_00000000.png"
    label = np.array(Image.open(mask))
    label[5, 5] = 9
    Image.fromarray(label).save(mask)
    model = _small_model(tmp_path / "model")
    labels = tmp_path / "labels.json"
    labels.write_text('["c0", "c1", "c2"]')
    args = _eval(model, root, tmp_path / "out", "ade20k", "--no-preflight", "--labels", str(labels))
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"error: {mask}: stored value 9 → label 8, but there are 3 classes (0..2, 255 = ignore)\n"
    )


def _rename(root: Path, split: str, old: str, new: str) -> None:
    for folder in (split, f"{split}annot"):
        (root / folder / f"{old}.png").rename(root / folder / f"{new}.png")


def test_joined_splits_and_file_name_filters_evaluate_exactly_the_chosen_images(tmp_path):
    import json

    from segformer.cli import main
    from tests.segdata import write_camvid

    s0, s1, s2, s3 = make_samples(4, size=(64, 64))
    # two recordings told apart by the file-name prefix, each in train and in val
    everything = tmp_path / "all"
    write_camvid(everything, [s0, s1], "train")
    write_camvid(everything, [s2, s3], "val")
    _rename(everything, "train", "frame_001", "drive2_000")
    _rename(everything, "val", "frame_001", "drive2_001")
    # the references: val splits holding exactly the images the filters should choose
    drive2 = write_camvid(tmp_path / "drive2", [s1, s3], "val")
    first = write_camvid(tmp_path / "first", [s1], "val")
    model = _small_model(tmp_path / "model", classes=11)

    def evaluate(data: Path, out: str, *extra: str) -> dict:
        assert main(_eval(model, data, tmp_path / out, "camvid", *extra)) == 0
        return json.loads((tmp_path / out / "metrics.json").read_text())

    held_out = evaluate(everything, "a", "--split", "train+val", "--include", "drive2_*")
    assert (held_out["split"], held_out["include"], held_out["images"]) == (
        "train+val",
        ["drive2_*"],
        2,
    )
    assert held_out["mIoU"] == evaluate(drive2, "b")["mIoU"]
    narrowed = evaluate(
        everything, "c", "--split", "train+val", "--include", "drive2_*", "--exclude", "*_001.png"
    )
    assert narrowed["images"] == 1
    assert narrowed["mIoU"] == evaluate(first, "d")["mIoU"]
