"""Segmentation metrics from one confusion matrix summed over a whole data set.

Definitions (K classes, C[i, j] = pixels of ground-truth class i predicted as j, ignored
pixels never counted):

    aAcc       Σ_k C[k, k] / Σ C                 pixel accuracy over all labelled pixels
    Acc_k      C[k, k] / Σ_j C[k, j]             recall of class k
    IoU_k      C[k, k] / (Σ_j C[k, j] + Σ_i C[i, k] − C[k, k])
    mAcc, mIoU the mean of Acc_k / IoU_k over the classes where they are defined

A class that never occurs in the ground truth has no Acc_k; one absent from both ground truth
and prediction has no IoU_k either (0/0). Those are NaN and left out of the means, as
mmsegmentation does; a class that is predicted but never present has IoU_k = 0 and counts.
Summing counts over the whole set (instead of averaging per-batch scores) is what makes the
numbers independent of batch size and of how many processes share the work.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from segformer.inference.segmenter import Segmenter
from segformer.training.datasets import check_labels, eval_loader, loader_batches

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Running (K, K) int64 counts; rows are ground truth, columns predictions."""

    def __init__(
        self, num_labels: int, ignore_index: int = IGNORE_INDEX, device: str | torch.device = "cpu"
    ) -> None:
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_labels, num_labels, dtype=torch.int64, device=device)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Add a batch: ``prediction`` and ``target`` are integer label maps of equal shape."""
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape"
            )
        k = self.num_labels
        target = target.to(self.counts.device, torch.int64).reshape(-1)
        prediction = prediction.to(self.counts.device, torch.int64).reshape(-1)
        valid = target != self.ignore_index
        target, prediction = target[valid], prediction[valid]
        if target.numel() and (int(target.max()) >= k or int(target.min()) < 0):
            raise ValueError(f"ground truth holds label {int(target.max())}, outside 0..{k - 1}")
        if prediction.numel() and (int(prediction.max()) >= k or int(prediction.min()) < 0):
            raise ValueError(f"prediction holds label {int(prediction.max())}, outside 0..{k - 1}")
        self.counts += torch.bincount(target * k + prediction, minlength=k * k).reshape(k, k)

    def all_reduce(self) -> None:
        """Sum the counts of every process (a no-op without torch.distributed). Integer sums
        are exact, so distributed results equal single-process ones bit for bit."""

        if dist.is_available() and dist.is_initialized():
            # NCCL reduces only GPU tensors; gloo only CPU ones.
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if dist.get_backend() == "nccl"
                else "cpu"
            )
            counts = self.counts.to(device)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            self.counts = counts.to(self.counts.device)

    def compute(self, labels: list[str] | None = None) -> SegmentationMetrics:
        names = labels or [f"class_{i}" for i in range(self.num_labels)]
        return SegmentationMetrics(names, self.counts.cpu().numpy().copy())


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else math.nan


@dataclass
class SegmentationMetrics:
    """Metrics of a whole evaluation, derived from its confusion matrix. All scores are
    fractions in [0, 1]; per-class scores are NaN where undefined (see the module doc)."""

    labels: list[str]
    confusion: np.ndarray  # (K, K) int64, rows ground truth, columns prediction

    @property
    def true_positives(self) -> np.ndarray:
        return np.diag(self.confusion).astype(np.float64)

    @property
    def ground_truth_pixels(self) -> np.ndarray:
        return self.confusion.sum(axis=1).astype(np.float64)

    @property
    def predicted_pixels(self) -> np.ndarray:
        return self.confusion.sum(axis=0).astype(np.float64)

    @property
    def iou(self) -> np.ndarray:
        union = self.ground_truth_pixels + self.predicted_pixels - self.true_positives
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, self.true_positives / union, np.nan)

    @property
    def accuracy(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(
                self.ground_truth_pixels > 0, self.true_positives / self.ground_truth_pixels, np.nan
            )

    @property
    def mean_iou(self) -> float:
        return _nanmean(self.iou)

    @property
    def mean_accuracy(self) -> float:
        return _nanmean(self.accuracy)

    @property
    def pixel_accuracy(self) -> float:
        total = self.confusion.sum()
        return float(self.true_positives.sum() / total) if total else math.nan

    @property
    def absent(self) -> list[str]:
        """Classes in neither ground truth nor prediction: excluded from every mean."""
        return [name for name, value in zip(self.labels, self.iou, strict=True) if np.isnan(value)]

    def summary(self) -> dict[str, float]:
        """mIoU, mAcc and aAcc in percent (how papers quote them)."""
        return {
            "mIoU": 100 * self.mean_iou,
            "mAcc": 100 * self.mean_accuracy,
            "aAcc": 100 * self.pixel_accuracy,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: scores in percent, undefined ones as null, and the raw counts."""

        def percent(value: float) -> float | None:
            return None if math.isnan(value) else round(100 * float(value), 4)

        return {
            **{k: percent(v / 100) for k, v in self.summary().items()},
            "units": "percent",
            "per_class": {
                name: {
                    "IoU": percent(iou),
                    "Acc": percent(acc),
                    "ground_truth_pixels": int(gt),
                    "predicted_pixels": int(pred),
                }
                for name, iou, acc, gt, pred in zip(
                    self.labels,
                    self.iou,
                    self.accuracy,
                    self.ground_truth_pixels,
                    self.predicted_pixels,
                    strict=True,
                )
            },
            "absent_classes": self.absent,
            "labelled_pixels": int(self.confusion.sum()),
            "confusion_matrix": self.confusion.tolist(),
        }

    def table(self) -> str:
        """A per-class table for the terminal, then the means."""
        width = max([len("class"), *(len(n) for n in self.labels)])
        lines = [
            f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}",
            f"{'-' * width}  {'-' * 6}  {'-' * 6}",
        ]
        for name, iou, acc in zip(self.labels, self.iou, self.accuracy, strict=True):
            iou_text = "   n/a" if np.isnan(iou) else f"{100 * iou:6.2f}"
            acc_text = "   n/a" if np.isnan(acc) else f"{100 * acc:6.2f}"
            lines.append(f"{name:<{width}}  {iou_text}  {acc_text}")
        s = self.summary()
        lines.append(f"{'-' * width}  {'-' * 6}  {'-' * 6}")
        lines.append(f"mIoU {s['mIoU']:.2f}   mAcc {s['mAcc']:.2f}   aAcc {s['aAcc']:.2f}")
        if self.absent:
            lines.append(
                f"n/a: absent from ground truth and predictions, left out of the means: {', '.join(self.absent)}"
            )
        return "\n".join(lines)


