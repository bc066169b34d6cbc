"""The training transforms: image and label stay aligned through every geometric step (checked
with images whose pixel values encode their own coordinates), padding is ignored, the crop
respects cat_max_ratio, and colour conversions agree with the standard library's colorsys."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from segformer.training.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TrainTransform,
    hsv_to_rgb,
    normalize,
    pad,
    photometric_distortion,
    random_crop,
    random_hflip,
    random_resize,
    rgb_to_hsv,
)


def coordinate_image(height: int = 120, width: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Red = x, green = y, blue = 77; the label is the 4-pixel column band, x // 4."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x, y, np.full_like(x, 77)], axis=-1).astype(np.uint8)
    return image, (x // 4).astype(np.uint8)


def unnormalise(pixels) -> np.ndarray:
    x = pixels.numpy().transpose(1, 2, 0)
    return x * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)


@pytest.mark.parametrize("seed", range(8))
def test_geometry_keeps_image_and_label_aligned(seed):
    image, label = coordinate_image()
    transform = TrainTransform(
        crop_size=(64, 96),
        scale=(200, 120),
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        photometric=False,
        flip_prob=0.5,
    )
    pixels, labels = transform(image, label, np.random.default_rng(seed))
    assert pixels.shape == (3, 64, 96) and labels.shape == (64, 96)
    rgb = unnormalise(pixels)
    inside = labels.numpy() != 255
    source_x = rgb[..., 0][inside]  # interpolated x of the source pixel each output pixel shows
    band = labels.numpy()[inside]
    # nearest-neighbour label band vs bilinear position: within about one source pixel
    assert np.all(np.abs(source_x / 4 - (band + 0.375)) <= 0.75)
    assert np.allclose(rgb[..., 2][inside], 77, atol=1e-3)


def test_crop_and_flip_move_labels_exactly_with_pixels():
    image, _ = coordinate_image(60, 100)
    label = ((image[..., 0].astype(int) * 7 + image[..., 1]) % 250).astype(np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(5):
        cropped, cropped_label = random_crop(image, label, rng, (30, 40), cat_max_ratio=1.0)
        flipped, flipped_label = random_hflip(cropped, cropped_label, rng, prob=0.5)
        assert np.array_equal(
            flipped_label, (flipped[..., 0].astype(int) * 7 + flipped[..., 1]) % 250
        )
    mirrored, mirrored_label = random_hflip(image, label, rng, prob=1.0)
    assert np.array_equal(mirrored, image[:, ::-1]) and np.array_equal(
        mirrored_label, label[:, ::-1]
    )
    same, same_label = random_hflip(image, label, rng, prob=0.0)
    assert same is image and same_label is label


def test_resize_ratio_range_and_aspect_ratio():
    image, label = coordinate_image(120, 200)
    rng = np.random.default_rng(1)
    long_sides = []
    for _ in range(40):
        resized, resized_label = random_resize(
            image, label, rng, scale=(400, 240), ratio_range=(0.5, 2.0)
        )
        height, width = resized_label.shape
        assert resized.shape[:2] == (height, width)
        assert abs(width / height - 200 / 120) < 0.03
        long_sides.append(width)
    # base scale 400×240 fits a 200×120 image at ×2; ratios 0.5–2 give long sides 200–800
    assert 200 <= min(long_sides) < 320 and 680 < max(long_sides) <= 800
    resized, _ = random_resize(image, label, rng, scale=None, ratio_range=(1.0, 1.0))
    assert resized.shape[:2] == (120, 200)  # no base scale: the image's own size


def test_padding_uses_zero_for_pixels_and_ignore_for_labels():
    image, label = coordinate_image(30, 40)
    transform = TrainTransform(
        crop_size=(64, 64), scale=None, ratio_range=(1.0, 1.0), photometric=False, flip_prob=0.0
    )
    pixels, labels = transform(image, label, np.random.default_rng(0))
    assert pixels.shape == (3, 64, 64)
    assert (labels[30:, :] == 255).all() and (labels[:, 40:] == 255).all()
    assert (pixels[:, 30:, :] == 0).all() and (pixels[:, :, 40:] == 0).all()
    assert np.array_equal(labels[:30, :40].numpy(), label)
    padded_image, padded_label = pad(
        np.ones((3, 2, 2), np.float32), np.zeros((2, 2), np.uint8), (3, 4), ignore_index=200
    )
    assert padded_image[:, 2:, :].sum() == 0 and (padded_label[:, 2:] == 200).all()


def test_crop_avoids_windows_dominated_by_one_class():
    label = np.zeros((100, 100), np.uint8)
    label[:, 60:] = 1  # class 1 on the right 40%: about a third of 40×40 windows are mixed
    image = np.zeros((100, 100, 3), np.uint8)

    def dominated_share(cat_max_ratio: float) -> float:
        rng = np.random.default_rng(0)
        dominated = 0
        for _ in range(200):
            _, window = random_crop(image, label, rng, (40, 40), cat_max_ratio=cat_max_ratio)
            counts = np.bincount(window.ravel(), minlength=2)
            dominated += counts.max() / counts.sum() >= 0.75
        return dominated / 200

    assert dominated_share(1.0) > 0.5  # most random windows are dominated by one class
    assert dominated_share(0.75) < 0.05  # ten retries almost always find a mixed one


def test_rgb_hsv_conversions_agree_with_colorsys():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(500, 3)).astype(np.float32)
    rgb[:5] = [[0, 0, 0], [255, 255, 255], [90, 90, 90], [255, 0, 0], [0, 0, 255]]
    hsv = rgb_to_hsv(rgb)
    for pixel, ours in zip(rgb, hsv, strict=True):
        h, s, v = colorsys.rgb_to_hsv(*(pixel / 255))
        assert ours[0] == pytest.approx((h * 360) % 360, abs=1e-3) or s == 0
        assert ours[1] == pytest.approx(s, abs=1e-6) and ours[2] == pytest.approx(v * 255, abs=1e-4)
    assert np.allclose(hsv_to_rgb(hsv), rgb, atol=1e-3)


def test_photometric_distortion_changes_only_colour_and_stays_in_range():
    image, _ = coordinate_image(40, 60)
    outputs = [photometric_distortion(image, np.random.default_rng(seed)) for seed in range(20)]
    assert all(
        o.shape == image.shape and o.dtype == np.float32 and o.min() >= 0 and o.max() <= 255
        for o in outputs
    )
    assert sum(not np.allclose(o, image) for o in outputs) >= 15  # p(no change) = 1/16 per draw
    again = photometric_distortion(image, np.random.default_rng(3))
    assert np.array_equal(again, outputs[3])  # the generator alone decides
    gray = np.full((8, 8, 3), 128, np.uint8)
    for seed in range(10):  # hue and saturation cannot colour a gray image
        out = photometric_distortion(gray, np.random.default_rng(seed))
        assert np.allclose(out[..., 0], out[..., 1], atol=1e-3) and np.allclose(
            out[..., 1], out[..., 2], atol=1e-3
        )


def test_normalize_matches_imagenet_statistics_on_the_unit_scale():
    image = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
    expected = (image / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(normalize(image), expected.transpose(2, 0, 1), atol=1e-5)


def test_whole_pipeline_is_a_function_of_the_generator():
    image, label = coordinate_image()
    transform = TrainTransform(crop_size=(48, 48), scale=(200, 120))
    a = transform(image, label, np.random.default_rng(5))
    b = transform(image, label, np.random.default_rng(5))
    c = transform(image, label, np.random.default_rng(6))
    assert all(x.equal(y) for x, y in zip(a, b, strict=True))
    assert not a[0].equal(c[0])
