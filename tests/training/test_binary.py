"""Binary segmentation end to end: 0/255 training masks and 0/1 validation masks train a
two-class model whose reports give the foreground IoU and the mIoU of both classes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import segformer
from segformer.training.loop import TrainConfig, train
from tests.segdata import save_png


def write_binary(root, split: str, count: int, seed: int, foreground: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        mask = np.zeros((48, 64), np.uint8)
        top, left = rng.integers(0, 24), rng.integers(0, 32)
        mask[top : top + 20, left : left + 28] = foreground
        image = np.where(mask[..., None] > 0, 220, 30) + rng.integers(-20, 21, (48, 64, 3))
        save_png(np.clip(image, 0, 255).astype(np.uint8), root / "images" / split / f"{i}.png")
        save_png(mask, root / "masks" / split / f"{i}.png")


@pytest.mark.slow
def test_binary_masks_train_two_classes_and_report_foreground_iou(tmp_path):
    from segformer.models.config import SegformerConfig
    from segformer.models.segformer import SegformerForSemanticSegmentation

    write_binary(tmp_path / "data", "train", 6, seed=0, foreground=255)
    write_binary(tmp_path / "data", "val", 3, seed=1, foreground=1)
    start = segformer.save(
        SegformerForSemanticSegmentation(
            SegformerConfig(
                hidden_sizes=[8, 16, 40, 64],
                depths=[1, 1, 1, 1],
                num_attention_heads=[1, 2, 5, 8],
                decoder_hidden_size=16,
                id2label={0: "a", 1: "b", 2: "c"},
            )
        ),
        tmp_path / "start",
    )
    config = TrainConfig(
        data=str(tmp_path / "data"),
        format="binary",
        model=str(start),
        output_dir=str(tmp_path / "run"),
        crop_size=[32, 32],
        scale=None,
        batch_size=2,
        max_steps=6,
        warmup_steps=1,
        lr=2e-3,
        eval_interval=6,
        eval_scale=None,
        checkpoint_interval=6,
        log_interval=3,
        num_workers=0,
        threads=1,
    )
    result = train(config)
    metrics = result.best_metrics
    assert metrics.labels == ["background", "foreground"] and metrics.confusion.shape == (2, 2)
    # IoU of the foreground class from the confusion counts, and the mean of both
    c = metrics.confusion.astype(np.float64)
    foreground = c[1, 1] / (c[1, :].sum() + c[:, 1].sum() - c[1, 1])
    background = c[0, 0] / (c[0, :].sum() + c[:, 0].sum() - c[0, 0])
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert report["per_class"]["foreground"]["IoU"] == pytest.approx(100 * foreground, abs=1e-3)
    assert report["mIoU"] == pytest.approx(50 * (foreground + background), abs=1e-3)
    assert c.sum() == 3 * 48 * 64  # every validation pixel labelled 0 or 1
    assert segformer.load(tmp_path / "run" / "best").labels == ["background", "foreground"]
