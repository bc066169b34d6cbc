"""``segformer data check`` and ``segformer data convert``: counts against hand-made masks,
every problem of a broken set named, a preview, atomic conversion that refuses to write into
its input, and the same CamVid images giving the same ``segformer eval`` numbers in two
layouts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from segformer.cli import main
from segformer.training.datacheck import check_dataset
from segformer.training.datasets import open_dataset
from tests.conftest import CAMVID
from tests.segdata import make_samples, save_png, write_folder
from tests.training.test_annotation_formats import coco_export


def test_check_counts_pixels_and_images_per_class_and_notes_background(tmp_path, capsys):
    # three images, class 0 everywhere and largest; class 2 rare
    labels = [np.zeros((10, 10), np.uint8) for _ in range(3)]
    labels[0][:4, :4] = 1
    labels[1][:2, :5] = 1
    labels[1][9, 9] = 2
    labels[2][0, :] = 255
    for i, label in enumerate(labels):
        save_png(np.zeros((10, 10, 3), np.uint8), tmp_path / "images" / f"{i}.png")
        save_png(label, tmp_path / "masks" / f"{i}.png")
    (tmp_path / "labels.json").write_text(json.dumps(["background", "thing", "speck"]))
    report = check_dataset(open_dataset(tmp_path, "folder", None))
    assert report.ok and report.checked == 3
    assert report.value_pixels[:3].tolist() == [300 - 16 - 10 - 1 - 10, 26, 1]
    assert report.value_images[:3].tolist() == [3, 2, 1] and report.ignored_pixels == 10
    notes = " ".join(report.notes)
    assert "label 0 looks like a background class (named 'background'" in notes
    assert "reduce_labels would ignore it" in notes
    assert "class imbalance: background has 263× the pixels of speck" in notes

    preview = tmp_path.parent / f"{tmp_path.name}-preview.png"
    code = main(
        [
            "data",
            "check",
            str(tmp_path),
            "--format",
            "folder",
            "--split",
            "x",
            "--preview",
            str(preview),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "ok: the data can train" in out
    assert "  2  speck" in out and Image.open(preview).size[1] == 180  # one row of 3 tiles


def test_check_names_every_problem_of_a_broken_set(tmp_path, capsys):
    samples = make_samples(6)
    write_folder(tmp_path, samples, None)
    (tmp_path / "labels.json").write_text(json.dumps(["a", "b", "c"]))
    (tmp_path / "masks" / "000.png").unlink()  # missing mask
    (tmp_path / "images" / "001.png").write_bytes(b"not a png")  # unreadable image
    save_png(samples[2][1][:, :40], tmp_path / "masks" / "002.png")  # mis-sized
    bad = samples[3][1].copy()
    bad[0, 0] = 7
    save_png(bad, tmp_path / "masks" / "003.png")  # outside the label set
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    save_png(
        colours[np.where(samples[4][1] == 255, 0, samples[4][1])], tmp_path / "masks" / "004.png"
    )
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    code = main(["data", "check", str(tmp_path), "--format", "folder", "--split", "none"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(err) == 5 and all(line.startswith("error: ") for line in err)
    assert "images without a mask" in err[0] and "000.png" in err[0]
    assert "unreadable files" in err[1] and "001.png" in err[1]
    assert "sizes differ" in err[2] and "002.png" in err[2]
    assert "colour masks" in err[3] and "004.png" in err[3]
    assert "outside the label set" in err[4] and "003.png: label 7" in err[4]
    assert before == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}


def test_convert_writes_the_folder_layout_atomically(tmp_path, capsys):
    root = tmp_path / "coco"
    coco_export(root)
    source = open_dataset(root, "coco", "train")
    out = tmp_path / "converted"
    assert main(["data", "convert", str(root), "--format", "coco", "--out", str(out)]) == 0
    assert "split val: skipped" in capsys.readouterr().err
    converted = open_dataset(out, "folder", "train")
    assert converted.labels == ["background", "road", "car", "person"]
    assert len(converted.palette) == 4
    by_name = {converted.pairs[i][0].stem: i for i in range(len(converted))}
    for i in range(len(source)):
        j = by_name[source.pairs[i][0].stem]
        assert np.array_equal(source[i]["labels"].numpy(), converted[j]["labels"].numpy())
        assert np.array_equal(source[i]["image"].numpy(), converted[j]["image"].numpy())
    assert Image.open(converted.pairs[0][1]).mode == "P"
    assert {p.name for p in tmp_path.iterdir()} == {"coco", "converted"}  # no temporary folder

    # refused: an existing folder, a folder inside the input
    assert main(["data", "convert", str(root), "--format", "coco", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    inside = root / "images" / "out"
    assert main(["data", "convert", str(root), "--format", "coco", "--out", str(inside)]) == 2
    assert "inside the input dataset" in capsys.readouterr().err and not inside.exists()


def test_failed_conversion_leaves_nothing(tmp_path, capsys):
    samples = make_samples(2)
    write_folder(tmp_path / "data", samples, "train")
    save_png(samples[1][1][:, :40], tmp_path / "data" / "masks" / "train" / "001.png")
    code = main(
        [
            "data",
            "convert",
            str(tmp_path / "data"),
            "-f",
            "folder",
            "--split",
            "train",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2 and "001.png" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.shared
@pytest.mark.slow
def test_camvid_subset_in_two_layouts_gives_identical_eval_numbers(tmp_path, capsys):
    names = sorted(p.name for p in (CAMVID / "val").glob("*.png"))[::20][:5]
    subset = tmp_path / "camvid"
    for folder in ("val", "valannot"):
        (subset / folder).mkdir(parents=True)
        for name in names:
            shutil.copyfile(CAMVID / folder / name, subset / folder / name)
    folder = tmp_path / "folder"
    assert (
        main(
            ["data", "convert", str(subset), "-f", "camvid", "--split", "val", "--out", str(folder)]
        )
        == 0
    )
    results = {}
    for layout, fmt in ((subset, "camvid"), (folder, "folder")):
        out = tmp_path / f"eval-{fmt}"
        code = main(["eval", "--data", str(layout), "--format", fmt, "--split", "val", "--out", str(out),
                     "--num-workers", "0", "--no-progress"])  # fmt: skip
        assert code == 0
        results[fmt] = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    camvid, converted = results["camvid"], results["folder"]
    assert camvid["images"] == converted["images"] == 5
    for key in ("mIoU", "mAcc", "aAcc", "per_class", "confusion_matrix"):
        assert camvid[key] == converted[key], key
    assert camvid["mIoU"] > 30  # the built-in model, not a broken pipeline
