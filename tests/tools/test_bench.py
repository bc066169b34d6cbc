"""The benchmark library and ``segformer bench``: what they measure and report is right
(speed itself is for benchmarks/, not tests)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import segformer
from segformer.cli import main
from segformer.inference.engine import default_backend
from segformer.models.macs import count_macs
from segformer.tools import bench
from tests.conftest import tiny_reference


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_reference(randomized=False).save_pretrained(folder)
    return folder


def test_time_interleaved_rotates_and_counts():
    calls = []
    samples = bench.time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1
    )
    assert calls == [
        "a",
        "b",
        "a",
        "b",
        "b",
        "a",
        "a",
        "b",
    ]  # warm-up, then rounds in rotating order
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3}


def test_time_interleaved_bursts():
    calls = []
    samples = bench.time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        rounds=2,
        warmup=0,
        burst=2,
    )
    assert calls == ["a", "a", "b", "b", "b", "b", "a", "a"]  # each burst's last call is timed
    assert {k: len(v) for k, v in samples.items()} == {"a": 2, "b": 2}


def test_summarize():
    stats = bench.summarize([0.010, 0.030, 0.020, 0.040, 0.050], batch=2)
    assert stats["median_ms"] == pytest.approx(30.0)
    assert stats["p10_ms"] == pytest.approx(10.0) and stats["p90_ms"] == pytest.approx(50.0)
    assert stats["images_per_s"] == pytest.approx(2 / 0.030)


def test_variant_table_matches_the_paper():
    """GMACs as the SegFormer paper's table counts them (ADE20K, 150 classes, B0-B4 at 512²,
    B5 at 640²), and parameters in millions."""
    paper = {"b0": 8.4, "b1": 15.9, "b2": 62.4, "b3": 79.0, "b4": 95.7, "b5": 183.3}
    params = {"b0": 3.8, "b1": 13.7, "b2": 27.5, "b3": 47.3, "b4": 64.1, "b5": 84.7}
    for row in bench.variant_table():
        assert row["gmacs"] == pytest.approx(paper[row["variant"]], abs=0.25)
        assert row["params_m"] == pytest.approx(params[row["variant"]], abs=0.1)
        assert row["executed_gmacs"] < row["gmacs"]  # the folded decoder does less work


def test_published_and_executed_macs_by_hand(tiny_config):
    """The decoder's share of both counts, by hand: as published (projections, the fuse conv
    over 4·D channels at 1/4 resolution, the classifier), and as FastSegformer runs it (each
    stage's folded D×C_i matrix at its own resolution, the classifier)."""
    model = segformer.SegformerForSemanticSegmentation(tiny_config)
    size = (64, 64)
    d, k = 16, 3
    pixels = [16 * 16, 8 * 8, 4 * 4, 2 * 2]
    widths = [8, 16, 24, 32]
    projections = sum(p * c * d for p, c in zip(pixels, widths, strict=True))
    published_decoder = projections + pixels[0] * 4 * d * d + pixels[0] * d * k
    folded_decoder = projections + pixels[0] * d * k
    published = count_macs(tiny_config, size)
    executed = bench.executed_macs(model, size)
    assert published - executed == published_decoder - folded_decoder
    assert bench.executed_macs(model, size, batch=3) == 3 * executed


def test_peak_matmul_rate_is_positive():
    assert bench.peak_matmul_rate(torch.float32, size=128, seconds=0.05) > 0


def test_model_job_with_transformers(tiny_folder):
    model = segformer.load(tiny_folder)
    job = bench.run_model_job(
        model, (64, 64), engines=[("eager", "fp32"), ("fast", "fp32")], rounds=2
    )
    rows = {row["engine"]: row for row in job["results"]}
    assert list(rows) == ["transformers", "eager fp32", "fast fp32"]
    assert job["reference"] == "transformers"
    assert rows["transformers"]["ratio"] == pytest.approx(1.0)
    for row in rows.values():
        assert row["samples"] == 2 and row["median_ms"] > 0
        assert row["relative_error"] <= 1e-5
        assert row["label_agreement"] == pytest.approx(1.0)
    assert job["executed_gmacs"] < job["gmacs"]


@pytest.mark.slow
def test_model_job_can_add_transformers_compiled_as_a_point_of_comparison(tiny_folder):
    model = segformer.load(tiny_folder)
    job = bench.run_model_job(
        model, (64, 64), engines=[("fast", "fp32")], with_transformers_compiled=True, rounds=2
    )
    rows = {row["engine"]: row for row in job["results"]}
    assert list(rows) == ["transformers", "transformers compiled bf16", "fast fp32"]
    compiled = rows["transformers compiled bf16"]
    assert compiled["backend"] == "transformers compiled" and compiled["precision"] == "bf16"
    # bf16 rounding, not a different function: close to eager transformers, not equal to it.
    assert 0 < compiled["relative_error"] < 3e-2
    assert compiled["label_agreement"] > 0.9
    assert job["reference"] == "transformers"


def test_model_job_with_the_routes_a_user_has_without_us(tiny_folder):
    """transformers' own graph on OpenVINO (fp32; bf16 where the CPU has it) and its own ONNX
    export on onnxruntime: the same function as transformers, and the ratio against the
    fastest of them."""
    pytest.importorskip("openvino")
    from segformer.inference.backends.openvino import cpu_has_bf16

    model = segformer.load(tiny_folder)
    job = bench.run_model_job(
        model, (64, 64), engines=[("openvino", "fp32")], with_peers=True, rounds=2
    )
    rows = {row["engine"]: row for row in job["results"]}
    peers = ["transformers openvino fp32", "transformers onnxruntime fp32"]
    if cpu_has_bf16():
        peers.insert(1, "transformers openvino bf16")
    assert list(rows) == ["transformers", *peers, "openvino fp32"]
    for name in ["transformers openvino fp32", "transformers onnxruntime fp32", "openvino fp32"]:
        assert rows[name]["relative_error"] <= 1e-5
    if cpu_has_bf16():
        assert 0 < rows["transformers openvino bf16"]["relative_error"] < 5e-2
    assert job["best_peer"] in ["transformers", *peers]
    assert rows[job["best_peer"]]["peer_ratio"] == pytest.approx(1.0)
    assert min(rows[name]["peer_ratio"] for name in ["transformers", *peers]) == pytest.approx(1.0)
    assert "vs peer" in bench.format_table({"jobs": [job]})


def test_isolated_model_job_runs_each_contestant_in_its_own_process(tiny_folder):
    """The same rows and the same accuracy as in one process (transformers and the peers are
    built from the weights in each process), every contestant in a different process."""
    pytest.importorskip("openvino")
    model = segformer.load(tiny_folder)
    job = bench.run_model_job(
        model,
        (64, 64),
        engines=[("fast", "fp32"), ("openvino", "fp32")],
        with_peers=True,
        rounds=2,
        burst=2,
        isolate=True,
    )
    assert job["isolated"] is True
    rows = {row["engine"]: row for row in job["results"]}
    assert next(iter(rows)) == "transformers"
    assert list(rows)[-2:] == ["fast fp32", "openvino fp32"]
    for name in ["transformers", "transformers openvino fp32", "fast fp32", "openvino fp32"]:
        assert rows[name]["relative_error"] <= 1e-5
        assert rows[name]["label_agreement"] == pytest.approx(1.0)
    for row in rows.values():
        assert row["samples"] == 2 and row["median_ms"] > 0 and row["first_call_s"] > 0
    assert rows["transformers"]["ratio"] == pytest.approx(1.0)


def test_an_isolated_contestant_that_fails_is_one_error_with_its_reason(tiny_folder):
    spec = {"job": "model", "model": str(tiny_folder), "backend": "nonsense"}
    spec.update(precision="fp32")
    with pytest.raises(segformer.SegformerError, match=r"benchmark subprocess failed.*nonsense"):
        bench.IsolatedCandidate(spec, torch.zeros(1, 3, 64, 64))


def test_isolated_photo_job_gives_the_same_labels(tiny_folder, tmp_path):
    from PIL import Image

    model = segformer.load(tiny_folder)
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((48, 64, 3)) * 255).astype(np.uint8)).save(
        photo
    )
    job = bench.run_photo_job(model, photo, engines=[("fast", "fp32")], rounds=1, isolate=True)
    assert job["isolated"] is True
    assert [row["engine"] for row in job["results"]] == ["transformers", "fast fp32"]
    assert all(row["label_agreement"] == pytest.approx(1.0) for row in job["results"])


