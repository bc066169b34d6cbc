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
