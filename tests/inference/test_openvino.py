"""The OpenVINO engine against transformers' model on the same weights (the independent
reference): exact in fp32, close in bf16, cached across processes, bounded in the shapes it
keeps, replaced by a PyTorch engine when OpenVINO is missing, and running int8 IRs."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import segformer
from segformer.errors import CheckpointError, SegformerError
from segformer.inference.backends import openvino as openvino_backend
from segformer.inference.backends.openvino import INT8_IR, OpenVinoEngine, cpu_has_bf16
from segformer.inference.engine import create_engine, default_backend
from segformer.tools.allocator import find_tcmalloc
from tests.conftest import CAMVID, CITYSCAPES_B0, REPO
from tests.inference.test_engine import expected_logits, pair, rel

ov = pytest.importorskip("openvino")
X86 = platform.machine().lower() in ("x86_64", "amd64")

__all__ = ["pair"]  # the fixture, shared with test_engine


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**environment, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("static", [True, False])
def test_fp32_matches_transformers(pair, static):
    reference, model, _ = pair
    engine = create_engine(model, backend="openvino", dynamic=not static)
    assert isinstance(engine, OpenVinoEngine) and engine.static is static
    for shape in [(1, 3, 64, 64), (2, 3, 67, 45), (1, 3, 33, 97)]:
        pixels = torch.randn(*shape)
        logits = engine(pixels)
        expected = expected_logits(reference, pixels)
        assert logits.dtype == torch.float32 and logits.is_contiguous()
        assert logits.shape == expected.shape
        assert rel(logits, expected) <= 1e-5
    # Not the plugin's default precision on bf16-capable CPUs: asked for explicitly.
    assert str(engine.compiled_model.get_property("INFERENCE_PRECISION_HINT")) in (
        "<Type: 'float32'>",
        "f32",
    )


@pytest.mark.skipif(not X86, reason="auto picks OpenVINO on x86 CPUs")
def test_auto_is_openvino_fp32_on_x86(pair):
    reference, model, _ = pair
    cpu = torch.device("cpu")
    assert default_backend("fp32", cpu) == "openvino"
    assert default_backend("bf16", cpu) == ("openvino" if cpu_has_bf16() else "compiled")
    assert default_backend("fp32", torch.device("cuda")) == "fast"
    engine = create_engine(model)
    assert engine.backend == "openvino" and engine.precision == "fp32"
    pixels = torch.randn(1, 3, 64, 64)
    assert rel(engine(pixels), expected_logits(reference, pixels)) <= 1e-5
    assert segformer.Segmenter(model, device="cpu").info()["backend"] == "openvino"


def test_bf16(pair):
    reference, model, _ = pair
    if not cpu_has_bf16():
        with pytest.raises(SegformerError, match="no bf16"):
            create_engine(model, backend="openvino", precision="bf16")
        return
    engine = create_engine(model, backend="openvino", precision="bf16")
    pixels = torch.randn(1, 3, 64, 64)
    error = rel(engine(pixels), expected_logits(reference, pixels))
    assert 0 < error < 5e-2


def test_fp32_and_bf16_programs_do_not_share_a_cached_blob(pair, tmp_path, monkeypatch):
    """OpenVINO's blob key leaves the precision hint out: a bf16 engine compiled after an fp32
    one (same model, same shape, same cache) must still run bf16 — on a CPU with AMX it loaded
    the fp32 blob and gave garbage or crashed."""
    reference, model, _ = pair
    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16")
    monkeypatch.setenv("SEGFORMER_CACHE", str(tmp_path))
    pixels = torch.randn(1, 3, 64, 64)
    expected = expected_logits(reference, pixels)
    assert rel(OpenVinoEngine(model, "fp32")(pixels), expected) <= 1e-5
    for _ in range(2):  # compiled, then loaded from its own blob
        assert 1e-4 < rel(OpenVinoEngine(model, "bf16")(pixels), expected) < 5e-2
    blobs = tmp_path / "openvino" / "blobs"
    assert sorted(p.parent.name for p in blobs.glob("*/*.blob")) == ["bf16", "f32"]


def test_static_shapes_kept_are_bounded(pair):
    reference, model, _ = pair
    engine = OpenVinoEngine(model, max_shapes=2)
    shapes = [(1, 3, 64, 64), (1, 3, 32, 48), (2, 3, 64, 64), (1, 3, 64, 64)]
    for shape in shapes:
        pixels = torch.randn(*shape)
        assert rel(engine(pixels), expected_logits(reference, pixels)) <= 1e-5
    assert engine.shapes == [(2, 3, 64, 64), (1, 3, 64, 64)]  # the first, evicted, came back


def test_second_process_reuses_the_cached_ir_and_blob(pair, tmp_path):
    """A first engine converts and compiles; a new process finds both on disk: it converts
    nothing (no conversion log line, IR file untouched) and loads the compiled blob."""
    _, _, folder = pair
    env = {"SEGFORMER_CACHE": str(tmp_path)}
    code = f"""
import json, logging, torch, segformer
from segformer.inference.engine import create_engine
logging.basicConfig(level=logging.INFO, format="LOG %(message)s")
engine = create_engine(segformer.load({str(folder)!r}), backend="openvino")
engine(torch.randn(1, 3, 64, 64))
print(json.dumps({{"converted": engine.converted, "ir": str(engine.ir_path),
    "from_blob": bool(engine.compiled_model.get_property("LOADED_FROM_CACHE"))}}))
