"""The image processor and image reading, checked against transformers'
SegformerImageProcessor (PIL backend) and hand-computed values."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SegformerImageProcessorPil

from segformer.errors import CheckpointError, ImageError, SegformerError, SettingsError
from segformer.inference.processing import ImageProcessor, read_image, read_mask
from tests.conftest import ADE20K_SAMPLE


def random_rgb(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def smooth_rgb(height: int, width: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1
    )
    return Image.fromarray(pixels.astype(np.uint8))


def reference(images, masks=None, **kwargs):
    processor = SegformerImageProcessorPil(**kwargs)
    return processor(images, segmentation_maps=masks, return_tensors="pt")


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def png_16bit_rgb(pixels: np.ndarray) -> bytes:
    """A 48-bit RGB PNG written by hand (Pillow cannot write one)."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    rows = b"".join(b"\x00" + pixels[row].astype(">u2").tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------------------------------
# pixel values and labels against transformers
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(512, 512), (480, 640), (200, 96)])
def test_pixel_values_equal_transformers(size):
    images = [
        random_rgb(333, 517, 1),
        random_rgb(7, 5, 2),
        smooth_rgb(700, 900),
        random_rgb(size[0], size[1], 3),
    ]
    expected = reference(images, size={"height": size[0], "width": size[1]})["pixel_values"]
    result = ImageProcessor(size=size)(images)
    assert result["pixel_values"].dtype == torch.float32
    assert result["pixel_values"].shape == (4, 3, *size)
    assert torch.equal(result["pixel_values"], expected)
    assert result["original_sizes"] == [(333, 517), (7, 5), (700, 900), size]


@pytest.mark.parametrize(
    "options",
    [
        {"resample": 3},
        {"resample": 0},
        {"do_normalize": False},
        {"do_rescale": False},
        {"do_resize": False},
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0], "rescale_factor": 1 / 127.5},
    ],
)
def test_options_equal_transformers(options):
    images = [random_rgb(61, 47, 4), smooth_rgb(61, 47)]
    expected = reference(images, size={"height": 40, "width": 52}, **options)[
        "pixel_values"
    ].float()
    result = ImageProcessor(size=(40, 52), **options)(images)["pixel_values"]
    assert torch.equal(result, expected)


@pytest.mark.parametrize("edges", [(300, None), (300, 400), (20, 25), (9, None)])
def test_shortest_edge_equals_transformers(edges):
    shortest, longest = edges
    size = {"shortest_edge": shortest} | ({"longest_edge": longest} if longest else {})
    for image in (random_rgb(517, 333, 5), random_rgb(9, 20, 6), random_rgb(64, 64, 7)):
        expected = reference(image, size=size)["pixel_values"]
        result = ImageProcessor(shortest_edge=shortest, longest_edge=longest)(image)["pixel_values"]
        assert result.shape == expected.shape
        assert torch.equal(result, expected)


def test_other_inputs_equal_transformers_on_pil(tmp_path):
    image = random_rgb(97, 131, 8)
    path = tmp_path / "photo.png"
    image.save(path)
    expected = reference(image, size={"height": 64, "width": 64})["pixel_values"][0]
    processor = ImageProcessor(size=(64, 64))
    pixels = np.array(image)
    for source in (
        path,
        str(path),
        path.read_bytes(),
        pixels,
        torch.from_numpy(pixels).permute(2, 0, 1),
    ):
        assert torch.equal(processor(source)["pixel_values"][0], expected)


def test_batch_array_input_and_round_trip_through_a_model(tiny_model):
    batch = np.stack([np.asarray(random_rgb(45, 70, seed)) for seed in (24, 25)])  # (B, H, W, 3)
    processor = ImageProcessor(keep_ratio=True, scale=(128, 64))
    inputs = processor(batch)
    assert inputs["pixel_values"].shape == (2, 3, 64, 128)  # 45×70 → 64×99.6 → 64×100 → 64×128
    assert inputs["original_sizes"] == [(45, 70), (45, 70)]
    with torch.no_grad():
        logits = tiny_model(inputs["pixel_values"])
    labels = processor.post_process_semantic_segmentation(logits, inputs["original_sizes"])
    assert [tuple(label.shape) for label in labels] == [(45, 70), (45, 70)]


