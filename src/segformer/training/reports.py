"""What a training or evaluation run leaves for people to look at: PNG plots (loss and
learning-rate curves, validation scores over time, per-class IoU bars, the normalised
confusion matrix), a metrics JSON and the per-class table.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global state,
no display needed) and written atomically like every other output.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from segformer.inference.segmenter import write_atomic
from segformer.inference.visualize import palette_for
from segformer.training.metrics import SegmentationMetrics


def _figure(width: float, height: float) -> Any:

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> Path:

    return write_atomic(path, lambda file: figure.savefig(file, format="png"))


def write_json(data: Any, path: str | os.PathLike[str]) -> Path:

    return write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def write_text(text: str, path: str | os.PathLike[str]) -> Path:

    return write_atomic(path, text.encode())


# ---------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------
def plot_training_curves(history: dict[str, list[dict[str, float]]], path: Path) -> Path | None:
    """Training loss and learning rate against optimizer steps."""
    records = history.get("train") or []
    if not records:
        return None
    steps = [r["step"] for r in records]
    figure = _figure(8, 6)
    loss_axis, lr_axis = figure.subplots(2, 1, sharex=True)
    loss_axis.plot(steps, [r["loss"] for r in records], color="tab:blue", linewidth=1.2)
    loss_axis.set_ylabel("training loss")
    loss_axis.set_yscale("log")
    loss_axis.grid(True, alpha=0.3)
    lr_axis.plot(steps, [r["lr"] for r in records], color="tab:orange", linewidth=1.2)
    lr_axis.set_ylabel("learning rate (encoder)")
    lr_axis.set_xlabel("step")
    lr_axis.grid(True, alpha=0.3)
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    return _save(figure, path)


def plot_validation_curve(history: dict[str, list[dict[str, float]]], path: Path) -> Path | None:
    """Validation mIoU (and mAcc, aAcc) against steps, the best point marked."""
    records = history.get("val") or []
    if not records:
        return None
    steps = [r["step"] for r in records]
    figure = _figure(8, 4.5)
    axis = figure.subplots()
    for key, style in (("mIoU", "-o"), ("mAcc", "--"), ("aAcc", ":")):
        axis.plot(steps, [r[key] for r in records], style, label=key, markersize=3)
    best = max(records, key=lambda r: r["mIoU"])
    axis.annotate(
        f"best mIoU {best['mIoU']:.2f}\nstep {best['step']}",
        (best["step"], best["mIoU"]),
        textcoords="offset points",
        xytext=(-12, 14),
        ha="right",
        va="bottom",
        arrowprops={"arrowstyle": "->"},
    )
    axis.set_ylim(0, 100)
    axis.set_xlabel("step")
    axis.set_ylabel("percent")
    axis.set_title("validation")
    axis.grid(True, alpha=0.3)
    axis.legend(loc="upper left")
    return _save(figure, path)


def plot_per_class_iou(
    metrics: SegmentationMetrics, path: Path, palette: Sequence[Sequence[int]] | None = None
) -> Path:
    """Horizontal bars of IoU per class; classes without a defined IoU are marked n/a."""
    count = len(metrics.labels)
    figure = _figure(8, max(3.0, 0.28 * count + 1.2))
    axis = figure.subplots()
    ious = np.nan_to_num(metrics.iou * 100, nan=0.0)

    rgb = palette_for(metrics.labels, {"palette": palette} if palette is not None else None)
    colours = [tuple(c / 255 for c in rgb[i]) for i in range(count)]
    positions = np.arange(count)
    axis.barh(positions, ious, color=colours, edgecolor="black", linewidth=0.4)
    for position, value in zip(positions, metrics.iou, strict=True):
        text = "n/a" if math.isnan(value) else f"{100 * value:.1f}"
        axis.text(
            (0 if math.isnan(value) else 100 * value) + 1, position, text, va="center", fontsize=8
        )
    axis.set_yticks(positions, metrics.labels, fontsize=8 if count <= 40 else 5)
    axis.invert_yaxis()
    axis.set_xlim(0, 105)
    axis.set_xlabel("IoU (%)")
    axis.set_title(f"per-class IoU (mIoU {100 * metrics.mean_iou:.2f})")
    axis.grid(True, axis="x", alpha=0.3)
    return _save(figure, path)


def plot_confusion_matrix(metrics: SegmentationMetrics, path: Path) -> Path:
    """The confusion matrix with each ground-truth row divided by its total: the diagonal is
    each class's accuracy, the rest where its pixels went."""
    counts = metrics.confusion.astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    count = len(metrics.labels)
    side = min(max(5.0, 0.45 * count + 2.5), 30.0)
    figure = _figure(side + 1.5, side)
    axis = figure.subplots()
    image = axis.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(
        image, ax=axis, fraction=0.046, pad=0.02, label="share of the ground-truth class"
    )
    font = 8 if count <= 30 else max(3, int(240 / count))
    axis.set_xticks(range(count), metrics.labels, rotation=90, fontsize=font)
    axis.set_yticks(range(count), metrics.labels, fontsize=font)
    axis.set_xlabel("predicted")
    axis.set_ylabel("ground truth")
    if count <= 20:
        for i in range(count):
            for j in range(count):
                if normalised[i, j] >= 0.005:
                    colour = "white" if normalised[i, j] > 0.5 else "black"
                    axis.text(
                        j,
                        i,
                        f"{100 * normalised[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color=colour,
                    )
    axis.set_title("confusion matrix (rows normalised)")
    return _save(figure, path)


# ---------------------------------------------------------------------------------------
# Whole reports
# ---------------------------------------------------------------------------------------
def write_metrics_report(
    metrics: SegmentationMetrics,
    out_dir: str | os.PathLike[str],
    info: dict[str, Any] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
    plots_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Path]:
    """``out_dir/metrics.json`` (scores, per-class results, confusion counts, and ``info``
    about the run) and ``per_class.txt`` (the table); ``per_class_iou.png`` and
    ``confusion_matrix.png`` in ``plots_dir`` (default: ``out_dir``)."""
    out = Path(out_dir)
    plots = Path(plots_dir) if plots_dir is not None else out
    return {
        "metrics": write_json({**(info or {}), **metrics.to_dict()}, out / "metrics.json"),
        "table": write_text(metrics.table() + "\n", out / "per_class.txt"),
        "per_class_iou": plot_per_class_iou(metrics, plots / "per_class_iou.png", palette),
        "confusion_matrix": plot_confusion_matrix(metrics, plots / "confusion_matrix.png"),
    }


def write_training_report(
    run_dir: str | os.PathLike[str],
    history: dict[str, list[dict[str, float]]],
    best: SegmentationMetrics | None,
    info: dict[str, Any] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
) -> dict[str, Path]:
    """The end-of-run pictures in ``run_dir/plots`` (training curves, validation over time)
    and, when there was validation, the best validation's ``run_dir/metrics.json``,
    ``per_class.txt``, per-class IoU bars and confusion matrix."""
    run = Path(run_dir)
    written: dict[str, Path] = {}
    for name, drawn in (
        ("training_curves", plot_training_curves(history, run / "plots" / "training_curves.png")),
        ("validation", plot_validation_curve(history, run / "plots" / "validation.png")),
    ):
        if drawn is not None:
            written[name] = drawn
    if best is not None:
        written.update(write_metrics_report(best, run, info, palette, plots_dir=run / "plots"))
    return written
