"""`segformer predict` at scale: resuming an interrupted run (a simulated one and a real
``kill -9``), a 2-rank torchrun run against a 1-process run, list files, the output
folder holding the inputs (no input is ever changed), symlink loops and ``--save``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segformer.cli import main
from segformer.inference.segmenter import Segmenter
from tests.cli.test_predict import model_dir, picture  # noqa: F401  (model_dir is a fixture)

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> int:
    return main(["predict", *args, "--no-progress"])


def checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def manifest_lines(out: Path) -> list[dict]:
    lines = []
    for path in sorted((out / ".segformer").glob("manifest-rank*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def done_inputs(lines: list[dict]) -> list[str]:
    return [line["key"].split("\0")[0] for line in lines if line["status"] == "done"]


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        picture(36 + i, 48, i).save(folder / f"p{i}.png")
    return folder


def cli_env() -> dict[str, str]:
    env = dict(os.environ, SEGFORMER_ALLOCATOR="system", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    return env


# ---------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------
def test_resume_redoes_exactly_the_missing_and_partial_inputs(model_dir, photos, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert run(str(photos), "--model", str(model_dir), "--out", str(out)) == 0
    capsys.readouterr()
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    labels_before = {f"p{i}": np.asarray(Image.open(out / f"p{i}.png")) for i in range(6)}

    # p1: an output deleted; p2: the label map cut short (as by a writer without temp files);
    # p3: killed mid-write (outputs present but no "done" line); p4: a leftover temporary.
    (out / "p1.json").unlink()
    data = (out / "p2.png").read_bytes()
    (out / "p2.png").write_bytes(data[: len(data) // 2])
    manifest = out / ".segformer" / "manifest-rank0.jsonl"
    kept = [
        line
        for line in manifest.read_text().splitlines()
        if not (json.loads(line)["key"].startswith(str(photos / "p3.png")) and '"done"' in line)
    ]
    manifest.write_text("\n".join(kept) + "\n")
    (out / ".p4.0123abcd.tmp.png").write_bytes(b"\x89PNG half")
    before = len(manifest_lines(out))

    assert run(str(photos), "--model", str(model_dir), "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert "segmented 3 of 6 input(s), 3 skipped (finished by an earlier run), 0 failed" in err
    assert "removed 1 half-written temporary file(s)" in err
    redone = done_inputs(manifest_lines(out)[before:])
    assert sorted(redone) == [str(photos / f"p{i}.png") for i in (1, 2, 3)]
    assert not (out / ".p4.0123abcd.tmp.png").exists()
    for stem in ("p0", "p4", "p5"):  # untouched
        for name in (f"{stem}.png", f"{stem}_overlay.png", f"{stem}.json"):
            assert (out / name).stat().st_mtime_ns == first[name]
    for stem, labels in labels_before.items():
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{stem}.png")), labels)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["inputs"], summary["succeeded"], summary["skipped"]) == (6, 6, 3)
    assert [r["input"] for r in summary["results"]] == [str(photos / f"p{i}.png") for i in range(6)]

    # Other settings: nothing counts as done.
    assert run(str(photos), "--model", str(model_dir), "--out", str(out), "--opacity", "0.3") == 0
    assert "segmenting everything again" in capsys.readouterr().err


def test_kill_9_loses_only_the_images_in_flight(model_dir, tmp_path):  # noqa: F811
    photos = tmp_path / "many"
    photos.mkdir()
    for i in range(60):
        picture(40, 52, i).save(photos / f"img{i:03d}.png")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "segformer.cli", "predict", str(photos), "--out", str(out),
               "--model", str(model_dir), "--batch-size", "1", "--threads", "1", "--no-progress"]  # fmt: skip
    process = subprocess.Popen(command, env=cli_env(), stderr=subprocess.PIPE)
    manifest = out / ".segformer" / "manifest-rank0.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and manifest.read_text().count('"done"') >= 5:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = set(done_inputs(manifest_lines(out)))
    assert 5 <= len(finished) < 60
    # every output present is whole: images decode, JSON parses. Temporaries are hidden
    # (".name.tmp"), and pathlib's glob matches hidden names too: leave them out here.
    outputs = [p for p in out.iterdir() if not p.name.startswith(".")]
    for path in (p for p in outputs if p.suffix == ".png"):
        Image.open(path).load()
    for path in (p for p in outputs if p.suffix == ".json"):
        json.loads(path.read_text())

    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{len(finished)} skipped (finished by an earlier run)" in result.stderr
    assert not list(out.glob(".*.tmp*"))
    segmenter = Segmenter.from_pretrained(model_dir, device="cpu")
    for i in (0, 30, 59):
        expected = segmenter(photos / f"img{i:03d}.png").labels
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"img{i:03d}.png")), expected)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["inputs"], summary["succeeded"]) == (60, 60)


# ---------------------------------------------------------------------------------------
# torchrun
# ---------------------------------------------------------------------------------------
VOLATILE = {"seconds", "images_per_second", "ranks", "segmented_now", "skipped", "timings"}


def stable(data):
    if isinstance(data, dict):
        return {k: stable(v) for k, v in data.items() if k not in VOLATILE}
    if isinstance(data, list):
        return [stable(v) for v in data]
    return data


def test_two_ranks_write_what_one_process_writes(model_dir, photos, tmp_path):  # noqa: F811
    (photos / "sub").mkdir()
    picture(40, 40, 9).save(photos / "sub" / "q.png")
    (photos / "broken.png").write_bytes(b"not a png")
    common = ["predict", str(photos), "--model", str(model_dir), "--threads", "1", "--no-progress"]
    one = subprocess.run(
        [sys.executable, "-m", "segformer.cli", *common, "--out", str(tmp_path / "one")],
        env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 1, one.stderr  # broken.png
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "segformer.cli", *common, "--out", str(tmp_path / "two")],
        env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # rank 0 reports the failure in its status; torchrun reports the ranks' worst
    assert two.returncode == 1, two.stderr
    assert "on 2 ranks" in two.stderr and "1 failed" in two.stderr
    assert two.stderr.count(f"error: {photos / 'broken.png'}") == 1

    a, b = tmp_path / "one", tmp_path / "two"
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if ".segformer" not in p.parts)
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if ".segformer" not in p.parts)
    assert files_a == files_b and len(files_a) > 20
    for name in files_a:
        if name.suffix == ".png":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
        elif name.suffix == ".json":
            assert stable(json.loads((a / name).read_text())) == stable(
                json.loads((b / name).read_text())
            ), name
    # each rank did its own share: inputs 0, 2, 4 … and 1, 3, 5 …
    per_rank = [done_inputs(manifest_lines_of(b, r)) for r in (0, 1)]
    assert len(per_rank[0]) + len(per_rank[1]) == 7 and min(map(len, per_rank)) == 3
    assert not set(per_rank[0]) & set(per_rank[1])
    summary = json.loads((b / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["inputs"] == 8


def manifest_lines_of(out: Path, rank: int) -> list[dict]:
    path = out / ".segformer" / f"manifest-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------
def test_list_file_with_a_bad_path_reports_it_and_goes_on(model_dir, photos, tmp_path, capsys):  # noqa: F811
    listing = tmp_path / "list.txt"
    listing.write_text(
        f"# photos to do\n{photos / 'p0.png'}\n{tmp_path / 'missing.jpg'}\n\n{photos / 'p1.png'}\n"
    )
    out = tmp_path / "out"
    code = run("--from-list", str(listing), "--model", str(model_dir), "--out", str(out))
    err = capsys.readouterr().err
    assert code == 1
    assert f"error: {listing}:3: {tmp_path / 'missing.jpg'}: no such file" in err.splitlines()
    stems = [str(photos / f"p{i}").lstrip("/") for i in (0, 1)]
    for stem in stems:
        assert (out / f"{stem}.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["results"]] == ["ok", "error", "ok"]


def test_output_folder_holding_the_input_never_changes_it(model_dir, photos, monkeypatch, capsys):  # noqa: F811
    before = checksums(photos)
    monkeypatch.chdir(photos)
    assert run("p0.png", "--model", str(model_dir), "--out", ".") == 0
    assert checksums(photos).items() >= before.items()  # every input as it was
    names = {p.name for p in photos.iterdir()}
    assert {"p0_seg.png", "p0_seg_overlay.png", "p0_seg.json"} <= names
    labels = np.asarray(Image.open(photos / "p0_seg.png"))
    expected = Segmenter.from_pretrained(model_dir, device="cpu")(photos / "p0.png").labels
    np.testing.assert_array_equal(labels, expected)
    # again: same names, nothing new, the input still untouched
    assert run("p0.png", "--model", str(model_dir), "--out", ".") == 0
    assert "1 skipped" in capsys.readouterr().err
    assert checksums(photos).items() >= before.items()


def test_folder_into_itself(model_dir, tmp_path, capsys):  # noqa: F811
    f2 = tmp_path / "f2"
    f2.mkdir()
    picture(40, 40, 1).save(f2 / "a.png")
    picture(40, 44, 2).save(f2 / "b.png")
    before = checksums(f2)
    assert run(str(f2), "--model", str(model_dir), "--out", str(f2)) == 0
    err = capsys.readouterr().err
    assert "no image or video files" not in err
    assert "segmented 2 of 2 input(s)" in err
    assert checksums(f2).items() >= before.items()
    assert (f2 / "a_seg.png").is_file() and (f2 / "b_seg_overlay.png").is_file()
    # run again: the first run's outputs are not taken for inputs
    assert run(str(f2), "--model", str(model_dir), "--out", str(f2)) == 0
    assert "segmented 0 of 2 input(s), 2 skipped" in capsys.readouterr().err
    # only outputs left: say so
    for name in ("a.png", "b.png"):
        (f2 / name).unlink()
    assert run(str(f2), "--model", str(model_dir), "--out", str(f2)) == 2
    err = capsys.readouterr().err
    assert "other than 4 output(s) of an earlier run" in err


def test_symlink_loops_are_reported(model_dir, photos, tmp_path, capsys):  # noqa: F811
    (photos / "loop").symlink_to(photos, target_is_directory=True)
    (photos / "self.png").symlink_to(photos / "self.png")
    (photos / "gone.png").symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "out"
    assert run(str(photos), "--model", str(model_dir), "--out", str(out)) == 0
    warnings = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")
    ]
    assert warnings == [
        f"warning: {photos / 'gone.png'}: broken symlink (its target does not exist), skipped",
        f"warning: {photos / 'loop'}: symlink loop (leads back to a folder above it), skipped",
        f"warning: {photos / 'self.png'}: symlink loop (the link leads back to itself), skipped",
    ]
    assert len(list(out.glob("p*.png"))) == 12  # labels and overlays of the six photos


def test_save_labels_only_and_final_line(model_dir, photos, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert run(str(photos), "--model", str(model_dir), "--out", str(out), "--save", "labels") == 0
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        *(f"p{i}.png" for i in range(6)), "summary.csv", "summary.json",
    ]  # fmt: skip
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("segmented 6 of 6 input(s), 0 failed, in ") and "images/s" in last
    with pytest.raises(SystemExit) as stop:  # argparse: usage and one error line
        run(str(photos), "--model", str(model_dir), "--out", str(out), "--save", "mask")
    assert stop.value.code == 2 and "--save takes" in capsys.readouterr().err


def test_many_files_stream_in_constant_memory(tmp_path):
    """The folder walk is a generator: the first input comes before the walk ends."""
    from segformer.inference.batch import Input, InputPlan

    root = tmp_path / "big"
    for d in range(3):
        (root / f"d{d}").mkdir(parents=True)
        for i in range(4):
            (root / f"d{d}" / f"x{i}.png").write_bytes(b"")
    plan = InputPlan.create([str(root)], tmp_path / "out")
    assert not plan.materialised
    stream = iter(plan)
    first = next(stream)
    assert isinstance(first, Input) and first.stem == "d0/x0"
    shutil.rmtree(root / "d2")  # not listed yet: the walk has not reached it
    assert [i.stem for i in stream if isinstance(i, Input)] == [
        f"d{d}/x{i}" for d in (0, 1) for i in range(4)
    ][1:]
