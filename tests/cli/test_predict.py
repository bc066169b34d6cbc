"""`segformer predict` and `segformer info` as a user runs them: the promised files with the
promised content, one-line errors for bad inputs, the others still processed."""

from __future__ import annotations

import csv
import json
import logging

import av
import numpy as np
import pytest
from PIL import Image

from segformer.cli import main
from segformer.inference.processing import ImageProcessor
from segformer.inference.segmenter import Segmenter
from segformer.models.config import SegformerConfig
from segformer.models.segformer import SegformerForSemanticSegmentation
from segformer.weights.checkpoints import save
from tests.inference.test_video import write_clip


def picture(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [x * 255 // width, y * 255 // height, np.full_like(x, rng.integers(0, 256))], -1
    )
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture
def model_dir(tmp_path, tiny_config):
    # widths the loader's head inference accepts (heads 1, 2, 5, 8)
    config = SegformerConfig(
        **{
            **tiny_config.__dict__,
            "hidden_sizes": [8, 16, 40, 64],
            "num_attention_heads": [1, 2, 5, 8],
        }
    )
    model = SegformerForSemanticSegmentation(config).eval()
    model.metadata.preprocessing = ImageProcessor(size=(64, 64)).to_dict()
    return save(model, tmp_path / "model")


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "photos"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    picture(40, 60, 0).save(folder / "a" / "x.png")
    picture(50, 45, 1).save(folder / "b" / "x.png")  # same name, other folder
    picture(33, 71, 2).save(folder / "street.jpg")
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x07" * 64)
    return folder


def run(*args: str) -> int:
    return main(["predict", *args, "--no-progress"])


def test_folder_run_writes_the_promised_files(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code = run(str(inputs), "--model", str(model_dir), "--out", str(out), "--batch-size", "2")
    err = capsys.readouterr().err
    assert code == 1  # the corrupt file failed
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert error_lines[0].startswith(f"error: {inputs / 'corrupt.png'}: ")
    assert len(error_lines[0].splitlines()) == 1
    assert "1 of 4 input(s) failed" in error_lines[-1]

    for stem, source in [("a/x", "a/x.png"), ("b/x", "b/x.png"), ("street", "street.jpg")]:
        labels_png = out / f"{stem}.png"
        record = json.loads((out / f"{stem}.json").read_text())
        image = Image.open(inputs / source)
        label_map = Image.open(labels_png)
        assert label_map.mode == "P" and label_map.size == image.size
        values = np.asarray(label_map)
        # the PNG holds the labels the library computes for this image
        expected = Segmenter.from_pretrained(model_dir, device="cpu")(inputs / source).labels
        np.testing.assert_array_equal(values, expected)
        assert (record["width"], record["height"]) == image.size
        assert record["source"] == str(inputs / source)
        counts = np.bincount(values.ravel(), minlength=3)
        assert {c["name"]: c["pixels"] for c in record["classes"]} == {
            ["background", "thing", "stuff"][i]: int(n) for i, n in enumerate(counts) if n
        }
        assert set(record["timings"]) >= {
            "decode_ms",
            "preprocess_ms",
            "model_ms",
            "postprocess_ms",
        }
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.width > image.width  # with its legend

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["inputs"], summary["succeeded"], summary["failed"]) == (4, 3, 1)
    statuses = {r["input"]: r["status"] for r in summary["results"]}
    assert statuses[str(inputs / "corrupt.png")] == "error"
    with open(out / "summary.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 4 and sum(r["status"] == "ok" for r in rows) == 3
    assert not list(out.rglob(".*.tmp*"))  # no temporary files left
    assert sorted(p.name for p in (out / ".segformer").iterdir()) == ["manifest-rank0.jsonl"]


def test_files_globs_and_name_clashes(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code = run(
        str(inputs / "a" / "x.png"), str(inputs / "b" / "x.png"), str(inputs / "*.jpg"),
        "--model", str(model_dir), "--out", str(out), "--no-overlay",
    )  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in out.iterdir() if p.name != ".segformer") == [
        "street.json", "street.png", "summary.csv", "summary.json", "x-2.json", "x-2.png", "x.json", "x.png",
    ]  # fmt: skip
    assert "error" not in capsys.readouterr().err


def test_nothing_found_is_one_line_and_a_failure(model_dir, tmp_path, capsys):
    code = run(
        str(tmp_path / "nope.png"),
        str(tmp_path / "*.webp"),
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "o"),
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[0] == f"error: {tmp_path / 'nope.png'}: no such file or folder"
    assert err[1] == f"error: {tmp_path / '*.webp'}: no files match this pattern"


def test_pixel_limit(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code = run(
        str(inputs / "a" / "x.png"),
        str(inputs / "street.jpg"),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--max-pixels",
        "2399",
    )
    err = capsys.readouterr().err
    assert code == 1
    assert f"error: {inputs / 'a' / 'x.png'}: image is 60×40" in err  # 2400 pixels
    assert (out / "street.png").exists()
    assert not (out / "x.png").exists()


def test_modes_from_the_command_line(model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    code = run(
        str(inputs / "street.jpg"), "--model", str(model_dir), "--out", str(out),
        "--mode", "slide", "--crop-size", "32", "--stride", "24", "--scales", "1", "1.5", "--flip",
    )  # fmt: skip
    assert code == 0
    record = json.loads((out / "street.json").read_text())
    assert record["mode"] == "slide 32×32 / 24×24, scales 1, 1.5, flip"
    assert Image.open(out / "street.png").size == (71, 33)


def test_reduced_decode(model_dir, tmp_path):
    # The model reads 64×64: a 384×256 JPEG is decoded at 1/4 (96×64, the largest reduction
    # still at least 64 on both sides) and every output is at that size; a PNG is not reduced.
    folder = tmp_path / "photos"
    folder.mkdir()
    picture(256, 384, 3).save(folder / "big.jpg", quality=95)
    picture(256, 384, 4).save(folder / "big_png.png")
    out = tmp_path / "out"
    assert run(str(folder), "--model", str(model_dir), "--out", str(out), "--reduced-decode") == 0
    assert Image.open(out / "big.png").size == (96, 64)
    record = json.loads((out / "big.json").read_text())
    assert (record["width"], record["height"]) == (96, 64)
    assert Image.open(out / "big_png.png").size == (384, 256)
    full = tmp_path / "full"
    assert run(str(folder / "big.jpg"), "--model", str(model_dir), "--out", str(full)) == 0
    assert Image.open(full / "big.png").size == (384, 256)


def test_bad_options_are_one_line_errors(model_dir, inputs, tmp_path, capsys):
    code = run(
        str(inputs / "street.jpg"),
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "o"),
        "--mode",
        "slide",
        "--crop-size",
        "32",
        "--stride",
        "64",
    )
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error: stride")


def test_video_input(model_dir, tmp_path):
    (tmp_path / "in").mkdir()
    clip = write_clip(tmp_path / "in" / "drive.mp4", frames=6)
    out = tmp_path / "out"
    assert run(str(tmp_path / "in"), "--model", str(model_dir), "--out", str(out)) == 0
    with av.open(str(out / "drive_overlay.mp4")) as container:
        stream = container.streams.video[0]
        assert sum(1 for _ in container.decode(stream)) == 6
        assert (stream.codec_context.width, stream.codec_context.height) == (64, 48)
    with open(out / "drive_frames.csv", newline="") as file:
        assert len(list(csv.DictReader(file))) == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"][0]["kind"] == "video" and summary["results"][0]["frames"] == 6
    assert clip.exists()


def test_info(model_dir, capsys):
    assert main(["info", str(model_dir), "--size", "64", "64"]) == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "GMACs" in text and "background, thing, stuff" in text
    assert main(["info", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_labels"] == 3 and info["macs"]["height"] == 64 and info["macs"]["macs"] > 0
    assert info["variant"] == "custom" and info["palette_source"] == "generated"
    # a model that does not say what it is for, and has no measured threshold, says so
    assert info["domain"] is None and info["out_of_domain"] is None
    assert "made for    not stated" in text
    assert "warns       never: no out-of-domain threshold" in text


def test_builtin_model_says_what_it_is_for_and_warns_on_other_pictures(tmp_path, capsys, caplog):
    from tests.inference.test_domain import synthetic_non_road

    disks = synthetic_non_road()["disks"]
    Image.fromarray(disks).save(tmp_path / "disks.png")
    with caplog.at_level(logging.INFO, logger="segformer"):
        code = run(str(tmp_path / "disks.png"), "--out", str(tmp_path / "out"))
    err = capsys.readouterr().err.splitlines()
    assert code == 0
    # the first line logged says what the model is for
    assert caplog.messages[0].startswith("camvid-b0 is for road scenes")
    warnings = [line for line in err if line.startswith("warning:")]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"warning: {tmp_path / 'disks.png'}: does not look like")
    assert "--model" in warnings[0]
    record = json.loads((tmp_path / "out" / "disks.json").read_text())
    assert record["out_of_domain"] is True
    assert record["domain"].startswith("road scenes")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["results"][0]["out_of_domain"] is True
    assert summary["results"][0]["domain_score"] == record["domain_score"] > -4

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "made for    road scenes" in text
    assert "when a picture's energy score is above" in text