"""
    first = run_python(code, env)
    assert first.returncode == 0, first.stderr[-2000:]
    made = json.loads(first.stdout.splitlines()[-1])
    assert made["converted"] and not made["from_blob"]
    assert "LOG converting the model for OpenVINO" in first.stderr
    ir = Path(made["ir"])
    assert ir.parent == tmp_path / "openvino"
    stamp = (ir.stat().st_mtime_ns, ir.with_suffix(".bin").stat().st_mtime_ns)

    second = run_python(code, env)
    assert second.returncode == 0, second.stderr[-2000:]
    reused = json.loads(second.stdout.splitlines()[-1])
    assert reused == {"converted": False, "ir": str(ir), "from_blob": True}
    assert "converting" not in second.stderr
    assert (ir.stat().st_mtime_ns, ir.with_suffix(".bin").stat().st_mtime_ns) == stamp
    assert sorted(p.name for p in ir.parent.glob("*.xml")) == [ir.name]


def test_fallback_when_openvino_is_missing(pair, monkeypatch, caplog):
    _, model, _ = pair
    monkeypatch.setattr(openvino_backend, "ov", None)
    with caplog.at_level(logging.WARNING, logger="segformer"):
        engine = create_engine(model)
    assert engine.backend == "fast"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "OpenVINO is unavailable" in warnings[0].getMessage()
    assert "pip install openvino" in warnings[0].getMessage()
    with pytest.raises(SegformerError, match="needs the openvino package"):
        create_engine(model, backend="openvino")


def test_fallback_when_the_import_fails(pair):
    """OpenVINO not importable at all (as if not installed), in a fresh process: auto runs
    the fast engine and says why in one warning line."""
    _, _, folder = pair
    code = f"""
import sys
sys.modules["openvino"] = None  # makes `import openvino` raise ImportError
import torch, segformer
from segformer.inference.engine import create_engine
engine = create_engine(segformer.load({str(folder)!r}))
print(engine.backend, tuple(engine(torch.randn(1, 3, 32, 32)).shape))
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["fast", "(1,", "5,", "8,", "8)"]
    warnings = [line for line in done.stderr.splitlines() if "OpenVINO" in line]
    assert len(warnings) == 1 and "running the fast PyTorch engine" in warnings[0]


@pytest.mark.skipif(find_tcmalloc() is None, reason="no tcmalloc on this system")
def test_runs_with_tcmalloc_preloaded(pair):
    """``segformer`` preloads tcmalloc; OpenVINO's CPU plugin used to abort at start-up then
    (see ``openvino_backend._load_hwloc_normally``)."""
    _, _, folder = pair
    code = f"""
import torch, segformer
from segformer.inference.engine import create_engine
print(create_engine(segformer.load({str(folder)!r}), backend="openvino")(torch.randn(1, 3, 64, 64)).shape)
"""
    done = run_python(code, {"LD_PRELOAD": find_tcmalloc()})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.Size([1, 5, 16, 16])" in done.stdout


def test_int8_runs_the_quantized_ir_beside_the_weights(pair, tmp_path):
    """An int8 IR quantized with NNCF from the fp32 IR and saved as ``segformer quantize``
    saves it: ``precision="int8"`` finds and runs it, close to the fp32 model."""
    nncf = pytest.importorskip("nncf")
    reference, model, _ = pair
    with pytest.raises(SegformerError, match="segformer quantize"):
        create_engine(model, precision="int8")
    with pytest.raises(SegformerError, match="int8 runs with the openvino backend"):
        create_engine(model, backend="fast", precision="int8")

    folder = tmp_path / "quantized"
    segformer.save(model, folder)
    calibration = [torch.randn(1, 3, 64, 64).numpy() for _ in range(8)]
    fp32 = openvino_backend.core().read_model(str(openvino_backend.cached_ir(model)[0]))
    quantized = nncf.quantize(fp32, nncf.Dataset(calibration), subset_size=len(calibration))
    ov.save_model(quantized, str(folder / INT8_IR), compress_to_fp16=False)
    assert "FakeQuantize" in (folder / INT8_IR).read_text()

    loaded = segformer.load(folder)
    engine = create_engine(loaded, precision="int8")
    assert isinstance(engine, OpenVinoEngine) and engine.precision == "int8"
    assert engine.ir_path == folder / INT8_IR and not engine.converted
    pixels = torch.from_numpy(calibration[0])
    expected = expected_logits(reference, pixels)
    logits = engine(pixels)
    assert logits.shape == expected.shape
    assert rel(logits, expected) < 0.3  # int8 of a random tiny model: near, not equal

    with pytest.raises(CheckpointError, match="no OpenVINO IR"):
        OpenVinoEngine(loaded, "int8", ir_path=tmp_path / "missing.xml")


@pytest.mark.shared
@pytest.mark.slow
def test_real_cityscapes_b0_fp32_is_exact():
    model = segformer.load(CITYSCAPES_B0)
    reference = transformers.SegformerForSemanticSegmentation.from_pretrained(CITYSCAPES_B0).eval()
    engine = create_engine(model, backend="openvino")
    for shape in [(1, 3, 512, 1024), (1, 3, 333, 517)]:
        pixels = torch.randn(*shape)
        assert rel(engine(pixels), expected_logits(reference, pixels)) <= 1e-5


@pytest.mark.shared
@pytest.mark.slow
def test_real_photos_bf16_labels_agree_with_fp32():
    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16")
    from segformer.tools.bench import labels_agreement_on_images

    model = segformer.load("camvid-b0")
    photos = sorted((CAMVID / "val").glob("*.png"))[:2]
    assert len(photos) == 2
    agreement = labels_agreement_on_images(model, photos, "openvino", "bf16")
    assert agreement >= 0.995
    assert np.isfinite(agreement)
