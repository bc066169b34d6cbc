"""Settings and the `segformer serve` command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from segformer.errors import SegformerError
from segformer.server import Settings
from segformer.server.settings import ModelSpec


def test_model_specs() -> None:
    assert ModelSpec.parse("city=/data/weights/b0") == ModelSpec("city", "/data/weights/b0")
    assert ModelSpec.parse("/data/weights/segformer-b0/") == ModelSpec(
        "segformer-b0", "/data/weights/segformer-b0/"
    )
    assert (
        ModelSpec.parse("nvidia/segformer-b0-finetuned-ade-512-512").name
        == "segformer-b0-finetuned-ade-512-512"
    )
    assert ModelSpec.parse("ckpt/model.safetensors").name == "model"
    with pytest.raises(SegformerError, match="NAME=SOURCE"):
        ModelSpec.parse("bad name=/x")
    with pytest.raises(SegformerError, match="two models"):
        Settings(models=["/a/b0", "/b/b0"])
    for bad in (
        {"workers": 0},
        {"max_uploads": 0},
        {"queue_size": -1},
        {"request_timeout": 0},
        {"port": 70000},
        {"root_path": "seg/"},
    ):
        with pytest.raises(SegformerError):
            Settings(**bad)


def test_cli_serve(tmp_path: Path, capsys) -> None:
    from segformer.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (
        "--model",
        "--host",
        "--port",
        "--workers",
        "--queue",
        "--max-upload-mb",
        "--max-pixels",
        "--timeout",
        "--root-path",
        "--bench-results",
        "--max-uploads",
    ):
        assert flag in help_text
    # a model that cannot be loaded stops the start with a one-line error, before binding
    assert main(["serve", "--model", str(tmp_path / "missing"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err and len(err.strip().splitlines()) == 1
    assert main(["serve", "--model", "x=" + str(tmp_path), "--workers", "0"]) == 2
    assert "workers must be at least 1" in capsys.readouterr().err
