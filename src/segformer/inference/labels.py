"""Logits → full-resolution labels, exactly as upsample-then-argmax computes them, without
upsampling every class: most pixels' label is decided at low resolution, and only pixels near
a label boundary have their candidate classes interpolated."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from segformer.errors import SegformerError

_VALUES_PER_CHUNK = 1 << 21


def labels_from_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Labels (B, H, W), int64: exactly ``F.interpolate(logits, size, mode="bilinear",
    align_corners=False).argmax(dim=1)``, without upsampling every class.

    Bilinear interpolation is a convex combination of the four surrounding low-resolution
    values, so inside one cell of the low-resolution grid a class's value lies between its
    minimum and maximum over the cell's corners. A class whose corner maximum is below the
    best corner minimum of another class cannot win anywhere in the cell; where only one class
    is left, every pixel of the cell gets it without interpolating. The remaining ("hard")
    pixels, near class boundaries, are interpolated here for their remaining classes only.
    Where two classes come within rounding error of each other, PyTorch's own kernel decides:
    ``F.interpolate`` on just those classes' channels, which gives the same bits per channel
    as interpolating all of them (this holds for the kernel PyTorch uses for NCHW inputs with
    output height + width > 128; other cases take the reference path). All comparisons keep a
    margin that covers the kernel's float32 rounding and index arithmetic, so the result is
    the reference's, ties included (argmax takes the first of equal maxima).

    The work is small and done with numpy, on one thread: many small multi-threaded ops
    would each wait for a busy core on a loaded machine. Float32 NCHW-contiguous logits on
    the CPU take this path; anything else (other dtypes, channels-last or CUDA tensors,
    non-finite values, small outputs) is computed the reference way.
    """
    if logits.ndim != 4:
        raise SegformerError(
            f"logits must be (batch, classes, height, width), got shape {tuple(logits.shape)}"
        )
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise SegformerError(f"output size must be positive, got {size!r}")
    _, classes, h, w = logits.shape
    fast = (
        logits.dtype == torch.float32
        and logits.device.type == "cpu"
        and logits.is_contiguous()
        and logits.numel() > 0
        and classes > 1
        # PyTorch switches to a channels-last kernel, whose rounding depends on a channel's
        # position, for small outputs, 1×1 inputs and (with one thread) three channels.
        and height + width > 128
        and (h, w) != (1, 1)
        and classes != 3
    )
    if not fast:
        return _reference_labels(logits, (height, width))
    with torch.inference_mode():
        values = logits.detach().numpy()
        if not np.isfinite(values).all():
            return _reference_labels(logits, (height, width))
        if (h, w) == (height, width):
            return torch.from_numpy(values.argmax(axis=1))  # the interpolation is the identity here
        rows = _source_positions(h, height)
        cols = _source_positions(w, width)
        return (
            torch.stack([_labels_one(item, rows, cols) for item in values])
            if len(values) > 1
            else _labels_one(values[0], rows, cols)[None]
        )


