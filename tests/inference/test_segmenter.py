"""Segmenter and its results: labels equal transformers' processor + model + post-processing
on the same weights; slide equals whole with one window; result files and their content."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import segformer
from segformer.errors import CheckpointError, ImageError
from segformer.inference.processing import ImageProcessor
from segformer.inference.segmenter import SegmentationResult, Segmenter, atomic_path, write_atomic
from segformer.models.config import SegformerConfig
from segformer.models.segformer import SegformerForSemanticSegmentation
from segformer.weights.checkpoints import save
from tests.conftest import CITYSCAPES_B0, CITYSCAPES_SAMPLE


def scene(height: int, width: int, seed: int = 0) -> Image.Image:
    """A picture with smooth gradients and a few solid shapes (regions a model can separate)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * y) % 256], -1
    )
    for _ in range(4):
        top, left = rng.integers(0, height - 4), rng.integers(0, width - 4)
        pixels[top : top + height // 3, left : left + width // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture
def tiny_segmenter(tiny_model):
    tiny_model.metadata.preprocessing = ImageProcessor(size=(64, 64)).to_dict()
    return Segmenter(tiny_model, device="cpu", name="tiny")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A small random SegFormer saved by transformers itself, with its processor."""
    from transformers import SegformerConfig as HFConfig
    from transformers import SegformerForSemanticSegmentation as HFModel
    from transformers import SegformerImageProcessorPil

    torch.manual_seed(1)
    config = HFConfig(
        hidden_sizes=[16, 32, 40, 64],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 2, 5, 8],
        decoder_hidden_size=32,
        num_labels=5,
        id2label={i: f"thing{i}" for i in range(5)},
        label2id={f"thing{i}": i for i in range(5)},
    )
    model = HFModel(config).eval()
    with torch.no_grad():  # a trained-looking batch norm and a decisive classifier
        bn = model.decode_head.batch_norm
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        model.decode_head.classifier.weight.mul_(50)
    folder = tmp_path_factory.mktemp("hf-tiny")
    model.save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 96, "width": 128}).save_pretrained(folder)
    return folder


def test_whole_mode_equals_transformers(hf_folder):
    from transformers import SegformerForSemanticSegmentation as HFModel
    from transformers import SegformerImageProcessorPil

    images = [scene(150, 211, seed=0), scene(97, 64, seed=1), scene(300, 220, seed=2)]
    hf_processor = SegformerImageProcessorPil.from_pretrained(hf_folder)
    hf_model = HFModel.from_pretrained(hf_folder).eval()
    inputs = hf_processor(images, return_tensors="pt")
    with torch.no_grad():
        outputs = hf_model(**inputs)
    expected = hf_processor.post_process_semantic_segmentation(
        outputs, target_sizes=[im.size[::-1] for im in images]
    )

    # The exact engine gives the same labels, pixel for pixel.
    segmenter = Segmenter.from_pretrained(hf_folder, device="cpu", backend="eager", batch_size=2)
    results = segmenter(images)
    for result, reference in zip(results, expected, strict=True):
        assert result.labels.shape == tuple(reference.shape)
        assert len(np.unique(result.labels)) > 1  # a real map, not one class everywhere
        np.testing.assert_array_equal(result.labels, reference.numpy())
    assert segmenter.labels == [f"thing{i}" for i in range(5)]
    # The default engine re-associates the decoder (logits within 1e-5): a pixel whose two best
    # classes tie to that precision may differ.
    default = Segmenter.from_pretrained(hf_folder, device="cpu")(images)
    for result, reference in zip(default, expected, strict=True):
        assert (result.labels == reference.numpy()).mean() > 0.9999


def test_slide_with_a_window_as_large_as_the_image_equals_whole(tiny_model):
    image = scene(70, 90)
    whole = Segmenter(tiny_model, device="cpu")
    no_resize = Segmenter(tiny_model, whole.processor.replace(do_resize=False), device="cpu")
    slide = Segmenter(tiny_model, device="cpu", mode="slide", crop_size=128)
    assert not slide.processor.do_resize  # slide keeps full resolution
    np.testing.assert_array_equal(slide(image).labels, no_resize(image).labels)


def test_batches_give_the_same_labels_as_single_images(tiny_segmenter):
    images = [scene(40 + 7 * i, 50 + 3 * i, seed=i) for i in range(5)]
    batched = tiny_segmenter(images, batch_size=3)
    for image, result in zip(images, batched, strict=True):
        np.testing.assert_array_equal(result.labels, tiny_segmenter(image).labels)


def test_inputs_of_every_kind(tiny_segmenter, tmp_path):
    image = scene(48, 64)
    path = tmp_path / "photo.png"
    image.save(path)
    by_path = tiny_segmenter(path)
    assert isinstance(by_path, SegmentationResult)
    assert by_path.source == str(path)
    for other in (str(path), path.read_bytes(), image, np.asarray(image)):
        np.testing.assert_array_equal(tiny_segmenter(other).labels, by_path.labels)
    assert len(tiny_segmenter([path, image])) == 2


def test_result_contents(tiny_segmenter):
    result = tiny_segmenter(scene(45, 67))
    assert result.labels.shape == (45, 67) and result.labels.dtype == np.uint8
    assert result.size == (67, 45) and result.image.size == (67, 45)
    counts = np.bincount(result.labels.ravel(), minlength=3)
    assert [c.pixels for c in result.classes] == sorted(counts[counts > 0].tolist(), reverse=True)
    for c in result.classes:
        assert c.pixels == counts[c.id]
        assert c.share == pytest.approx(counts[c.id] / result.labels.size)
        assert c.name == ["background", "thing", "stuff"][c.id]
        assert c.color == tuple(tiny_segmenter.palette[c.id])
    assert sum(c.share for c in result.classes) == pytest.approx(1.0)
    timings = result.timings
    assert (
        min(timings.decode_ms, timings.preprocess_ms, timings.model_ms, timings.postprocess_ms) >= 0
    )
    assert timings.total_ms == pytest.approx(
        timings.decode_ms + timings.preprocess_ms + timings.model_ms + timings.postprocess_ms
    )
    data = json.loads(json.dumps(result.to_dict()))
    assert data["width"] == 67 and data["height"] == 45 and data["model"] == "tiny"
    assert {c["name"] for c in data["classes"]} == {c.name for c in result.classes}


def test_label_png_is_palette_indexed_with_the_labels(tiny_segmenter):
    result = tiny_segmenter(scene(33, 47))
    png = Image.open(io.BytesIO(result.label_png()))
    assert png.mode == "P"
    np.testing.assert_array_equal(np.asarray(png), result.labels)
    palette = np.asarray(png.getpalette()[: 3 * 3]).reshape(3, 3)
    np.testing.assert_array_equal(palette, tiny_segmenter.palette)


def test_more_than_256_classes_give_a_16_bit_png(tiny_config):
    config = SegformerConfig(
        **{**tiny_config.__dict__, "id2label": {i: f"c{i}" for i in range(300)}}
    )
    model = SegformerForSemanticSegmentation(config).eval()
    with torch.no_grad():
        model.decode_head.classifier.bias.copy_(torch.arange(300.0) * 0.0)
        model.decode_head.classifier.bias[280] = 100.0  # every pixel becomes class 280
    result = Segmenter(model, device="cpu")(scene(40, 40))
    assert result.labels.dtype == np.uint16
    assert (result.labels == 280).all()
    png = Image.open(io.BytesIO(result.label_png()))
    assert png.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(png), result.labels)


def test_save_writes_three_files(tiny_segmenter, tmp_path):
    result = tiny_segmenter(scene(30, 50))
    paths = result.save(tmp_path / "out", "sub/photo", opacity=0.4)
    assert {p.name for p in paths.values()} == {"photo.png", "photo_overlay.png", "photo.json"}
    assert all(p.parent == tmp_path / "out" / "sub" for p in paths.values())
    np.testing.assert_array_equal(np.asarray(Image.open(paths["labels"])), result.labels)
    overlay = Image.open(paths["overlay"])
    assert overlay.height >= 30 and overlay.width > 50  # legend panel on the right
    record = json.loads(paths["json"].read_text())
    assert record["files"] == {"labels": "photo.png", "overlay": "photo_overlay.png"}
    assert record["classes"][0]["pixels"] == result.classes[0].pixels
    assert sorted(p.name for p in (tmp_path / "out" / "sub").iterdir()) == sorted(
        p.name for p in paths.values()
    )
    only_labels = result.save(tmp_path / "out2", "x", overlay=False)
    assert set(only_labels) == {"labels", "json"}


def test_interrupted_writes_leave_nothing(tmp_path):
    target = tmp_path / "result.png"
    target.write_bytes(b"old")

    def interrupted(file):
        file.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, interrupted)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.png"]
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "video.mp4") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("encoder failed")
    assert [p.name for p in tmp_path.iterdir()] == ["result.png"]


def test_bad_images(tiny_segmenter, tmp_path):
    good = tmp_path / "good.png"
    scene(40, 40).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageError, match=r"corrupt\.png"):
        tiny_segmenter([good, corrupt])
    results = list(
        tiny_segmenter.imap([corrupt, good, tmp_path / "missing.jpg", good], errors="return")
    )
    assert [type(r).__name__ for r in results] == [
        "ImageError",
        "SegmentationResult",
        "ImageError",
        "SegmentationResult",
    ]
    assert "missing.jpg" in str(results[2])


def test_pixel_limit(tiny_model, tmp_path):
    path = tmp_path / "big.png"
    scene(60, 80).save(path)
    limited = Segmenter(tiny_model, device="cpu", max_pixels=60 * 80 - 1)
    with pytest.raises(ImageError, match=r"big\.png.*limit"):
        limited(path)
    assert Segmenter(tiny_model, device="cpu", max_pixels=60 * 80)(path).labels.shape == (60, 80)


def test_too_small_for_slide_is_a_clear_error(tiny_model):
    with pytest.raises(ImageError, match="too small"):
        Segmenter(tiny_model, device="cpu", mode="slide", crop_size=64)(scene(20, 20))


def test_from_pretrained_without_a_model_names_the_option(monkeypatch):
    import segformer.weights.checkpoints

    monkeypatch.setattr(segformer.weights.checkpoints, "builtin_path", lambda name: None)
    with pytest.raises(CheckpointError, match="--model"):
        Segmenter.from_pretrained()


def test_classification_models_are_refused(tiny_config):
    from segformer.models.segformer import SegformerForImageClassification

    with pytest.raises(CheckpointError, match="segmentation"):
        Segmenter(SegformerForImageClassification(tiny_config))


def test_from_pretrained_folder_and_info(tiny_config, tmp_path):
    config = SegformerConfig(
        **{
            **tiny_config.__dict__,
            "hidden_sizes": [8, 16, 40, 64],
            "num_attention_heads": [1, 2, 5, 8],
        }
    )
    tiny_model = SegformerForSemanticSegmentation(config).eval()
    save(tiny_model, tmp_path / "m")
    segmenter = segformer.Segmenter.from_pretrained(
        tmp_path / "m", device="cpu", mode="slide", crop_size=64, flip=True
    )
    info = json.loads(json.dumps(segmenter.info()))
    assert info["labels"] == ["background", "thing", "stuff"]
    assert info["parameters"] == sum(p.numel() for p in tiny_model.parameters())
    assert info["mode"]["mode"] == "slide" and info["mode"]["flip"] is True
    assert info["reduced_decode"] is False
    assert info["palette_source"] == "generated" and len(info["palette"]) == 3
    assert "slide" in repr(segmenter)


@pytest.mark.shared
def test_cityscapes_b0_on_the_stuttgart_photo_in_slide_mode():
    segmenter = Segmenter.from_pretrained(
        CITYSCAPES_B0, device="cpu", mode="slide", crop_size=1024, stride=768
    )
    result = segmenter(CITYSCAPES_SAMPLE / "stuttgart_demo_1024x512.png")
    assert result.labels.shape == (512, 1024)
    present = {c.name for c in result.classes}
    assert {"road", "car", "building", "sky"} <= present
    shares = {c.name: c.share for c in result.classes}
    assert shares["road"] > 0.25 and shares["building"] > 0.15  # the street and its façades
    assert tuple(segmenter.palette[0]) == (128, 64, 128)  # Cityscapes colours, found by label names


@pytest.mark.shared
def test_reduced_decode_agrees_with_a_full_decode_on_a_large_photo():
    # The Stuttgart street as a 2048×1024 JPEG; the built-in model reads it at 960×480, so it
    # is decoded at 1/2. The reference is the same segmenter decoding every pixel; its
    # full-size labels, sampled at the reduced grid, agree on nearly every pixel.
    buffer = io.BytesIO()
    street = Image.open(CITYSCAPES_SAMPLE / "stuttgart_demo_1024x512.png").convert("RGB")
    street.resize((2048, 1024), Image.Resampling.LANCZOS).save(buffer, "JPEG", quality=92)
    full = Segmenter.from_pretrained(device="cpu")
    reduced = Segmenter(full.model, engine=full.engine, name="reduced", reduced_decode=True)
    whole = full(buffer.getvalue())
    small = reduced(buffer.getvalue())
    assert whole.labels.shape == (1024, 2048)
    assert small.labels.shape == (512, 1024)
    sampled = whole.labels[1::2, 1::2]  # the full-size pixel nearest each reduced pixel's centre
    assert (sampled == small.labels).mean() > 0.98
