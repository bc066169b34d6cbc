"""Metrics against torchmetrics and hand-computed values; evaluation against the prediction
path; `segformer eval` of the real Cityscapes B0 against transformers + torchmetrics."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassJaccardIndex,
)

import segformer
from segformer.training.datasets import open_dataset
from segformer.training.metrics import ConfusionMatrix, SegmentationMetrics, evaluate_dataset
from tests.conftest import CITYSCAPES_B0, CITYSCAPES_SAMPLE, REPO
from tests.segdata import make_samples, write_camvid, write_folder


def random_maps(seed: int, k: int = 5, shape=(4, 33, 47)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, shape, generator=g)
    prediction = torch.where(
        torch.rand(shape, generator=g) < 0.6, target, torch.randint(0, k, shape, generator=g)
    )
    target[torch.rand(shape, generator=g) < 0.1] = 255
    return prediction, target


def test_against_torchmetrics_when_every_class_is_present():
    prediction, target = random_maps(0)
    ours = ConfusionMatrix(5)
    ours.update(prediction, target)
    metrics = ours.compute()
    reference = MulticlassConfusionMatrix(5, ignore_index=255)(prediction, target)
    assert np.array_equal(metrics.confusion, reference.numpy())
    iou = MulticlassJaccardIndex(5, average=None, ignore_index=255)(prediction, target)
    assert np.allclose(metrics.iou, iou.numpy(), atol=1e-6)
    assert metrics.mean_iou == pytest.approx(
        MulticlassJaccardIndex(5, ignore_index=255)(prediction, target).item(), abs=1e-6
    )
    assert metrics.pixel_accuracy == pytest.approx(
        MulticlassAccuracy(5, average="micro", ignore_index=255)(prediction, target).item(),
        abs=1e-6,
    )
    assert metrics.mean_accuracy == pytest.approx(
        MulticlassAccuracy(5, average="macro", ignore_index=255)(prediction, target).item(),
        abs=1e-6,
    )


def test_counts_are_summed_not_averaged_per_batch():
    prediction, target = random_maps(1)
    whole, pieces = ConfusionMatrix(5), ConfusionMatrix(5)
    whole.update(prediction, target)
    for p, t in zip(prediction, target, strict=True):
        pieces.update(p[:10], t[:10])
        pieces.update(p[10:], t[10:])
    assert torch.equal(whole.counts, pieces.counts)


def test_hand_computed_values_and_the_absent_class_convention():
    # 4 classes. Class 3 never appears (excluded from every mean); class 2 is predicted but
    # never in the ground truth (IoU 0 counts, accuracy undefined).
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 255, 255])
    prediction = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3, 0])
    counter = ConfusionMatrix(4)
    counter.update(prediction, target)
    metrics = counter.compute(["a", "b", "c", "d"])
    assert metrics.confusion.tolist() == [[3, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    # IoU: a = 3 / (4 + 3 − 3) = 3/4; b = 2 / (3 + 3 − 2) = 1/2; c = 0 / 1 = 0; d = 0/0
    assert metrics.iou[:3].tolist() == [0.75, 0.5, 0.0] and math.isnan(metrics.iou[3])
    assert metrics.accuracy[:2].tolist() == [0.75, 2 / 3] and np.isnan(metrics.accuracy[2:]).all()
    assert metrics.mean_iou == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert metrics.mean_accuracy == pytest.approx((0.75 + 2 / 3) / 2)
    assert metrics.pixel_accuracy == pytest.approx(5 / 7)
    assert metrics.absent == ["d"]
    report = metrics.to_dict()
    assert (
        report["mIoU"] == pytest.approx(100 * 1.25 / 3, abs=1e-4)
        and report["per_class"]["d"]["IoU"] is None
    )
    assert report["absent_classes"] == ["d"] and report["labelled_pixels"] == 7
    table = metrics.table()
    assert "n/a" in table and "left out of the means: d" in table
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        counter.update(torch.tensor([0]), torch.tensor([4]))


def test_evaluation_scores_exactly_what_prediction_predicts(tmp_path, tiny_model):
    from segformer.inference.segmenter import Segmenter

    write_folder(tmp_path, make_samples(5, size=(48, 80)), "val")
    dataset = open_dataset(tmp_path, "folder", "val")
    metrics = evaluate_dataset(
        tiny_model, dataset, "whole", num_workers=0, batch_size=2, device="cpu"
    )
    # The prediction path, from the files, counted by torchmetrics.
    segmenter = Segmenter(tiny_model, device="cpu")
    results = segmenter([str(p) for p, _ in dataset.pairs])
    reference = MulticlassConfusionMatrix(3, ignore_index=255)
    for result, (_, mask) in zip(results, dataset.pairs, strict=True):
        from PIL import Image

        reference.update(
            torch.from_numpy(result.labels.astype(np.int64)),
            torch.from_numpy(np.array(Image.open(mask)).astype(np.int64)),
        )
    assert np.array_equal(metrics.confusion, reference.compute().numpy())


def test_metrics_round_trip_through_their_json(tmp_path):
    prediction, target = random_maps(2)
    counter = ConfusionMatrix(5)
    counter.update(prediction, target)
    metrics = counter.compute()
    from segformer.training.reports import write_metrics_report

    written = write_metrics_report(metrics, tmp_path, {"model": "m"})
    data = json.loads(written["metrics"].read_text())
    again = SegmentationMetrics(list(data["per_class"]), np.array(data["confusion_matrix"]))
    assert again.mean_iou == metrics.mean_iou and data["model"] == "m"
    assert (
        written["confusion_matrix"].stat().st_size > 1000
        and written["per_class_iou"].stat().st_size > 1000
    )


@pytest.mark.shared
def test_eval_cli_on_real_cityscapes_b0_agrees_with_transformers_and_torchmetrics(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "eval"
    command = [
        sys.executable,
        "-m",
        "segformer.cli",
        "eval",
        "--model",
        str(CITYSCAPES_B0),
        "--data",
        str(CITYSCAPES_SAMPLE),
        "--format",
        "cityscapes",
        "--split",
        "val",
        "--native",
        "--out",
        str(out),
        "--no-progress",
        "--num-workers",
        "0",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "mIoU" in done.stdout and "road" in done.stdout
    ours = json.loads((out / "metrics.json").read_text())

    # Independent: transformers' model and torchmetrics, on the same image at its own size.
    dataset = open_dataset(CITYSCAPES_SAMPLE, "cityscapes", "val")
    image, label = dataset.load(0)
    model = transformers.SegformerForSemanticSegmentation.from_pretrained(str(CITYSCAPES_B0)).eval()
    pixels = (
        torch.from_numpy(image).permute(2, 0, 1).float() / 255
        - torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    ) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        logits = model(pixel_values=pixels[None]).logits
    prediction = F.interpolate(
        logits, size=label.shape, mode="bilinear", align_corners=False
    ).argmax(1)[0]
    reference = MulticlassConfusionMatrix(19, ignore_index=255)(
        prediction, torch.from_numpy(label.astype(np.int64))
    ).numpy()
    ours_confusion = np.array(ours["confusion_matrix"])
    assert ours_confusion.sum() == reference.sum()
    assert (
        np.abs(ours_confusion - reference).sum() <= 0.002 * reference.sum()
    )  # fp32 rounding at ties
    reference_metrics = SegmentationMetrics(segformer.load(CITYSCAPES_B0).labels, reference)
    assert ours["mIoU"] == pytest.approx(100 * reference_metrics.mean_iou, abs=0.5)
    assert ours["aAcc"] == pytest.approx(100 * reference_metrics.pixel_accuracy, abs=0.1)
    assert ours["aAcc"] > 85  # a real model on a real street scene


def _saved_small_model(tmp_path):
    from segformer.models.config import SegformerConfig
    from segformer.models.segformer import SegformerForSemanticSegmentation

    config = SegformerConfig(
        hidden_sizes=[8, 16, 40, 64],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 2, 5, 8],
        decoder_hidden_size=16,
        id2label={0: "a", 1: "b", 2: "c"},
    )
    return segformer.save(SegformerForSemanticSegmentation(config), tmp_path / "model")


def test_eval_command_with_test_time_augmentation_writes_the_report(tmp_path, capsys):
    from segformer.cli import main
    from segformer.inference.modes import InferenceMode

    write_folder(tmp_path / "data", make_samples(3, size=(48, 64)), "val")
    model_dir = _saved_small_model(tmp_path)
    args = [
        "eval",
        "--model",
        str(model_dir),
        "--data",
        str(tmp_path / "data"),
        "--format",
        "folder",
        "--native",
        "--flip",
        "--scales",
        "0.75",
        "1.0",
        "--num-workers",
        "0",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "flip" in printed
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["mode"] == "whole, scales 0.75, 1, flip" and report["images"] == 3
    model = segformer.load(model_dir)
    from segformer.inference.processing import ImageProcessor

    expected = evaluate_dataset(
        model,
        open_dataset(tmp_path / "data", "folder", "val"),
        InferenceMode("whole", scales=(0.75, 1.0), flip=True),
        processor=ImageProcessor.from_model(model).replace(do_resize=False),
        device="cpu",
    )
    assert np.array_equal(np.array(report["confusion_matrix"]), expected.confusion)
    for name in ("per_class.txt", "per_class_iou.png", "confusion_matrix.png"):
        assert (tmp_path / "out" / name).is_file()

    slide = [
        "eval",
        "--model",
        str(model_dir),
        "--data",
        str(tmp_path / "data"),
        "--format",
        "folder",
        "--mode",
        "slide",
        "--crop-size",
        "32",
        "--stride",
        "16",
        "--num-workers",
        "0",
        "--no-progress",
        "--out",
        str(tmp_path / "slide"),
    ]
    assert main(slide) == 0
    assert json.loads((tmp_path / "slide" / "metrics.json").read_text())["mode"].startswith(
        "slide 32×32 / 16×16"
    )


def test_eval_command_refuses_a_dataset_with_another_label_count(tmp_path, capsys):
    from segformer.cli import main

    write_camvid(tmp_path / "camvid", make_samples(2), "val")
    code = main(
        [
            "eval",
            "--model",
            str(_saved_small_model(tmp_path)),
            "--data",
            str(tmp_path / "camvid"),
            "--format",
            "camvid",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "the dataset has 11 classes but the model predicts 3" in capsys.readouterr().err