def test_transparency_composited_on_white_as_transformers():
    rng = np.random.default_rng(9)
    rgba = Image.fromarray(rng.integers(0, 256, (45, 38, 4), dtype=np.uint8), mode="RGBA")
    palette = Image.fromarray(rng.integers(0, 8, (45, 38), dtype=np.uint8), mode="P")
    palette.putpalette(rng.integers(0, 256, 8 * 3, dtype=np.uint8).tolist())
    palette.info["transparency"] = 3
    for image in (rgba, palette, rgba.convert("LA")):
        expected = reference(image, size={"height": 30, "width": 30}, do_convert_rgb=True)[
            "pixel_values"
        ]
        assert torch.equal(ImageProcessor(size=(30, 30))(image)["pixel_values"], expected)


@pytest.mark.parametrize("reduce", [False, True])
def test_labels_equal_transformers(reduce):
    rng = np.random.default_rng(10)
    images = [random_rgb(83, 121, 11), random_rgb(40, 30, 12)]
    label_maps = [
        rng.integers(0, 6, (83, 121), dtype=np.uint8),
        rng.integers(0, 6, (40, 30), dtype=np.uint8),
    ]
    label_maps[0][:10] = 0
    label_maps[1][:5] = 255
    masks = [
        Image.fromarray(label_maps[0]),
        label_maps[1].astype(np.int64),
    ]  # L image, and an int64 array
    expected = reference(images, masks, size={"height": 64, "width": 96}, do_reduce_labels=reduce)
    result = ImageProcessor(size=(64, 96), do_reduce_labels=reduce)(images, masks)
    assert result["labels"].dtype == torch.int64
    assert torch.equal(result["labels"], expected["labels"])
    assert torch.equal(result["pixel_values"], expected["pixel_values"])


def test_reduce_labels_by_hand():
    labels = np.array([[0, 1, 2], [150, 254, 255]], dtype=np.uint8)
    expected = np.array([[255, 0, 1], [149, 253, 255]])
    np.testing.assert_array_equal(ImageProcessor().reduce_labels(labels), expected)


def test_wide_labels_resize_like_8_bit_labels():
    # labels above 255 take Pillow's 32-bit path; it must pick the same pixels as the 8-bit path
    rng = np.random.default_rng(13)
    low = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    wide = low.astype(np.int64) * 1000
    processor = ImageProcessor()
    resized = processor.resize_labels(wide, (20, 90))
    by_8_bit = np.asarray(Image.fromarray(low).resize((90, 20), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(resized, by_8_bit.astype(np.int64) * 1000)


@pytest.mark.parametrize("target_sizes", [None, [(64, 80), (31, 17), (5, 5)], [(50, 50)] * 3])
def test_post_process_equals_transformers(target_sizes):
    logits = torch.randn(3, 7, 16, 20)
    expected = SegformerImageProcessorPil().post_process_semantic_segmentation(
        SimpleNamespace(logits=logits), target_sizes=target_sizes
    )
    processor = ImageProcessor()
    for given in (logits, SimpleNamespace(logits=logits), list(logits)):
        result = processor.post_process_semantic_segmentation(given, target_sizes=target_sizes)
        assert len(result) == 3
        for ours, theirs in zip(result, expected, strict=True):
            assert torch.equal(ours, theirs)


def test_post_process_rejects_mismatched_sizes():
    with pytest.raises(SettingsError, match="2 logits but 1 target sizes"):
        ImageProcessor().post_process_semantic_segmentation(torch.randn(2, 3, 4, 4), [(8, 8)])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"size": "large"}, "size must be two whole numbers, got 'large'"),
        ({"size": (512, 512, 3)}, "size must be two numbers"),
        ({"size": (0, 512)}, "size and scale must be positive"),
        ({"image_mean": [0.5, 0.5]}, "image_mean needs one value per RGB channel"),
        ({"image_std": "wide"}, "image_std needs one number per RGB channel"),
        ({"image_std": (0.2, 0.0, 0.2)}, "image_std must not contain 0"),
        ({"resample": "bilinear"}, "resample and rescale_factor must be numbers"),
        ({"resample": 9}, "resample must be a Pillow filter code"),
        ({"shortest_edge": 0}, "shortest_edge must be a positive whole number, got 0"),
        ({"shortest_edge": "512"}, "shortest_edge must be a positive whole number"),
        ({"longest_edge": 512}, "longest_edge needs shortest_edge"),
        ({"size_divisor": -32}, "size_divisor must be a positive whole number"),
    ],
)
def test_bad_processor_settings_are_segformer_errors(options, message):
    # SegformerErrors are what the command line prints as one line; they stay ValueErrors too.
    with pytest.raises(SettingsError, match=message) as info:
        ImageProcessor(**options)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_bad_processor_inputs_are_segformer_errors():
    processor = ImageProcessor()
    with pytest.raises(ImageError, match="no images given"):
        processor([])
    with pytest.raises(ImageError, match="2 images but 1 segmentation maps"):
        processor([random_rgb(8, 8), random_rgb(8, 8)], [np.zeros((8, 8), np.uint8)])
    with pytest.raises(ImageError, match=r"expected uint8 \(H, W, 3\)"):
        processor.normalize(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ImageError, match="do not fit in 32 bits"):
        processor.resize_labels(np.array([[0, 2**40]], np.int64), (4, 4))
    for error in (ImageError, SettingsError):
        assert issubclass(error, SegformerError)


