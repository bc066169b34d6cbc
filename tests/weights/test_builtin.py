"""The built-in model ships in the package, is the default everywhere, and segments CamVid."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import segformer
from segformer.cli import main
from segformer.weights.builtin import DEFAULT_MODEL, builtin_path
from tests.conftest import CAMVID

CAMVID_CLASSES = [
    "sky", "building", "pole", "road", "pavement", "tree",
    "sign/symbol", "fence", "car", "pedestrian", "bicyclist",
]  # fmt: skip


def test_builtin_weights_ship_and_load():
    folder = builtin_path(DEFAULT_MODEL)
    assert folder is not None, "the built-in model's weights are missing from the package"
    assert (folder / "model.safetensors").stat().st_size <= 16 * 2**20
    model = segformer.load(DEFAULT_MODEL)
    assert model.config.variant == "b0"
    assert model.labels == CAMVID_CLASSES
    assert model.metadata.license.startswith("Apache-2.0")
    assert model.metadata.metrics["whole"]["mIoU"] > 0


def test_builtin_model_is_the_default(capsys):
    segmenter = segformer.Segmenter.from_pretrained()
    assert segmenter.labels == CAMVID_CLASSES
    assert main(["info"]) == 0  # describes the built-in model, scores included
    text = capsys.readouterr().out
    whole = segformer.load(DEFAULT_MODEL).metadata.metrics["whole"]
    assert text.startswith("model       camvid-b0")
    assert f"whole: mIoU {whole['mIoU']:.2f}  mAcc {whole['mAcc']:.2f}" in text


def test_builtin_input_size_is_read_the_same_by_transformers():
    """The built-in model reads a photo at a short side of 480 pixels (chosen on an unseen
    recording, see its card); transformers' processor, loading the same folder, makes the
    same pixel values."""
    from transformers import SegformerImageProcessorPil

    from segformer.inference.processing import ImageProcessor

    photo = (np.random.default_rng(0).random((360, 480, 3)) * 255).astype(np.uint8)
    ours = ImageProcessor.from_model(segformer.load(DEFAULT_MODEL))(photo)["pixel_values"]
    theirs = SegformerImageProcessorPil.from_pretrained(builtin_path(DEFAULT_MODEL))(
        images=Image.fromarray(photo), return_tensors="pt"
    )["pixel_values"]
    assert tuple(ours.shape) == tuple(theirs.shape) == (1, 3, 480, 640)
    assert float((ours - theirs).abs().max()) < 1e-4


@pytest.mark.shared
def test_builtin_model_segments_a_camvid_val_image():
    image = sorted((CAMVID / "val").glob("*.png"))[0]
    truth = np.array(Image.open(CAMVID / "valannot" / image.name))
    labels = segformer.Segmenter.from_pretrained()(image).labels
    labelled = truth != 11  # void
    assert (labels[labelled] == truth[labelled]).mean() >= 0.80


@pytest.mark.shared
def test_model_card_numbers_reproduce_with_segformer_eval(tmp_path):
    """The card's command, run as a user would, gives the card's whole-image numbers."""
    folder = builtin_path(DEFAULT_MODEL)
    card = (folder / "README.md").read_text(encoding="utf-8")
    command = "segformer eval --data ../shared/data/camvid --format camvid --split val"
    assert command in card
    arguments = command.replace("../shared/data/camvid", str(CAMVID)).split()[1:]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "segformer.cli",
            *arguments,
            "--out",
            str(tmp_path),
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    measured = json.loads((tmp_path / "metrics.json").read_text())
    shipped = segformer.load(DEFAULT_MODEL).metadata.metrics
    whole = shipped["whole"]
    assert f"| whole | {whole['mIoU']:.2f} | {whole['mAcc']:.2f} | {whole['aAcc']:.2f} |" in card
    for score in ("mIoU", "mAcc", "aAcc"):
        assert measured[score] == pytest.approx(whole[score], abs=0.006)
    for name, iou in shipped["per_class_IoU"].items():
        assert measured["per_class"][name]["IoU"] == pytest.approx(iou, abs=0.006)
