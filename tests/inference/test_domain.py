"""The out-of-domain warning: scores against hand-computed values, the threshold read from the
model's metadata, and the built-in road-scene model on real photos — CamVid val frames are not
flagged, a cat and an astronaut are."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from segformer.errors import CheckpointError
from segformer.inference.domain import DomainCheck, image_scores
from segformer.inference.modes import InferenceMode, predict_labels_each, predict_labels_scored
from segformer.inference.segmenter import Segmenter
from segformer.models.metadata import ModelMetadata
from segformer.weights.builtin import builtin_path
from tests.conftest import CAMVID

# Two CamVid val frames (../shared), from two of its sequences.
CAMVID_VAL = ["0016E5_07959.png", "0016E5_08157.png"]


def two_pixel_logits() -> torch.Tensor:
    """(1, 2, 1, 2): one pixel with logits (0, 0), one with (ln 3, 0)."""
    return torch.tensor([[[[0.0, math.log(3)]], [[0.0, 0.0]]]])


def test_scores_equal_hand_computed_values():
    logits = two_pixel_logits()
    # pixel 1: softmax (½, ½), logsumexp ln 2; pixel 2: softmax (¾, ¼), logsumexp ln 4
    assert float(image_scores(logits, "energy")) == pytest.approx(-(math.log(2) + math.log(4)) / 2)
    assert float(image_scores(logits, "max_softmax")) == pytest.approx((0.5 + 0.25) / 2)
    entropy_2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(image_scores(logits, "entropy")) == pytest.approx((math.log(2) + entropy_2) / 2)
    # bf16 logits are scored in float32
    assert image_scores(logits.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"score": "vibes", "threshold": 1.0}, "out_of_domain score 'vibes' is not one of"),
        ({"threshold": 1.0}, "out_of_domain score None"),
        ({"score": "energy"}, "threshold must be a finite number, got None"),
        ({"score": "energy", "threshold": "high"}, "threshold must be a finite number"),
        ({"score": "energy", "threshold": float("nan")}, "threshold must be a finite number"),
        ([1, 2], '"out_of_domain" must be a JSON object'),
    ],
)
def test_malformed_settings_are_refused(settings, message):
    with pytest.raises(CheckpointError, match=message):
        DomainCheck.from_metadata(ModelMetadata(out_of_domain=settings))


def test_models_without_a_threshold_flag_nothing(tiny_model):
    assert DomainCheck.from_metadata(ModelMetadata()) is None
    result = Segmenter(tiny_model)(np.zeros((32, 32, 3), np.uint8))
    assert result.out_of_domain is None and result.domain_score is None
    record = result.to_dict()
    assert record["out_of_domain"] is None and record["domain_score"] is None
    assert "domain" in record


def test_scores_come_from_the_logits_the_labels_come_from(tiny_model):
    check = DomainCheck("energy", 0.0)
    pixels = torch.randn(2, 3, 64, 64)
    sizes = [(64, 64), (50, 70)]
    labels, scores = predict_labels_scored(tiny_model, pixels, InferenceMode(), sizes, check.scores)
    with torch.no_grad():
        expected = image_scores(tiny_model(pixels))
    assert scores == pytest.approx(expected.tolist())
    for ours, theirs in zip(
        labels, predict_labels_each(tiny_model, pixels, InferenceMode(), sizes), strict=True
    ):
        assert torch.equal(ours, theirs)
    # averaged probabilities are not logits: no score rather than a wrong one
    softmax = InferenceMode(flip=True, average="softmax")
    assert predict_labels_scored(tiny_model, pixels, softmax, sizes, check.scores)[1] is None
    logits_average = InferenceMode(flip=True)
    assert (
        len(predict_labels_scored(tiny_model, pixels, logits_average, sizes, check.scores)[1]) == 2
    )


# -- the built-in road-scene model --------------------------------------------------------
@pytest.fixture(scope="module")
def builtin() -> Segmenter:
    if builtin_path("camvid-b0") is None:
        pytest.skip("the built-in model is not installed")
    return Segmenter.from_pretrained(device="cpu")


def test_builtin_model_states_its_domain_and_threshold(builtin):
    config = json.loads((builtin_path("camvid-b0") / "config.json").read_text())["segformer"]
    assert "road scenes" in builtin.domain
    assert builtin.domain_check == DomainCheck(
        "energy", config["out_of_domain"]["threshold"], builtin.domain
    )
    info = builtin.info()
    assert info["domain"] == builtin.domain
    assert info["out_of_domain"]["score"] == "energy"


def synthetic_non_road() -> dict[str, np.ndarray]:
    """Pictures that are clearly not road scenes, for machines without scikit-image."""
    y, x = np.mgrid[0:240, 0:320]
    gradient = np.stack([x * 255 // 320, y * 255 // 240, np.full_like(x, 128)], -1)
    disks = np.where(
        (((x % 80 - 40) ** 2 + (y % 80 - 40) ** 2) < 900)[..., None],
        np.array([250, 200, 20]),
        np.array([20, 40, 160]),
    )
    return {"gradient": gradient.astype(np.uint8), "disks": disks.astype(np.uint8)}


def test_builtin_model_flags_synthetic_pictures(builtin):
    for name, picture in synthetic_non_road().items():
        result = builtin(picture)
        assert result.out_of_domain is True, name
        assert result.domain_score > builtin.domain_check.threshold
        record = result.to_dict()
        assert record["out_of_domain"] is True
        assert record["domain_score"] == pytest.approx(result.domain_score, abs=1e-4)


@pytest.mark.shared
@pytest.mark.parametrize("name", CAMVID_VAL)
def test_builtin_model_does_not_flag_camvid_val(builtin, name):
    path = CAMVID / "val" / name
    result = builtin(path)
    assert result.out_of_domain is False
    assert result.domain_score < builtin.domain_check.threshold
    # sliding windows score the same picture alike (the threshold is for whole-image mode)
    slide = Segmenter(builtin.model, mode="slide", crop_size=(256, 256), engine=builtin.engine)
    assert slide(path).out_of_domain is False


@pytest.mark.parametrize("name", ["chelsea", "astronaut"])
def test_builtin_model_flags_skimage_photos(builtin, name):
    data = pytest.importorskip("skimage.data", reason="needs scikit-image's bundled photos")
    photo = Image.fromarray(getattr(data, name)())
    result = builtin(photo)
    assert result.out_of_domain is True
    assert result.domain_score > builtin.domain_check.threshold