# ---------------------------------------------------------------------------------------
# keep-ratio resize (NVlabs / mmsegmentation evaluation)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("image_size", "scale", "divisor", "expected"),
    [
        ((1024, 2048), (2048, 512), 32, (512, 1024)),  # factor min(1, 0.5) = 0.5
        ((1024, 2048), (2048, 1024), 32, (1024, 2048)),  # Cityscapes at its own size
        ((480, 640), (2048, 512), 32, (512, 704)),  # 640·512/480 = 682.67 → 683 → 704
        ((480, 640), (2048, 512), None, (512, 683)),
        ((333, 517), (2048, 512), 32, (512, 800)),  # 517·512/333 = 794.9 → 795 → 800
        ((100, 1000), (2048, 512), 32, (224, 2048)),  # long side binds: 2.048 → 204.8 → 205 → 224
        ((512, 683), (512, 2048), 32, (512, 704)),  # the box is (long, short) in either order
    ],
)
def test_keep_ratio_sizes(image_size, scale, divisor, expected):
    processor = ImageProcessor(keep_ratio=True, scale=scale, size_divisor=divisor)
    assert processor.output_size(*image_size) == expected


def test_keep_ratio_outputs():
    processor = ImageProcessor(keep_ratio=True, scale=(2048, 512))
    image = random_rgb(240, 320, 14)  # → 512×682.67 → 512×683 → 512×704
    result = processor(image, np.zeros((240, 320), dtype=np.uint8))
    assert result["pixel_values"].shape == (1, 3, 512, 704)
    assert result["labels"].shape == (1, 512, 704)
    assert result["original_sizes"] == [(240, 320)]
    # the resize itself is transformers' resize to that size
    assert torch.equal(
        result["pixel_values"], reference(image, size={"height": 512, "width": 704})["pixel_values"]
    )


def test_keep_ratio_batch_of_different_sizes_is_a_list():
    processor = ImageProcessor(keep_ratio=True, scale=(256, 64))
    masks = [np.ones((32, 32), np.uint8), np.ones((20, 60), np.uint8)]
    result = processor([random_rgb(32, 32), random_rgb(20, 60)], masks)
    assert [tuple(p.shape) for p in result["pixel_values"]] == [(3, 64, 64), (3, 64, 192)]
    assert [tuple(label.shape) for label in result["labels"]] == [(64, 64), (64, 192)]