def evaluate(
    segmenter: Any,
    batches: Iterable[list[dict[str, Any]]],
    labels: list[str] | None = None,
    progress: bool = False,
    dataset: Any = None,
) -> SegmentationMetrics:
    """Metrics of ``segmenter`` (a ``segformer.Segmenter``: the very path ``segformer predict``
    takes — its image processor, inference mode and engine) over ``batches`` of
    ``{"image": uint8 (H, W, 3), "labels": (H, W), "index": i}`` items, as
    ``datasets.eval_loader`` yields them. Predictions come back at each label map's own size.
    ``dataset`` (the batches' source) names the mask file when a label is out of range. Under
    torch.distributed each process evaluates its share and the counts are summed."""

    names = list(labels or segmenter.labels)
    confusion = ConfusionMatrix(len(names))
    batches = loader_batches(batches)
    if progress:
        batches = tqdm(batches, unit="batch", desc="evaluating", dynamic_ncols=True)
    for items in batches:
        results = segmenter([item["image"].numpy() for item in items], batch_size=len(items))
        for item, result in zip(items, results, strict=True):
            prediction = torch.from_numpy(result.labels.astype(np.int64))
            try:
                confusion.update(prediction, item["labels"])
            except ValueError:  # e.g. a label outside the classes, when the scan was skipped
                if dataset is not None:  # names the mask and the stored value when it is one
                    check_labels(dataset, item["index"], item["labels"].numpy(), len(names))
                raise
    confusion.all_reduce()
    return confusion.compute(names)


def evaluate_dataset(
    model: Any,
    dataset: Any,
    mode: Any = "whole",
    *,
    processor: Any = None,
    device: str = "auto",
    backend: str = "auto",
    precision: str = "fp32",
    batch_size: int = 1,
    num_workers: int = 0,
    progress: bool = False,
) -> SegmentationMetrics:
    """Evaluate ``model`` on a ``segformer.training.datasets`` dataset in inference ``mode`` ("whole",
    "slide" or an ``InferenceMode``), preprocessing with ``processor`` (default: the model's
    own). Under torch.distributed, each process takes every N-th image and the counts are
    summed, so the result equals a single-process run exactly."""

    rank, world = (
        (dist.get_rank(), dist.get_world_size())
        if dist.is_available() and dist.is_initialized()
        else (0, 1)
    )
    segmenter = Segmenter(
        model,
        processor,
        device=device,
        backend=backend,
        precision=precision,
        mode=mode,
        batch_size=batch_size,
        max_pixels=None,
    )
    batches = eval_loader(dataset, num_workers, rank, world, batch_size)
    return evaluate(
        segmenter, batches, list(model.labels), progress=progress and rank == 0, dataset=dataset
    )