def _reference_labels(logits: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(dim=1)


def _source_positions(in_size: int, out_size: int) -> tuple[np.ndarray, ...]:
    """For every output index along one axis: the two input indices that bilinear
    interpolation (align_corners=False) reads, the weight of the second, and how far the
    kernel's source position may be from the one used here (zero once ``_kernel_rounding``
    has found out how this machine's kernel computes it)."""
    scale = np.float32(in_size) / np.float32(out_size)
    centres = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    separate = np.maximum(scale * centres - np.float32(0.5), np.float32(0))
    fused = np.maximum(
        (np.float64(scale) * centres.astype(np.float64) - 0.5).astype(np.float32), np.float32(0)
    )
    rounding = _kernel_rounding()
    source = fused if rounding == "fused" else separate
    lower = np.minimum(source.astype(np.int64), in_size - 1)
    upper = np.where(lower < in_size - 1, lower + 1, lower)
    weight = np.clip(source - lower.astype(np.float32), np.float32(0), np.float32(1))
    doubt = np.zeros_like(source) if rounding else np.abs(separate - fused)
    return lower, upper, weight, doubt


@functools.lru_cache(maxsize=1)
def _kernel_rounding() -> str | None:
    """Whether PyTorch's bilinear kernel computes the source position ``scale · (i + 0.5) −
    0.5`` with one rounding ("fused", a fused multiply-add) or two ("separate"); None if a
    probe cannot tell. The compiler decides this, per CPU instruction set, so it is measured:
    rows alternating 0 and 1 upsampled from 128 to 480 rows give each output row's weight
    exactly, and 128 → 480 has rows where the two ways differ."""
    in_size, out_size, width = 128, 480, 129  # width in = out: weights along it are exactly 1, 0
    probe = (
        (torch.arange(in_size) % 2)
        .float()
        .view(1, 1, in_size, 1)
        .expand(1, 1, in_size, width)
        .contiguous()
    )
    with torch.inference_mode():
        observed = F.interpolate(
            probe, size=(out_size, width), mode="bilinear", align_corners=False
        )[0, 0, :, 0].numpy()
    scale = np.float32(in_size) / np.float32(out_size)
    centres = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    matches = []
    for name, source in (
        ("separate", np.maximum(scale * centres - np.float32(0.5), np.float32(0))),
        (
            "fused",
            np.maximum(
                (np.float64(scale) * centres.astype(np.float64) - 0.5).astype(np.float32),
                np.float32(0),
            ),
        ),
    ):
        lower = np.minimum(source.astype(np.int64), in_size - 1)
        weight = np.clip(source - lower.astype(np.float32), np.float32(0), np.float32(1))
        # Row value: the weight of whichever of the two rows holds the 1.
        expected = np.where(lower % 2 == 0, weight, np.float32(1) - weight)
        expected = np.where(lower == in_size - 1, np.float32(1), expected)  # last row (odd) holds 1
        if np.array_equal(expected, observed):
            matches.append(name)
    return matches[0] if len(matches) == 1 else None


def _upsample_classes(
    logits: np.ndarray, classes: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's bilinear upsampling of some classes' channels of one image's logits (K, h, w):
    (the classes, sorted; their upsampled values). Three channels are padded to four, because
    PyTorch may pick a different kernel for exactly three."""
    if classes.size == 3:
        spare = np.setdiff1d(np.arange(logits.shape[0]), classes)[:1]
        classes = np.sort(np.concatenate([classes, spare]))
    channels = torch.from_numpy(np.ascontiguousarray(logits[classes]))[None]
    upsampled = F.interpolate(channels, size=size, mode="bilinear", align_corners=False)
    return classes, upsampled[0].numpy()


def _shift(values: np.ndarray, axis: int) -> np.ndarray:
    """``values`` moved one step back along ``axis``, the last slice repeated (the clamped
    second corner of every cell)."""
    head = [slice(None)] * values.ndim
    tail = [slice(None)] * values.ndim
    head[axis] = slice(1, None)
    tail[axis] = slice(-1, None)
    return np.concatenate([values[tuple(head)], values[tuple(tail)]], axis=axis)


def _labels_one(
    logits: np.ndarray, rows: tuple[np.ndarray, ...], cols: tuple[np.ndarray, ...]
) -> Tensor:
    """``_reference_labels`` for one image's logits (K, h, w), float32 and finite."""
    _, h, w = logits.shape
    row0, row1, row_weight, row_doubt = rows
    col0, col1, col_weight, col_doubt = cols
    height, width = row0.size, col0.size

    # How far a value computed here can be from the kernel's: float32 rounding of the weighted
    # sums on both sides, fused or not (≤ 2⁻²¹ of the largest logit; twice that is kept), plus,
    # where the kernel's source position may differ from ours, that difference times the
    # steepest possible slope.
    largest = max(float(logits.max()), -float(logits.min()))
    rounding = 2.0**-20 * largest
    slope = 2 * largest
    margin = 2 * (rounding + slope * (float(row_doubt.max()) + float(col_doubt.max())))

    # Corner extremes of every cell (r, c): rows r, r+1 and columns c, c+1, clamped at the edge.
    below = _shift(logits, 1)
    high = np.maximum(logits, below)
    low = np.minimum(logits, below)
    high = np.maximum(high, _shift(high, 2))
    low = np.minimum(low, _shift(low, 2))
    floor = low.max(axis=0)  # (h, w): the best value each cell guarantees …
    leader = low.argmax(axis=0)  # … and the class that guarantees it
    candidates = high >= floor - np.float32(margin)  # (K, h, w): classes that might win in the cell
    hard_cells = candidates.sum(axis=0) > 1

    labels = leader[row0][:, col0]  # (H, W)
    if not hard_cells.any():
        return torch.from_numpy(labels)
    hard = hard_cells[row0][:, col0]
    ys, xs = np.nonzero(hard)
    if ys.size > height * width // 8:
        # Boundaries everywhere (e.g. an untrained model): interpolating the involved classes
        # at full size is cheaper than going pixel by pixel.
        involved = np.flatnonzero(candidates[:, hard_cells].any(axis=1))  # sorted class ids
        involved, upsampled = _upsample_classes(logits, involved, (height, width))
        return torch.from_numpy(np.where(hard, involved[upsampled.argmax(axis=0)], labels))

    # Only each hard cell's own candidates are interpolated (about two per pixel on real
    # photos, against every class that is a candidate somewhere): the (pixel, class) pairs are
    # laid out flat, grouped by pixel, classes ascending within a group.
    hard_cell_ids = np.flatnonzero(hard_cells.ravel())
    cell_candidates = candidates.reshape(candidates.shape[0], h * w)[:, hard_cell_ids].T
    candidate_count = cell_candidates.sum(axis=1)
    candidate_start = np.cumsum(candidate_count) - candidate_count
    candidate_class = np.nonzero(cell_candidates)[1]  # by cell, then class
    slot_of_cell = np.zeros(h * w, dtype=np.intp)
    slot_of_cell[hard_cell_ids] = np.arange(hard_cell_ids.size)
    flat = logits.reshape(-1)
    chunk = max(1, _VALUES_PER_CHUNK // int(candidate_count.max()))
    close_y, close_x, contenders = [], [], []
    one = np.float32(1)
    for start in range(0, ys.size, chunk):
        y, x = ys[start : start + chunk], xs[start : start + chunk]
        slot = slot_of_cell[row0[y] * w + col0[x]]
        count = candidate_count[slot]
        group = np.cumsum(count) - count  # where each pixel's pairs begin
        pixel = np.repeat(np.arange(y.size), count)
        within = np.arange(pixel.size) - group[pixel]
        pair_class = candidate_class[candidate_start[slot][pixel] + within]
        py, px = y[pixel], x[pixel]
        plane = pair_class * (h * w)  # where each pair's class starts in ``flat``
        top_row, bottom_row = plane + row0[py] * w, plane + row1[py] * w
        left, right = col0[px], col1[px]
        wy, wx = row_weight[py], col_weight[px]
        # The kernel's arithmetic: weights 1 − λ and λ, columns first, then rows.
        top = flat[top_row + left] * (one - wx) + flat[top_row + right] * wx
        bottom = flat[bottom_row + left] * (one - wx) + flat[bottom_row + right] * wx
        values = top * (one - wy) + bottom * wy
        # Per pixel: the best value, its first pair (argmax takes the lowest class among equal
        # maxima) and the best of the others (equal to the first on a tie).
        first = np.maximum.reduceat(values, group)
        at_first = values == first[pixel]
        winner = np.minimum.reduceat(np.where(at_first, np.arange(pixel.size), pixel.size), group)
        others = values.copy()
        others[winner] = -np.inf
        second = np.maximum.reduceat(others, group)
        tolerance = rounding + slope * (row_doubt[y] + col_doubt[x])
        decided = first - second > 2 * tolerance
        labels[y[decided], x[decided]] = pair_class[winner[decided]]
        if not decided.all():
            close = ~decided
            close_y.append(y[close])
            close_x.append(x[close])
            near = close[pixel] & (values >= (first - 2 * tolerance)[pixel])
            contenders.append(pair_class[near])
    if close_y:
        # Near-ties: PyTorch's kernel decides, on the few classes that came close.
        y, x = np.concatenate(close_y), np.concatenate(close_x)
        close_classes, upsampled = _upsample_classes(
            logits, np.unique(np.concatenate(contenders)), (height, width)
        )
        labels[y, x] = close_classes[upsampled[:, y, x].argmax(axis=0)]
    return torch.from_numpy(labels)