def test_default_engines_follow_the_machine_and_the_model_folder(tiny_folder, tmp_path):
    openvino = pytest.importorskip("segformer.inference.backends.openvino")
    model = segformer.load(tiny_folder)
    engines = bench.default_engines(model)
    assert engines[:5] == list(bench.DEFAULT_ENGINES[:5])
    assert (("openvino", "bf16") in engines) == openvino.cpu_has_bf16()
    assert ("openvino", "int8") not in engines
    segformer.save(model, tmp_path)
    for suffix in (".xml", ".bin"):  # only its presence matters here
        (tmp_path / openvino.INT8_IR).with_suffix(suffix).write_text("")
    assert ("openvino", "int8") in bench.default_engines(segformer.load(tmp_path))


def test_photo_job_labels_auto_by_what_it_runs(tiny_folder, tmp_path):
    from PIL import Image

    model = segformer.load(tiny_folder)
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)).save(
        photo
    )
    job = bench.run_photo_job(
        model,
        photo,
        engines=[("auto", "fp32"), ("fast", "fp32")],
        rounds=1,
        with_transformers=False,
    )
    default = default_backend("fp32", torch.device("cpu"))
    assert job["results"][0]["engine"] == f"{default} fp32"
    assert all(row["label_agreement"] == pytest.approx(1.0) for row in job["results"])


