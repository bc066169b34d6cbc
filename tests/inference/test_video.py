"""Videos: synthetic clips written with PyAV go through segment_video and come back with the
right frame count, size, frame rate, orientation and one CSV row per frame."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import av
import numpy as np
import pytest

from segformer.errors import ImageError
from segformer.inference.processing import ImageProcessor
from segformer.inference.segmenter import Segmenter
from segformer.inference.video import is_video, output_suffix, segment_video


def write_clip(path: Path, frames: int = 12, width: int = 64, height: int = 48, rate: int = 12, codec: str = "libx264", pix_fmt: str = "yuv420p", rotation: int | None = None, container: str | None = None) -> Path:  # fmt: skip
    with av.open(str(path), "w", format=container) as output:
        stream = output.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            pixels = np.zeros((height, width, 3), np.uint8)
            pixels[:, : width // 2] = 255
            pixels[:, :, 1] = (i * 20) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return path


def probe(path: Path) -> tuple[int, int, int, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return (
            frames,
            stream.codec_context.width,
            stream.codec_context.height,
            float(stream.average_rate),
        )


@pytest.fixture
def segmenter(tiny_model):
    tiny_model.metadata.preprocessing = ImageProcessor(size=(64, 64)).to_dict()
    return Segmenter(tiny_model, device="cpu", batch_size=4)


def test_round_trip(segmenter, tmp_path):
    source = write_clip(tmp_path / "clip.mp4")
    calls = []
    result = segment_video(
        segmenter, source, tmp_path / "out" / "clip_overlay.mp4", stats_csv=tmp_path / "out" / "clip.csv",
        progress=lambda done, total: calls.append((done, total)),
    )  # fmt: skip
    assert probe(result.output) == (12, 64, 48, 12.0)
    assert (result.frames, result.width, result.height, result.padded) == (12, 64, 48, False)
    assert result.codec == "libx264"
    assert calls == [(i, 12) for i in range(1, 13)]
    with open(result.stats_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 12
    assert [int(r["frame"]) for r in rows] == list(range(12))
    assert float(rows[3]["time_s"]) == pytest.approx(3 / 12, abs=1e-3)
    for row in rows:
        assert sum(float(row[name]) for name in segmenter.labels) == pytest.approx(1.0, abs=1e-5)
    assert sum(result.class_shares.values()) == pytest.approx(1.0, abs=1e-5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip.csv", "clip_overlay.mp4"]


def test_overlay_frames_are_the_segmenters_overlays(segmenter, tmp_path):
    # Lossless in and out, so the encoded frame can be compared with the overlay itself.
    source = write_clip(tmp_path / "clip.mkv", frames=3, codec="ffv1", pix_fmt="yuv444p")
    result = segment_video(segmenter, source, tmp_path / "out.mkv", codec="ffv1", legend=False)
    assert result.frames == 3
    with av.open(str(source)) as original, av.open(str(result.output)) as written:
        first = next(original.decode(video=0)).to_ndarray(format="rgb24")
        encoded = next(written.decode(video=0)).to_ndarray(format="rgb24").astype(int)
    overlay = np.asarray(segmenter(first).overlay(legend=False))
    # The writer stores 4:2:0 chroma; put the expected frame through the same subsampling.
    pix_fmt = av.open(str(result.output)).streams.video[0].codec_context.pix_fmt
    expected = (
        av.VideoFrame.from_ndarray(overlay, format="rgb24")
        .reformat(format=pix_fmt)
        .to_ndarray(format="rgb24")
        .astype(int)
    )
    assert np.abs(encoded - expected).mean() < 2.0


def test_odd_sizes_are_padded_by_one_pixel(segmenter, tmp_path):
    source = write_clip(
        tmp_path / "odd.mov", frames=4, width=63, height=47, codec="png", pix_fmt="rgb24"
    )
    result = segment_video(segmenter, source, tmp_path / "odd_overlay.mp4")
    assert result.padded and (result.width, result.height) == (63, 47)
    assert probe(result.output)[:3] == (4, 64, 48)


def test_rotation_metadata_is_applied(segmenter, tmp_path):
    source = write_clip(tmp_path / "phone.mp4", frames=3, rotation=90)
    result = segment_video(segmenter, source, tmp_path / "phone_overlay.mp4")
    assert result.rotation == 90
    assert probe(result.output)[1:3] == (48, 64)  # portrait, upright


@pytest.mark.parametrize("suffix, codec", [(".webm", "libvpx-vp9"), (".avi", "mpeg4")])
def test_other_containers(segmenter, tmp_path, suffix, codec):
    source = write_clip(tmp_path / f"clip{suffix}", frames=5, codec=codec)
    target = tmp_path / f"clip_overlay{output_suffix(source)}"
    assert target.suffix == suffix
    result = segment_video(segmenter, source, target, max_frames=4)
    assert probe(result.output)[:3] == (4, 64, 48)


def test_corrupt_and_missing_videos(segmenter, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 500)
    with pytest.raises(ImageError, match=r"broken\.mp4"):
        segment_video(
            segmenter,
            broken,
            tmp_path / "out" / "broken_overlay.mp4",
            stats_csv=tmp_path / "out" / "b.csv",
        )
    with pytest.raises(ImageError, match="no such file"):
        segment_video(segmenter, tmp_path / "missing.mp4", tmp_path / "out" / "x.mp4")
    # a clip cut in half: frames before the cut may decode, but nothing half-written is left
    whole = write_clip(tmp_path / "whole.mp4", frames=12)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    try:
        segment_video(segmenter, cut, tmp_path / "out" / "cut_overlay.mp4")
    except ImageError as error:
        assert "cut.mp4" in str(error)
    leftovers = (
        [p.name for p in (tmp_path / "out").iterdir()] if (tmp_path / "out").exists() else []
    )
    assert all(not name.startswith(".") for name in leftovers)  # no temporary files


def test_video_detection(tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", frames=2)
    renamed = tmp_path / "clip.bin"
    renamed.write_bytes(clip.read_bytes())
    assert is_video(clip) and is_video(renamed)
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    assert not is_video(tmp_path / "photo.png")
    assert output_suffix("a.flv") == ".mp4"


def _changed_box(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Width and height of the box around the pixels that differ between two frames."""
    rows, cols = np.nonzero(np.abs(a.astype(int) - b.astype(int)).max(-1) > 8)
    return (int(cols.max()) + 1, int(rows.max()) + 1) if rows.size else (0, 0)


