"""Inference modes: window placement and averaging checked by hand, slide against whole,
flip and multi-scale test-time augmentation, and the MACs count against the paper's table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segformer.errors import SegformerError
from segformer.inference.modes import (
    InferenceMode,
    predict_labels,
    predict_labels_each,
    predict_logits,
    sliding_windows,
)
from segformer.models.config import SegformerConfig
from segformer.models.macs import count_macs
from segformer.models.segformer import SegformerForSemanticSegmentation


def test_windows_are_placed_as_mmsegmentation_places_them():
    # 10×7 image, 4×4 crop, stride 3: rows = (10-4+3-1)//3+1 = 3, cols = (7-4+3-1)//3+1 = 2;
    # the last row/column is shifted back inside the image, never padded.
    windows = sliding_windows(10, 7, (4, 4), (3, 3))
    assert windows == [
        (0, 0, 4, 4),
        (0, 3, 4, 7),
        (3, 0, 7, 4),
        (3, 3, 7, 7),
        (6, 0, 10, 4),
        (6, 3, 10, 7),
    ]


def test_a_crop_larger_than_the_image_is_one_window_of_the_image():
    assert sliding_windows(5, 9, (16, 16), (8, 8)) == [(0, 0, 5, 9)]
    # larger in one direction only: windows span the whole short side
    assert sliding_windows(5, 20, (16, 16), (12, 12)) == [(0, 0, 5, 16), (0, 4, 5, 20)]


class WindowMean:
    """An engine whose logits are constant over each input: the mean of its channel 0."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        b, _, h, w = x.shape
        mean = x[:, 0].mean(dim=(1, 2)).view(b, 1, 1, 1)
        return mean.expand(b, 2, -(-h // 4), -(-w // 4)).clone()


def test_slide_averages_overlapping_windows_by_hand():
    # 6×10 image whose channel 0 is the column index; 6×6 windows every 4 columns:
    # window A covers columns 0-5 (mean 2.5), window B columns 4-9 (mean 6.5).
    x = torch.arange(10.0).expand(1, 3, 6, 10).clone()
    mode = InferenceMode(mode="slide", crop_size=6, stride=4)
    engine = WindowMean()
    logits = predict_logits(engine, x, mode)
    expected = torch.tensor([2.5] * 4 + [4.5] * 2 + [6.5] * 4)
    assert logits.shape == (1, 2, 6, 10)
    torch.testing.assert_close(logits[0, 0], expected.expand(6, 10))
    assert engine.calls == [(2, 3, 6, 6)]  # both windows in one engine call


def test_windows_are_batched_across_images_and_window_batch():
    x = torch.zeros(3, 3, 20, 20)
    engine = WindowMean()
    predict_logits(engine, x, InferenceMode(mode="slide", crop_size=8, stride=6, window_batch=5))
    # 3 rows × 3 columns per image, 27 windows, at most 5 per call
    assert [c[0] for c in engine.calls] == [5, 5, 5, 5, 5, 2]


def test_slide_with_one_window_equals_whole(tiny_model):
    x = torch.randn(2, 3, 45, 61)
    whole = predict_logits(tiny_model, x, InferenceMode())
    slide = predict_logits(tiny_model, x, InferenceMode(mode="slide", crop_size=64, stride=48))
    torch.testing.assert_close(slide, whole, rtol=0, atol=0)
    assert torch.equal(
        predict_labels(tiny_model, x, InferenceMode(mode="slide", crop_size=(45, 61))),
        predict_labels(tiny_model, x, InferenceMode()),
    )


def test_slide_with_several_windows_stays_close_to_whole(tiny_model):
    x = torch.randn(1, 3, 64, 96)
    slide = predict_labels(tiny_model, x, InferenceMode(mode="slide", crop_size=48, stride=32))
    assert slide.shape == (1, 64, 96)
    assert slide.dtype == torch.int64


def mirrored_input(height: int = 48, half_width: int = 40) -> torch.Tensor:
    half = torch.randn(1, 3, height, half_width)
    return torch.cat([half, half.flip(-1)], dim=-1)


def test_flip_averaging_makes_a_mirrored_input_symmetric(tiny_model):
    x = mirrored_input()
    plain = predict_labels(tiny_model, x, InferenceMode())
    flipped = predict_labels(tiny_model, x, InferenceMode(flip=True))
    assert torch.equal(flipped, flipped.flip(-1))
    # the model alone is not mirror-symmetric, so the flip is what made the map symmetric
    assert not torch.equal(plain, plain.flip(-1))
    slide = predict_labels(
        tiny_model, x, InferenceMode(mode="slide", crop_size=32, stride=24, flip=True)
    )
    assert torch.equal(slide, slide.flip(-1))


def test_flip_average_by_hand(tiny_model):
    x = torch.randn(1, 3, 40, 52)
    size = (40, 52)
    with torch.no_grad():
        direct = F.interpolate(tiny_model(x), size=size, mode="bilinear", align_corners=False)
        mirrored = F.interpolate(
            tiny_model(x.flip(-1)), size=size, mode="bilinear", align_corners=False
        ).flip(-1)
    expected_logits = (direct + mirrored) / 2
    expected_probs = (direct.softmax(1) + mirrored.softmax(1)) / 2
    torch.testing.assert_close(
        predict_logits(tiny_model, x, InferenceMode(flip=True)), expected_logits
    )
    torch.testing.assert_close(
        predict_logits(tiny_model, x, InferenceMode(flip=True, average="softmax")), expected_probs
    )


def test_multi_scale_shapes_and_consistency(tiny_model):
    x = torch.randn(2, 3, 64, 75)
    mode = InferenceMode(scales=(0.5, 0.75, 1.0, 1.75), flip=True)
    logits = predict_logits(tiny_model, x, mode, out_size=(60, 80))
    assert logits.shape == (2, 3, 60, 80)
    labels = predict_labels(tiny_model, x, mode, out_size=(60, 80))
    assert labels.shape == (2, 60, 80)
    assert torch.equal(labels, logits.argmax(1))
    probs = predict_logits(tiny_model, x, InferenceMode(scales=(0.5, 1.5), average="softmax"))
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 64, 75))


