"""Shared fixtures. Tests that need ../shared (real data and weights, not in the repository)
are marked ``shared`` and skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEGFORMER_SHARED", REPO.parent / "shared"))
CITYSCAPES_B0 = SHARED / "weights" / "segformer-b0-cityscapes"
CITYSCAPES_SAMPLE = SHARED / "data" / "cityscapes-sample"
CAMVID = SHARED / "data" / "camvid"
ADE20K_SAMPLE = SHARED / "data" / "ade20k-sample"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if (SHARED / "README.md").is_file():
        return
    skip = pytest.mark.skip(
        reason=f"needs ../shared (real data and weights), not found at {SHARED}"
    )
    for item in items:
        if "shared" in item.keywords:
            item.add_marker(skip)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b``."""
    return ((a - b).norm() / b.norm()).item()


def randomize(model: torch.nn.Module) -> None:
    """Move every norm and BatchNorm statistic away from its identity initialisation, so that a
    parameter wired to the wrong place cannot hide behind ones and zeros."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
                module.bias.copy_(0.2 * torch.randn_like(module.bias))
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.3 * torch.randn_like(module.running_mean))
                module.running_var.copy_(torch.rand_like(module.running_var) + 0.5)


def tiny_reference(
    labels: list[str] | int = 5, depths: tuple[int, ...] = (1, 1, 1, 1), randomized: bool = True
):
    """The independent reference: a tiny transformers SegFormer (seeded), with its norms and
    BatchNorm statistics randomised unless told otherwise."""
    import transformers

    torch.manual_seed(0)
    names = [f"class_{i}" for i in range(labels)] if isinstance(labels, int) else labels
    config = transformers.SegformerConfig(
        hidden_sizes=[8, 16, 24, 32],
        depths=list(depths),
        num_attention_heads=[1, 2, 3, 4],
        decoder_hidden_size=16,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )
    reference = transformers.SegformerForSemanticSegmentation(config).eval()
    if randomized:
        randomize(reference)
    return reference


@pytest.fixture(autouse=True, scope="session")
def _test_cache(tmp_path_factory):
    """Engines cache converted and compiled models (``segformer.inference.backends.base.
    cache_dir``): into one folder per test session, not the user's cache; models with equal
    weights share their files across tests, as they would across runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEGFORMER_CACHE", str(tmp_path_factory.mktemp("segformer-cache")))
        yield


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_config():
    """A B0-shaped but very narrow SegFormer: fast to build and run in tests."""
    from segformer.models.config import SegformerConfig

    return SegformerConfig(
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 2, 3, 4],
        decoder_hidden_size=16,
        id2label={0: "background", 1: "thing", 2: "stuff"},
    )


@pytest.fixture
def tiny_model(tiny_config):
    from segformer.models.segformer import SegformerForSemanticSegmentation

    model = SegformerForSemanticSegmentation(tiny_config).eval()
    # A trained classifier separates classes; the near-zero init of a fresh one leaves near
    # ties everywhere, which would make label comparisons between equal computations brittle.
    torch.nn.init.normal_(model.decode_head.classifier.weight, std=1.0)
    return model
