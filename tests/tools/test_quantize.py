"""``segformer quantize``: the model folder written at once, its int8 IR loading in OpenVINO
and agreeing with the PyTorch model, the accuracy gate leaving nothing behind, bad inputs in
one line; and on real CamVid images, int8 labels agreeing with fp32."""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest
import torch

import segformer
from segformer.cli import main
from segformer.inference.backends.openvino import OpenVinoEngine
from segformer.models.fast import FastSegformer
from segformer.models.metadata import DEFAULT_PREPROCESSING
from segformer.tools import quantize as quantize_module
from segformer.tools.quantize import (
    IR_XML,
    REPORT_JSON,
    quantize,
    relative_error,
)
from segformer.training.datasets import open_dataset
from segformer.training.metrics import SegmentationMetrics
from tests.conftest import CAMVID
from tests.segdata import make_samples, write_folder

LABELS = ["background", "thing", "stuff"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Torch's thread pool spins when the (shared, small) machine is busy: one thread keeps
    # these tiny models at milliseconds instead of a second per call.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model_dir(tmp_path, tiny_model):
    tiny_model.metadata.preprocessing = {
        **DEFAULT_PREPROCESSING,
        "size": {"height": 64, "width": 64},
    }
    return segformer.save(tiny_model, tmp_path / "model")


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    write_folder(root, make_samples(4, seed=0), "train")
    write_folder(root, make_samples(3, seed=1), "val")
    (root / "labels.json").write_text(json.dumps(LABELS))
    return root


def run(model_dir, data_dir, out, *extra: str) -> int:
    return main(
        [
            "quantize",
            str(model_dir),
            "--data",
            str(data_dir),
            "--format",
            "folder",
            "--samples",
            "3",
            "--threads",
            "1",
            "--no-progress",
            "--out",
            str(out),
            *extra,
        ]
    )


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_writes_model_folder_whose_int8_ir_agrees_with_torch(tmp_path, model_dir, data_dir, capsys):
    out = tmp_path / "int8"
    # A random tiny model may gain or lose a little with int8: the gate is tested below.
    assert run(model_dir, data_dir, out, "--max-drop", "100") == 0
    printed = capsys.readouterr().out
    assert "pixel agreement" in printed and "stuff" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
            "openvino_int8.xml",
            "openvino_int8.bin",
            "quantization.json",
        ]
    )
    assert leftovers(tmp_path) == []
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["calibration"]["images"] == 3 and report["validation"]["images"] == 3
    assert report["recipe"]["preset"] == "MIXED" and report["ir"]["input"] == "pixel_values"
    assert set(report["per_class_iou"]) == set(LABELS)
    assert report["versions"]["nncf"] and report["max_drop"] == 100
    assert report["ir"]["conversion_relative_error"] < 1e-4
    drop = report["fp32"]["mIoU"] - report["int8"]["mIoU"]
    assert report["mIoU_drop"] == pytest.approx(drop, abs=1e-3)
    assert 90 <= report["pixel_agreement"] <= 100

    # The folder is a model again, and its IR runs in OpenVINO on a size it was not calibrated on.
    model = segformer.load(out)
    ir = ov.Core().read_model(str(out / IR_XML))
    assert ir.inputs[0].get_any_name() == "pixel_values"
    assert ir.outputs[0].get_any_name() == "logits"
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = FastSegformer(model)(x)
    got = OpenVinoEngine(None, "int8", ir_path=out / IR_XML, hint="f32", threads=1, cache=False)(x)
    assert got.shape == expected.shape == (2, 3, 16, 24)
    assert relative_error(expected, got) < 0.1  # int8: loose, but not a different function

    # A second run replaces its own earlier output, in one rename.
    assert run(model_dir, data_dir, out, "--max-drop", "100") == 0
    assert (out / IR_XML).is_file() and leftovers(tmp_path) == []


def test_accuracy_gate_refuses_and_leaves_nothing(
    tmp_path, model_dir, data_dir, capsys, monkeypatch
):
    real = quantize_module.compare

    def int8_predicts_one_class(*args, **kwargs):
        fp32, int8, agreement = real(*args, **kwargs)
        confusion = np.zeros_like(int8.confusion)
        confusion[:, 0] = int8.confusion.sum(axis=1)
        return fp32, SegmentationMetrics(int8.labels, confusion), agreement

    monkeypatch.setattr(quantize_module, "compare", int8_predicts_one_class)
    out = tmp_path / "int8"
    assert run(model_dir, data_dir, out, "--max-drop", "0.5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: int8 mIoU ")
    assert "more than the allowed 0.5" in err[0] and "nothing written" in err[0]
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("model folder", "inside the model's folder"),
        ("inside data", "inside the data"),
        ("around data", "contains the"),
        ("foreign folder", "not an earlier quantize output"),
        ("zero samples", "--samples and --val-samples take a number of at least 1"),
        ("missing data", "no such dataset folder"),
        ("missing model", "no such file or folder"),
    ],
)
def test_bad_inputs_give_one_line(tmp_path, model_dir, data_dir, capsys, case, message):
    out, extra, model, data = tmp_path / "int8", [], model_dir, data_dir
    if case == "model folder":
        out = model_dir
    elif case == "inside data":
        out = data_dir / "int8"
    elif case == "around data":
        out = tmp_path
    elif case == "foreign folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "zero samples":
        extra = ["--samples", "0"]
    elif case == "missing data":
        data = tmp_path / "nowhere"
    else:
        model = tmp_path / "no-model"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert run(model, data, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.shared
@pytest.mark.slow
def test_camvid_b0_int8_agrees_with_fp32_on_real_images():
    model = segformer.load("camvid-b0")
    result = quantize(
        model,
        open_dataset(CAMVID, "camvid", "train"),
        open_dataset(CAMVID, "camvid", "val"),
        samples=16,
        val_samples=4,
        threads=1,
    )
    report = result.report
    assert report.agreement >= 0.99, report.summary()
    assert abs(report.drop) < 2, report.summary()
    assert report.conversion_error < 1e-4