def test_mask_must_match_its_image():
    with pytest.raises(ImageError, match=r"label map is 10×10 but its image .* is 12×10"):
        ImageProcessor()(random_rgb(12, 10), np.zeros((10, 10), np.uint8))


# ---------------------------------------------------------------------------------------
# reading images
# ---------------------------------------------------------------------------------------
def test_read_image_grayscale_and_16_bit(tmp_path):
    gray = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    result = np.asarray(read_image(tmp_path / "gray.png"))
    assert result.shape == (12, 20, 3)
    for channel in range(3):
        np.testing.assert_array_equal(result[..., channel], gray)

    deep = (np.arange(240, dtype=np.uint16).reshape(12, 20) * 273).astype(np.uint16)  # up to 65247
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    expected = np.floor(deep / 257 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "deep.png"))[..., 1], expected)
    np.testing.assert_array_equal(np.asarray(read_image(deep))[..., 2], expected)

    wide = Image.fromarray(deep.astype(np.int32))  # mode I: 16-bit content in 32 bits
    np.testing.assert_array_equal(np.asarray(read_image(wide))[..., 0], expected)
    unit = Image.fromarray(gray.astype(np.float32) / 255)  # mode F in [0, 1]
    np.testing.assert_array_equal(np.asarray(read_image(unit))[..., 0], gray)

    colour = np.random.default_rng(15).integers(0, 65536, (9, 11, 3)).astype(np.uint16)
    (tmp_path / "deep_rgb.png").write_bytes(png_16bit_rgb(colour))
    result = np.asarray(read_image(tmp_path / "deep_rgb.png")).astype(int)
    assert np.abs(result - colour / 257).max() <= 1.0


def test_read_image_alpha_composited_on_white():
    pixels = np.zeros((2, 3, 4), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[0, :, 3] = 0  # transparent → white
    pixels[1, :, 3] = 255  # opaque → the colour itself
    pixels[1, 2, 3] = 128  # half → halfway to white
    result = np.asarray(read_image(encode(Image.fromarray(pixels, mode="RGBA"), "PNG"))).astype(int)
    np.testing.assert_array_equal(result[0], np.full((3, 3), 255))
    np.testing.assert_array_equal(result[1, :2], [[200, 0, 0], [200, 0, 0]])
    half = 128 / 255
    assert (
        np.abs(
            result[1, 2]
            - np.array([200 * half + 255 * (1 - half), 255 * (1 - half), 255 * (1 - half)])
        ).max()
        <= 1
    )


def test_read_image_palette_with_transparency():
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90])
    data = encode(image, "PNG", transparency=1)
    assert Image.open(io.BytesIO(data)).mode == "P"
    result = np.asarray(read_image(data))
    np.testing.assert_array_equal(
        result, [[[10, 20, 30], [255, 255, 255]], [[70, 80, 90], [255, 255, 255]]]
    )


def test_read_image_cmyk_and_ycbcr(tmp_path):
    cmyk = np.array(
        [[[255, 0, 0, 0], [0, 255, 0, 0]], [[0, 0, 255, 0], [0, 0, 0, 255]]], dtype=np.uint8
    )
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "cmyk.tif")
    result = np.asarray(read_image(tmp_path / "cmyk.tif"))
    np.testing.assert_array_equal(
        result, [[[0, 255, 255], [255, 0, 255]], [[255, 255, 0], [0, 0, 0]]]
    )

    big = Image.fromarray(np.kron(cmyk, np.ones((16, 16, 1), dtype=np.uint8)), mode="CMYK")
    result = np.asarray(read_image(encode(big, "JPEG", quality=95))).astype(int)
    assert np.abs(result[4:12, 4:12] - np.array([0, 255, 255])).max() <= 8

    ycbcr = random_rgb(8, 8, 16).convert("YCbCr")
    np.testing.assert_array_equal(np.asarray(read_image(ycbcr)), np.asarray(ycbcr.convert("RGB")))


def exif_rotated(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))


