"""Fixtures for the server tests: a tiny model saved to a temporary folder (it stands in for a
real one, inference takes milliseconds), a test client, and a real uvicorn server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import segformer
from tests.server.helpers import (
    LABELS,
    Live,
    client_for,
    make_settings,
    serving,
)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny segmentation model in Hugging Face layout, with a small input size so that
    inference takes milliseconds. Heads [1, 2, 5, 8] as every published MiT has them."""
    from segformer.models.config import SegformerConfig
    from segformer.models.segformer import SegformerForSemanticSegmentation

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = SegformerConfig(
        hidden_sizes=[8, 16, 40, 64],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 2, 5, 8],
        decoder_hidden_size=16,
        id2label=LABELS,
    )
    model = SegformerForSemanticSegmentation(config).eval()
    from segformer.inference.processing import ImageProcessor

    model.metadata.preprocessing = ImageProcessor(size=(64, 64)).to_dict()
    model.metadata.license = "apache-2.0"
    folder = tmp_path_factory.mktemp("models") / "tiny-model"
    segformer.save(model, folder)
    return folder


@pytest.fixture
def client(model_dir: Path, tmp_path: Path):
    with client_for(model_dir, tmp_path) as client:
        yield client


@pytest.fixture(scope="session")
def live_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A real server with a 100 kB upload limit, shared by the tests that only read from it."""
    settings = make_settings(model_dir, tmp_path_factory.mktemp("live"), max_upload_bytes=100_000)
    with serving(settings) as live:
        yield live
