"""Reports of runs and evaluations: metrics.json and per_class.txt hold the hand-computed
scores of a known confusion matrix, and the plots are PNGs of the expected size drawing
exactly the numbers they were given."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from segformer.training import reports
from segformer.training.metrics import SegmentationMetrics

# rows ground truth, columns prediction; "sky" is in neither
CONFUSION = np.array([[5, 1, 0], [2, 6, 0], [0, 0, 0]])
HISTORY = {
    "train": [
        {"step": 2, "loss": 1.5, "lr": 1e-3, "images_per_s": 10.0},
        {"step": 4, "loss": 0.75, "lr": 5e-4, "images_per_s": 12.0},
    ],
    "val": [
        {"step": 2, "mIoU": 40.0, "mAcc": 50.0, "aAcc": 70.0},
        {"step": 4, "mIoU": 60.0, "mAcc": 65.0, "aAcc": 80.0},
    ],
}


@pytest.fixture
def metrics() -> SegmentationMetrics:
    return SegmentationMetrics(["road", "car", "sky"], CONFUSION)


@pytest.fixture
def figures(monkeypatch) -> dict[str, object]:
    """The figures the report functions draw, by file name, as well as writing them."""
    drawn: dict[str, object] = {}
    save = reports._save

    def keep(figure, path):
        drawn[path.name] = figure
        return save(figure, path)

    monkeypatch.setattr(reports, "_save", keep)
    return drawn


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_metrics_report_holds_the_hand_computed_scores(tmp_path, metrics, figures):
    written = reports.write_metrics_report(metrics, tmp_path / "out", {"model": "m", "images": 2})
    data = json.loads(written["metrics"].read_text())
    # IoU road 5 / (6 + 7 − 5) = 0.625, car 6 / (8 + 7 − 6) = 2/3; accuracy 5/6 and 6/8
    assert data["model"] == "m" and data["images"] == 2 and data["units"] == "percent"
    assert data["mIoU"] == pytest.approx(round(100 * (0.625 + 2 / 3) / 2, 4), abs=1e-9)
    assert data["mAcc"] == pytest.approx(round(100 * (5 / 6 + 6 / 8) / 2, 4), abs=1e-9)
    assert data["aAcc"] == pytest.approx(round(100 * 11 / 14, 4), abs=1e-9)
    assert data["per_class"] == {
        "road": {"IoU": 62.5, "Acc": 83.3333, "ground_truth_pixels": 6, "predicted_pixels": 7},
        "car": {"IoU": 66.6667, "Acc": 75.0, "ground_truth_pixels": 8, "predicted_pixels": 7},
        "sky": {"IoU": None, "Acc": None, "ground_truth_pixels": 0, "predicted_pixels": 0},
    }
    assert data["absent_classes"] == ["sky"] and data["labelled_pixels"] == 14
    assert data["confusion_matrix"] == CONFUSION.tolist()
    assert written["table"].read_text() == (
        "class     IoU     Acc\n"
        "-----  ------  ------\n"
        "road    62.50   83.33\n"
        "car     66.67   75.00\n"
        "sky       n/a     n/a\n"
        "-----  ------  ------\n"
        "mIoU 64.58   mAcc 79.17   aAcc 78.57\n"
        "n/a: absent from ground truth and predictions, left out of the means: sky\n"
    )
    # figure sizes × 100 dpi: bars 8 × max(3, 0.28·3 + 1.2); matrix (5 + 1.5) × 5
    assert _png_size(written["per_class_iou"]) == (800, 300)
    assert _png_size(written["confusion_matrix"]) == (650, 500)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "confusion_matrix.png",
        "metrics.json",
        "per_class.txt",
        "per_class_iou.png",
    ]

    bars = figures["per_class_iou.png"].axes[0]
    assert [p.get_width() for p in bars.patches] == pytest.approx([62.5, 200 / 3, 0.0])
    assert [t.get_text() for t in bars.texts] == ["62.5", "66.7", "n/a"]
    assert bars.get_title() == "per-class IoU (mIoU 64.58)"
    matrix = figures["confusion_matrix.png"].axes[0].images[0].get_array()
    expected = [[5 / 6, 1 / 6, 0], [2 / 8, 6 / 8, 0], [0, 0, 0]]  # rows normalised
    assert np.allclose(np.asarray(matrix), expected)


def test_training_report_plots_the_history_and_the_best_validation(tmp_path, metrics, figures):
    written = reports.write_training_report(tmp_path, HISTORY, metrics, {"step": 4})
    assert set(written) == {
        "training_curves",
        "validation",
        "metrics",
        "table",
        "per_class_iou",
        "confusion_matrix",
    }
    plots = tmp_path / "plots"
    assert _png_size(plots / "training_curves.png") == (800, 600)
    assert _png_size(plots / "validation.png") == (800, 450)
    assert written["per_class_iou"] == plots / "per_class_iou.png"
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 4

    loss_axis, lr_axis = figures["training_curves.png"].axes[:2]
    assert list(loss_axis.lines[0].get_xdata()) == [2, 4]
    assert list(loss_axis.lines[0].get_ydata()) == [1.5, 0.75]
    assert list(lr_axis.lines[0].get_ydata()) == [1e-3, 5e-4]
    validation = figures["validation.png"].axes[0]
    drawn = {line.get_label(): list(line.get_ydata()) for line in validation.lines}
    assert drawn == {"mIoU": [40.0, 60.0], "mAcc": [50.0, 65.0], "aAcc": [70.0, 80.0]}
    assert validation.texts[0].get_text() == "best mIoU 60.00\nstep 4"


def test_training_report_without_validation_or_history(tmp_path):
    only_training = {"train": HISTORY["train"], "val": []}
    written = reports.write_training_report(tmp_path / "a", only_training, None)
    assert set(written) == {"training_curves"}
    assert sorted(p.name for p in (tmp_path / "a" / "plots").iterdir()) == ["training_curves.png"]
    assert reports.write_training_report(tmp_path / "b", {}, None) == {}
    assert not (tmp_path / "b").exists()


def test_json_and_text_are_written_whole(tmp_path):
    path = reports.write_json({"b": [1, 2.5], "a": None}, tmp_path / "deep" / "x.json")
    assert path.read_text() == '{\n  "b": [\n    1,\n    2.5\n  ],\n  "a": null\n}\n'
    reports.write_text("first\n", tmp_path / "t.txt")
    reports.write_text("second\n", tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text() == "second\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "t.txt"]  # no temporaries