def test_read_image_applies_exif_orientation():
    # four flat quadrants, so JPEG compression cannot blur which is where
    blocks = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 0]]], dtype=np.uint8)
    stored = np.kron(blocks, np.ones((32, 48, 1), dtype=np.uint8))  # 64 high, 96 wide
    upright = np.rot90(stored, k=-1)  # orientation 6: the viewer turns the picture 90° clockwise
    result = np.asarray(read_image(exif_rotated(Image.fromarray(stored), "JPEG", 6))).astype(int)
    assert result.shape == (96, 64, 3)
    assert np.abs(result - upright).mean() < 3
    result = np.asarray(read_image(exif_rotated(Image.fromarray(stored), "PNG", 6)))
    np.testing.assert_array_equal(result, upright)
    result = np.asarray(
        read_image(Image.open(io.BytesIO(exif_rotated(Image.fromarray(stored), "PNG", 3))))
    )
    np.testing.assert_array_equal(result, stored[::-1, ::-1])


def test_read_image_reduced_jpeg_decoding():
    # A smooth 1600×1200 photo-like JPEG: each reduction is libjpeg's 1/2, 1/4 or 1/8, the
    # largest that stays at least as large as asked (sizes by hand), and its pixels are those
    # of the full decode resized, up to JPEG's own blur.
    y, x = np.mgrid[0:1200, 0:1600]
    smooth = np.stack([x * 255 // 1600, y * 255 // 1200, (x + y) * 255 // 2800], -1)
    buffer = io.BytesIO()
    Image.fromarray(smooth.astype(np.uint8)).save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    asked = []

    def need(height, width):
        asked.append((height, width))
        return (280, 390)

    reduced = read_image(data, reduce_for=need)
    assert asked == [(1200, 1600)]
    assert reduced.size == (400, 300)  # 1/4: 1/8 would be 200×150, below 390×280
    assert read_image(data, reduce_for=lambda h, w: (600, 800)).size == (800, 600)
    assert read_image(data, reduce_for=lambda h, w: (601, 800)).size == (1600, 1200)
    assert read_image(data, reduce_for=lambda h, w: (1, 1)).size == (200, 150)
    full = read_image(data).resize((400, 300), Image.Resampling.BILINEAR)
    difference = np.abs(np.asarray(reduced).astype(int) - np.asarray(full).astype(int))
    assert difference.mean() < 2

    # Quarter-turned by EXIF: the caller is asked, and answered, in upright terms.
    turned = exif_rotated(Image.fromarray(smooth.astype(np.uint8)), "JPEG", 6)
    asked.clear()
    upright = read_image(turned, reduce_for=need)
    assert asked == [(1600, 1200)]
    assert upright.size == (600, 800)  # 1/2 of 1200×1600: 1/4 would be 300 wide, below 390

    # Not a JPEG, or already in memory: decoded whole.
    png = io.BytesIO()
    Image.fromarray(smooth.astype(np.uint8)).save(png, "PNG")
    assert read_image(png.getvalue(), reduce_for=need).size == (1600, 1200)
    assert read_image(smooth.astype(np.uint8), reduce_for=need).size == (1600, 1200)


def test_read_image_sources(tmp_path):
    pixels = np.array(random_rgb(10, 14, 17))
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    with open(path, "rb") as stream:
        from_stream = read_image(stream)
    for image in (
        read_image(path),
        read_image(str(path)),
        read_image(path.read_bytes()),
        read_image(io.BytesIO(path.read_bytes())),
        from_stream,
        read_image(Image.fromarray(pixels)),
        read_image(pixels),
        read_image(np.moveaxis(pixels, -1, 0)),  # channels first
        read_image(torch.from_numpy(pixels).permute(2, 0, 1)),
        read_image(pixels.astype(np.float32) / 255),
        read_image(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255),
    ):
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), pixels)
    gray = pixels[..., 0]
    np.testing.assert_array_equal(np.asarray(read_image(gray))[..., 2], gray)
    np.testing.assert_array_equal(
        np.asarray(read_image(gray.astype(np.uint16) * 257))[..., 0], gray
    )