def test_video_legend_is_small_and_scales_with_the_frame(segmenter, tmp_path):
    source = write_clip(tmp_path / "in.mkv", frames=2, width=480, height=360, codec="ffv1", pix_fmt="yuv444p")  # fmt: skip
    boxes = {}
    for legend in (True, False):
        out = tmp_path / f"out-{legend}.mkv"
        segment_video(segmenter, source, out, codec="ffv1", legend=legend)
        with av.open(str(out)) as container:
            boxes[legend] = next(container.decode(video=0)).to_ndarray(format="rgb24")
    width, height = _changed_box(boxes[True], boxes[False])
    # three classes: three rows, in the top-left corner, well under a tenth of the frame
    assert 0 < width <= 480 * 0.25 and 0 < height <= 360 * 0.2
    assert width * height <= 0.06 * 480 * 360


def test_inside_legend_folds_small_classes_and_spaces_words():
    from PIL import Image

    from segformer.inference.segmenter import ClassShare
    from segformer.inference.visualize import add_legend

    names = ["road", "sky", "building", "tree", "car", "sidewalk", "pedestrian", "fence", "pole"]
    entries = [
        ClassShare(i, n, 10, 0.3 / (i + 1), (255, 40 * i % 256, 0)) for i, n in enumerate(names)
    ]
    background = (0, 0, 255)
    sizes = {}
    for frame_h in (360, 1080):
        frame = Image.new("RGB", (frame_h * 4 // 3, frame_h), background)
        drawn = np.asarray(add_legend(frame, entries, "inside"))
        width, height = _changed_box(drawn, np.asarray(frame))
        assert width * height <= 0.06 * frame.width * frame.height  # ≈ 96×78 at 480×360
        sizes[frame_h] = height
        colours = {tuple(c) for c in drawn.reshape(-1, 3)}
        shown = [e for e in entries if tuple(e.color) in colours]
        assert shown == entries[:4]  # four largest, then "+5 more"
    assert sizes[1080] > 2 * sizes[360]  # the text grows with the frame
    # "+5 more": the last row has a gap of at least 3 blank columns between the two words
    frame = Image.new("RGB", (480, 360), background)
    drawn = np.asarray(add_legend(frame, entries, "inside")).astype(int)
    text_row = drawn[sizes[360] - 16 : sizes[360] - 3, :60]
    ink = (text_row.min(-1) > 120).any(0)  # light text on the dark box
    runs, previous, start = [], False, 0
    for x, value in enumerate([*ink, False]):
        if value and not previous:
            start = x
        if previous and not value:
            runs.append((start, x))
        previous = value
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(runs)]
    assert max(gaps) >= 3, runs
