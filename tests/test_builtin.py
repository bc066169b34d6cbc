"""The built-in model ships in the package, is the default everywhere, and segments CamVid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import segformer
from segformer.builtin import DEFAULT_MODEL, builtin_path
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
    assert model.metadata["license"].startswith("Apache-2.0")
    assert model.metadata["metrics"]["whole"]["mIoU"] > 0


def test_builtin_model_is_the_default():
    segmenter = segformer.Segmenter.from_pretrained()
    assert segmenter.labels == CAMVID_CLASSES


@pytest.mark.shared
def test_builtin_model_segments_a_camvid_val_image():
    image = sorted((CAMVID / "val").glob("*.png"))[0]
    truth = np.array(Image.open(CAMVID / "valannot" / image.name))
    labels = segformer.Segmenter.from_pretrained()(image).labels
    labelled = truth != 11  # void
    assert (labels[labelled] == truth[labelled]).mean() >= 0.80