def test_read_image_bad_inputs(tmp_path):
    with pytest.raises(ImageError, match=r"missing\.png: no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("this is not an image\n")
    with pytest.raises(ImageError, match=r"notes\.png: not an image"):
        read_image(tmp_path / "notes.png")
    photo = random_rgb(64, 64, 18)
    for fmt in ("PNG", "JPEG"):
        data = encode(photo, fmt)
        (tmp_path / f"cut.{fmt.lower()}").write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageError, match=rf"cut\.{fmt.lower()}: truncated or corrupt"):
            read_image(tmp_path / f"cut.{fmt.lower()}")
    with pytest.raises(ImageError, match=r"folder"):
        read_image(tmp_path)
    with pytest.raises(ImageError, match=r"upload\.jpg: not an image"):
        read_image(b"GIF? no", name="upload.jpg")
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        read_image(np.full((4, 4, 3), 2.5, dtype=np.float32))
    with pytest.raises(ImageError, match=r"shape"):
        read_image(np.zeros((6, 6, 5), dtype=np.uint8))
    with pytest.raises(ImageError, match=r"<int>: cannot read an image from a int object"):
        read_image(5)


def test_read_image_pixel_limit(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    random_rgb(50, 40, 19).save(path)
    with pytest.raises(
        ImageError,
        match=r"big\.png: image is 40×50 = 2,000 pixels, above the limit of 1,999 pixels; .*max_pixels",
    ):
        read_image(path, max_pixels=1999)
    assert read_image(path, max_pixels=2000).size == (40, 50)
    # Pillow's own decompression-bomb guard (warning above its limit, error above twice it)
    # gives way to ours: no warning escapes, and our limit decides.
    for pillow_limit in (1500, 900):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert read_image(path).size == (40, 50)
            assert read_image(path, max_pixels=None).size == (40, 50)
        with pytest.raises(ImageError, match=r"big\.png: image is 40×50"):
            read_image(path, max_pixels=1000)
        assert pillow_limit == Image.MAX_IMAGE_PIXELS


# ---------------------------------------------------------------------------------------
# reading masks
# ---------------------------------------------------------------------------------------
def test_read_mask_formats(tmp_path):
    indices = np.array([[0, 1, 2], [3, 2, 1]], dtype=np.uint8)
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette([0, 0, 0, 128, 64, 128, 244, 35, 232, 70, 70, 70])
    palette.save(tmp_path / "palette.png")
    mask = read_mask(tmp_path / "palette.png")
    np.testing.assert_array_equal(mask, indices)
    assert mask.shape == (2, 3) and np.issubdtype(mask.dtype, np.integer)

    Image.fromarray(indices).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "gray.png"), indices)
    np.testing.assert_array_equal(read_mask(Image.fromarray(indices).convert("RGB")), indices)

    wide = (indices.astype(np.uint16) * 1000).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    np.testing.assert_array_equal(read_mask((tmp_path / "wide.png").read_bytes()), wide)
    np.testing.assert_array_equal(read_mask(torch.from_numpy(indices)), indices)

    with pytest.raises(ImageError, match=r"colour\.png: a colour mask"):
        Image.fromarray(np.asarray(random_rgb(4, 4, 20))).save(tmp_path / "colour.png")
        read_mask(tmp_path / "colour.png")
    with pytest.raises(ImageError, match=r"gone\.png: no such file"):
        read_mask(tmp_path / "gone.png")
    with pytest.raises(ImageError, match=r"whole numbers"):
        read_mask(np.full((2, 2), 0.5))


# ---------------------------------------------------------------------------------------
# preprocessor_config.json
# ---------------------------------------------------------------------------------------
def test_dict_round_trip_and_transformers_format(tmp_path):
    SegformerImageProcessorPil().save_pretrained(tmp_path)
    written = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert ImageProcessor().to_dict() == written

    for processor in (
        ImageProcessor(),
        ImageProcessor(
            size=(640, 480), do_reduce_labels=True, resample=3, image_mean=(0.5, 0.4, 0.3)
        ),
        ImageProcessor(keep_ratio=True, scale=(2048, 1024), size_divisor=None),
        ImageProcessor(shortest_edge=384, longest_edge=1000),
    ):
        data = json.loads(json.dumps(processor.to_dict()))
        assert ImageProcessor.from_dict(data) == processor