def test_multi_scale_runs_the_model_at_each_scale():
    engine = WindowMean()
    predict_logits(engine, torch.zeros(1, 3, 40, 60), InferenceMode(scales=(0.5, 1.0, 1.25)))
    assert [c[2:] for c in engine.calls] == [(20, 30), (40, 60), (50, 75)]


def test_per_image_output_sizes(tiny_model):
    x = torch.randn(2, 3, 32, 32)
    plain = predict_labels_each(tiny_model, x, InferenceMode(), [(30, 40), (17, 23)])
    assert [tuple(m.shape) for m in plain] == [(30, 40), (17, 23)]
    alone = predict_labels(tiny_model, x[1:], InferenceMode(), out_size=(17, 23))[0]
    assert torch.equal(plain[1], alone)
    augmented = predict_labels_each(tiny_model, x, InferenceMode(flip=True), [(30, 40), (17, 23)])
    assert [tuple(m.shape) for m in augmented] == [(30, 40), (17, 23)]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mode": "tiles"}, "inference mode"),
        ({"mode": "slide", "crop_size": 32, "stride": 48}, "stride"),
        ({"scales": (0.5, -1.0)}, "scales"),
        ({"average": "median"}, "average"),
        ({"crop_size": (32, 32, 3)}, "crop_size"),
    ],
)
def test_bad_modes_are_refused(options, message):
    with pytest.raises(SegformerError, match=message):
        InferenceMode(**options)


def test_slide_needs_a_crop(tiny_model):
    with pytest.raises(SegformerError, match="crop_size"):
        predict_logits(tiny_model, torch.zeros(1, 3, 8, 8), InferenceMode(mode="slide"))


def test_mode_defaults_and_description():
    mode = InferenceMode(mode="slide").with_defaults(512)
    assert mode.window == ((512, 512), (341, 341))
    assert InferenceMode(
        mode="slide", crop_size=1024, stride=768, scales=(0.5, 1.0), flip=True
    ).describe() == ("slide 1024×1024 / 768×768, scales 0.5, 1, flip")
    assert InferenceMode().to_dict()["scales"] == [1.0]


@pytest.mark.parametrize("variant, gflops", [("b0", 8.4), ("b1", 15.9), ("b2", 62.4)])
def test_macs_match_the_papers_table(variant, gflops):
    # Xie et al. 2021, table 1 (ADE20K, 150 classes, 512×512): what they call GFLOPs are MACs.
    config = SegformerConfig.from_variant(variant, 150)
    assert count_macs(config, (512, 512)) / 1e9 == pytest.approx(gflops, rel=0.005)


def macs_by_hand(config: SegformerConfig, height: int, width: int) -> int:
    """The architecture's multiply-accumulates, layer by layer (convs, linears, attention)."""
    total, channels, h, w = 0, config.num_channels, height, width
    sizes = []
    for i, c in enumerate(config.hidden_sizes):
        kernel, stride = config.patch_sizes[i], config.strides[i]
        h, w = (
            (h + 2 * (kernel // 2) - kernel) // stride + 1,
            (w + 2 * (kernel // 2) - kernel) // stride + 1,
        )
        n = h * w
        total += n * c * channels * kernel * kernel  # overlapping patch embedding
        r = config.sr_ratios[i]
        m = (h // r) * (w // r) if r > 1 else n
        hidden = c * config.mlp_ratios[i]
        per_block = n * c * c  # query
        per_block += m * c * c * r * r if r > 1 else 0  # sequence-reduction conv
        per_block += m * c * 2 * c  # keys and values
        per_block += 2 * n * m * c  # QKᵀ and AV over all heads
        per_block += n * c * c  # output projection
        per_block += n * c * hidden + n * hidden * 9 + n * hidden * c  # Mix-FFN
        total += config.depths[i] * per_block
        sizes.append(n)
        channels = c
    d = config.decoder_hidden_size
    total += sum(n * c * d for n, c in zip(sizes, config.hidden_sizes, strict=True))  # projections
    total += sizes[0] * (4 * d) * d + sizes[0] * d * config.num_labels  # fuse conv, classifier
    return total


@pytest.mark.parametrize("size", [(64, 64), (50, 70)])
def test_macs_equal_the_count_by_hand(tiny_config, size):
    model = SegformerForSemanticSegmentation(tiny_config)
    assert count_macs(model, size) == macs_by_hand(tiny_config, *size)
