"""ONNX export: the file runs in onnxruntime with any batch, height and width and gives
transformers' logits on the same weights; the command line writes it or fails cleanly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import segformer
from segformer.cli import main
from segformer.errors import SegformerError
from segformer.inference.export import CHECK_TOLERANCE, export_onnx, read_metadata
from segformer.inference.processing import ImageProcessor
from tests.conftest import tiny_reference

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny transformers model (randomised norms), ours loaded from its files, and one export."""
    reference = tiny_reference(["road", "car", "sky", "tree"])
    folder = tmp_path_factory.mktemp("model")
    reference.save_pretrained(folder)
    model = segformer.load(folder)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    report = export_onnx(model, path, sample_size=(64, 64))
    return reference, model, folder, path, report


def test_export_report_and_file(exported):
    _, _, _, path, report = exported
    assert path.is_file() and report.path == str(path)
    assert report.opset >= 17
    assert [c["shape"] for c in report.checked] == [[1, 3, 64, 64], [2, 3, 45, 39]]
    assert report.max_error is not None and report.max_error <= CHECK_TOLERANCE
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert (
        max(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")) >= 17
    )


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (3, 3, 97, 50), (2, 3, 32, 161)])
def test_onnxruntime_matches_transformers_on_dynamic_shapes(exported, shape):
    reference, _, _, path, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    pixels = torch.randn(*shape)
    (logits,) = session.run(None, {"pixel_values": pixels.numpy()})
    with torch.inference_mode():
        expected = reference(pixel_values=pixels).logits.numpy()
    assert logits.shape == expected.shape
    assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) <= 1e-4


def test_metadata_travels_with_the_file(exported):
    _, model, _, path, _ = exported
    metadata = read_metadata(path)
    assert metadata["id2label"] == {"0": "road", "1": "car", "2": "sky", "3": "tree"}
    assert metadata["config"]["hidden_sizes"] == [8, 16, 24, 32]
    assert metadata["preprocessing"] == ImageProcessor.from_model(model).to_dict()
    assert metadata["preprocessing"]["image_mean"] == [0.485, 0.456, 0.406]


def test_bad_export_requests(exported, tmp_path, tiny_config):
    _, model, _, _, _ = exported
    with pytest.raises(SegformerError, match=r"\.onnx"):
        export_onnx(model, tmp_path / "model.bin")
    with pytest.raises(SegformerError, match="opset"):
        export_onnx(model, tmp_path / "model.onnx", opset=13)
    with pytest.raises(segformer.CheckpointError, match="semantic-segmentation"):
        export_onnx(segformer.SegformerForImageClassification(tiny_config), tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


@pytest.fixture
def reuse_export(exported, monkeypatch):
    """Tracing a model to ONNX takes tens of seconds on a small CPU and the fixture has done it
    once: later tests copy that graph instead, and exercise everything around it for real."""
    import shutil

    import segformer.inference.export as export_module

    def copy(module, sample, path, opset):
        shutil.copyfile(exported[3], path)

    monkeypatch.setattr(export_module, "_export", copy)


def test_failed_check_leaves_nothing(exported, reuse_export, tmp_path, monkeypatch):
    _, model, _, _, _ = exported
    import segformer.inference.export as export_module

    def broken(path, model, size, batch=1):
        return {"shape": [batch, 3, *size], "relative_error": 0.5}

    monkeypatch.setattr(export_module, "compare_with_torch", broken)
    with pytest.raises(SegformerError, match="does not match"):
        export_onnx(model, tmp_path / "model.onnx", sample_size=(64, 64))
    assert not list(tmp_path.iterdir())


def test_cli_export(exported, reuse_export, tmp_path, capsys):
    _, _, folder, _, _ = exported
    out = tmp_path / "cli.onnx"
    code = main(
        [
            "export",
            str(folder),
            "--format",
            "onnx",
            "--out",
            str(out),
            "--sample-size",
            "64",
            "64",
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and report["path"] == str(out)
    assert len(report["checked"]) == 2 and report["max_error"] <= CHECK_TOLERANCE
    assert read_metadata(out)["id2label"]["1"] == "car"


def test_cli_export_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "x.onnx").exists()