def test_keep_ratio_settings_do_not_disturb_transformers(tmp_path):
    processor = ImageProcessor(size=(96, 64), keep_ratio=True, scale=(1024, 256))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor.to_dict()))
    theirs = SegformerImageProcessorPil.from_pretrained(tmp_path)
    image = random_rgb(50, 70, 21)
    expected = theirs(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(processor.replace(keep_ratio=False)(image)["pixel_values"], expected)
    assert ImageProcessor.from_pretrained(tmp_path) == processor


def test_legacy_hub_settings():
    legacy = {
        "feature_extractor_type": "SegformerFeatureExtractor",
        "do_resize": True,
        "size": 512,
        "resample": 2,
        "reduce_labels": True,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
    processor = ImageProcessor.from_dict(legacy)
    assert processor.size == (512, 512)
    assert processor.do_reduce_labels
    with pytest.raises(CheckpointError, match="invalid preprocessing"):
        ImageProcessor.from_dict({"size": {"max_height": 3}})
    with pytest.raises(CheckpointError, match="invalid preprocessing"):
        ImageProcessor.from_dict({"image_mean": [0.5, 0.5]})


def test_from_pretrained_reads_transformers_save(tmp_path):
    settings = {
        "size": {"height": 480, "width": 640},
        "do_reduce_labels": True,
        "image_std": [0.2, 0.3, 0.4],
    }
    SegformerImageProcessorPil(**settings).save_pretrained(tmp_path)
    processor = ImageProcessor.from_pretrained(tmp_path)
    assert processor.size == (480, 640)
    assert processor.do_reduce_labels
    assert processor.image_std == (0.2, 0.3, 0.4)
    image, mask = (
        random_rgb(33, 44, 22),
        np.random.default_rng(23).integers(0, 4, (33, 44), dtype=np.uint8),
    )
    expected = SegformerImageProcessorPil.from_pretrained(tmp_path)(
        image, mask, return_tensors="pt"
    )
    result = processor(image, mask)
    assert torch.equal(result["pixel_values"], expected["pixel_values"])
    assert torch.equal(result["labels"], expected["labels"])
    assert ImageProcessor.from_pretrained(tmp_path / "preprocessor_config.json") == processor

    empty = tmp_path / "empty"
    empty.mkdir()
    assert ImageProcessor.from_pretrained(empty) == ImageProcessor()
    (empty / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json: not valid JSON"):
        ImageProcessor.from_pretrained(empty)


def test_from_model(tiny_model):
    assert ImageProcessor.from_model(tiny_model) == ImageProcessor()
    tiny_model.metadata.preprocessing = ImageProcessor(size=(256, 256), keep_ratio=True).to_dict()
    assert ImageProcessor.from_model(tiny_model) == ImageProcessor(size=(256, 256), keep_ratio=True)


def test_exported_from_package():
    import segformer

    assert segformer.ImageProcessor is ImageProcessor


# ---------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------
@pytest.mark.shared
def test_ade20k_sample_equals_transformers():
    images = sorted((ADE20K_SAMPLE / "images" / "validation").glob("*.jpg"))
    masks = [ADE20K_SAMPLE / "annotations" / "validation" / f"{p.stem}.png" for p in images]
    assert images and all(m.is_file() for m in masks)
    expected = reference(
        [Image.open(p) for p in images], [Image.open(m) for m in masks], do_reduce_labels=True
    )
    result = ImageProcessor(do_reduce_labels=True)(images, masks)
    assert torch.equal(result["pixel_values"], expected["pixel_values"])
    assert torch.equal(result["labels"], expected["labels"])
    assert int(result["labels"].max()) == 255 and int(result["labels"].min()) == 0