@pytest.mark.slow
def test_openvino_start_first_and_second_process(tiny_folder):
    pytest.importorskip("openvino")
    start = bench.measure_compile_cache(str(tiny_folder), "fp32", (64, 64), backend="openvino")
    # The second process reads the IR and the compiled blob instead of converting.
    assert 0 < start["second_process_s"] < start["first_process_s"]
    assert start["steady_ms"] > 0


def test_labels_job_reports_identity():
    logits = torch.nn.functional.interpolate(
        torch.randn(1, 19, 4, 4) * 5, size=(32, 32), mode="bilinear"
    )
    job = bench.run_labels_job(logits, (120, 160), rounds=2)
    assert job["identical"] is True
    assert [row["engine"] for row in job["results"]] == ["upsample + argmax", "labels_from_logits"]


def test_results_table_json_and_chart(tiny_folder, tmp_path):
    model = segformer.load(tiny_folder)
    results = bench.new_results(peak=False)
    results["jobs"].append(
        bench.run_model_job(
            model, (64, 64), engines=[("fast", "fp32")], rounds=2, with_transformers=False
        )
    )
    table = bench.format_table(results)
    assert "fast fp32" in table and results["machine"]["cpu"] in table
    path = bench.save_results(results, tmp_path / "nested" / "bench.json")
    assert json.loads(path.read_text())["schema"] == bench.SCHEMA
    chart = bench.save_chart(results, tmp_path / "chart.png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peak_rss_in_a_fresh_process(tiny_folder):
    rss = bench.measure_peak_rss(
        str(tiny_folder), "segformer", backend="fast", size=(64, 64), iterations=1
    )
    assert 50 < rss < 4000  # MiB: a Python process with torch, not its parent


def test_cli_bench(tiny_folder, tmp_path, capsys):
    out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(
        [
            "bench",
            str(tiny_folder),
            "--size",
            "64",
            "64",
            "--rounds",
            "1",
            "--burst",
            "1",
            "--engines",
            "fast",
            "--no-peers",
            "--json",
            str(out),
            "--chart",
            str(chart),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "transformers" in printed and "fast fp32" in printed
    results = json.loads(out.read_text())
    assert [row["engine"] for row in results["jobs"][0]["results"]] == ["transformers", "fast fp32"]
    assert results["machine"]["peak_gmacs_per_s"]["fp32"] > 0
    assert chart.is_file()


def test_cli_bench_errors(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing"), "--json", str(tmp_path / "b.json")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert (
        main(
            [
                "bench",
                "b0",
                "--engines",
                "warp",
                "--rounds",
                "1",
                "--size",
                "64",
                "64",
                "--json",
                str(tmp_path / "b.json"),
            ]
        )
        == 2
    )
    assert "unknown backend" in capsys.readouterr().err
