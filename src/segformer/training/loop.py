"""Fine-tuning and training from scratch: the SegFormer paper's recipe in one readable loop.

    config   TrainConfig (a dataclass; from YAML/TOML and command-line overrides)
    data     open_dataset → pre-flight scan → AugmentedDataset → DataLoader workers
    model    from scratch (a variant), an ImageNet MiT encoder, or any segmentation checkpoint
    optim    AdamW, decoder head lr ×10, no weight decay on norms and biases;
             linear warm-up then polynomial decay, stepped per optimizer step
    loop     autocast → cross-entropy over valid pixels → backward (accumulated) → clip → step
    around   validation (mIoU from one confusion matrix), atomic checkpoints with everything
             needed to continue exactly, TensorBoard, tqdm, plots, export of the best model

Runs survive: a checkpoint holds the model, optimizer, scheduler, scaler, every RNG state and
the data position (epoch + batches consumed). Data order and augmentation are functions of
(seed, epoch, index), so ``resume`` continues with exactly the batches an uninterrupted run
would have seen; on CPU with ``deterministic=True`` the final weights are bit-identical.

Distributed: under ``torchrun`` each process trains on its share of every epoch (gloo on CPU,
nccl on GPU), validation sums the processes' confusion matrices, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import logging
import math
import os
import random
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from segformer.errors import DataError, SegformerError
from segformer.models.config import VARIANTS, SegformerConfig
from segformer.models.metadata import ModelMetadata
from segformer.models.segformer import SegformerForSemanticSegmentation
from segformer.training import reports
from segformer.training.config import TrainConfig, read_config_file
from segformer.training.datacheck import scan
from segformer.training.datasets import (
    AugmentedDataset,
    HFSegmentationDataset,
    SegmentationDataset,
    eval_loader,
    open_dataset,
    train_loader,
)
from segformer.training.files import read_labels_file
from segformer.training.metrics import SegmentationMetrics, evaluate
from segformer.training.transforms import IGNORE_INDEX, TrainTransform

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "read_config_file", "train"]

log = logging.getLogger("segformer")

CHECKPOINT_FORMAT = "segformer-train-checkpoint"
CHECKPOINT_VERSION = 1


class TrainingDiverged(SegformerError):
    """The loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------
# Recipe pieces
# ---------------------------------------------------------------------------------------
@dataclass
class WarmupPolySchedule:
    """Learning-rate factor at optimizer step ``step`` for one parameter group: polynomial
    decay from the base rate to ``min_lr`` over ``max_steps``, multiplied during the first
    ``warmup_steps`` by a linear ramp from ``warmup_ratio`` to 1 (mmseg's poly + linear
    warm-up). With ``restarts``, the decay runs in cycles: at each restart step the rate jumps
    back to ``restart_lr`` × the base rate and decays again, reaching ``min_lr`` at the next
    restart or at ``max_steps`` (a warm restart lets a run that has converged at a low rate
    leave that minimum and settle into a better one). Used as a ``LambdaLR`` lambda, so its
    fields travel in the scheduler state."""

    base_lr: float
    max_steps: int
    warmup_steps: int = 0
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0
    restarts: tuple[int, ...] = ()
    restart_lr: float = 0.5

    def __call__(self, step: int) -> float:
        step = min(step, self.max_steps)
        start, end, peak = 0, self.max_steps, self.base_lr
        for restart in self.restarts:
            if step >= restart:
                start, peak = restart, self.restart_lr * self.base_lr
            else:
                end = restart
                break
        progress = (step - start) / (end - start)
        lr = (peak - self.min_lr) * (1.0 - progress) ** self.power + self.min_lr
        if step < self.warmup_steps:
            lr *= 1.0 - (1.0 - step / self.warmup_steps) * (1.0 - self.warmup_ratio)
        return lr / self.base_lr if self.base_lr else 0.0


def schedules(config: TrainConfig, optimizer: torch.optim.Optimizer) -> list[WarmupPolySchedule]:
    """One schedule per parameter group, from the group's initial learning rate."""
    return [
        WarmupPolySchedule(
            group.get("initial_lr", group["lr"]),
            config.max_steps,
            config.warmup_steps,
            config.warmup_ratio,
            config.poly_power,
            config.min_lr,
            tuple(config.restarts),
            config.restart_lr,
        )
        for group in optimizer.param_groups
    ]


_NORMS = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm, nn.SyncBatchNorm)


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float
) -> list[dict[str, Any]]:
    """Encoder and decoder head, each split into decayed weights and undecayed norms/biases.
    The head (everything in ``decode_head``) learns ``head_lr_mult`` times faster."""
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)
    }
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "head" if name.startswith("decode_head.") else "encoder"
        decay = not (id(param) in norm_params or name.endswith(".bias"))
        groups.setdefault((part, decay), []).append(param)
    result = []
    for (part, decay), params in sorted(groups.items()):
        result.append(
            {
                "name": f"{part}{'' if decay else ' (no decay)'}",
                "params": params,
                "lr": lr * (head_lr_mult if part == "head" else 1.0),
                "weight_decay": weight_decay if decay else 0.0,
            }
        )
    return result


def segmentation_loss(
    logits: Tensor,
    labels: Tensor,
    class_weights: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Cross-entropy of logits upsampled (bilinear) to the label size, summed over labelled
    pixels (weighted by class when weights are given) and divided by their number.

    Computed in float32 a band of rows at a time, gradient included (see
    ``_UpsampledCrossEntropy``), so the full-resolution logits never exist all at once."""
    total = _UpsampledCrossEntropy.apply(logits, labels, class_weights, ignore_index)
    return total / (labels != ignore_index).sum().clamp(min=1)


# Full-resolution logits (float32 elements) per band: a few MB, so a band's upsampled logits,
# softmax and gradient stay in cache instead of streaming gigabytes through memory.
_LOSS_BAND_ELEMENTS = 1 << 20


_LOSS_CHANNELS_LAST_FROM = 16


def _label_rows(upsampled: Tensor, channels_last: bool, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of a (1, K, R, W) map as a view: (rows, W, K) when it is
    channels-last, else (K, rows, W)."""
    if channels_last:
        return upsampled[0].permute(1, 2, 0)[start:stop]
    return upsampled[0, :, start:stop]


class _UpsampledCrossEntropy(torch.autograd.Function):
    """Σ over labelled pixels of weight[y]·−log softmax(upsample(logits))[y], and its gradient
    with respect to ``logits``, both computed in the forward pass band by band.

    Upsampling every class to label size, then log-softmax, then their gradients, moves the
    whole (B, K, H, W) tensor through memory several times: with 150 classes that was two
    thirds of a training step. Here each band of label rows is upsampled from the few logit
    rows it needs (bilinear with align_corners=False reads at most one row beyond each end),
    and the band's loss and gradient are computed while it is in cache; ``backward`` only
    scales the stored gradient. Bands split the height only when it is an exact multiple of
    the logits' (as for crops divisible by 4), which keeps every band's sampling positions
    those of the whole image; otherwise each image is one band."""

    @staticmethod
    def forward(ctx, logits, labels, class_weights, ignore_index):  # type: ignore[override]
        batch, classes, height, width = logits.shape
        out_height, out_width = labels.shape[-2:]
        scale, remainder = divmod(out_height, height)
        rows = height
        if remainder == 0 and scale >= 1:
            rows = max(1, _LOSS_BAND_ELEMENTS // (classes * scale * out_width))
        gradient = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        weight = None if class_weights is None else class_weights.float()
        # Many classes: channels-last, where resampling and its gradient vectorise over the
        # classes (3-6× faster than planar at 150) and the softmax reads them contiguously.
        # Few classes: planar, where those vectorise over pixels instead.
        channels_last = classes >= _LOSS_CHANNELS_LAST_FROM
        class_dim = -1 if channels_last else 0  # of a band as _label_rows gives it
        for image in range(batch):
            for top in range(0, height, rows):
                bottom = min(top + rows, height)
                first, last = max(top - 1, 0), min(bottom + 1, height)  # the logit rows read
                if rows == height:
                    target, size, offset = labels[image], (out_height, out_width), 0
                else:
                    target = labels[image, top * scale : bottom * scale]
                    size, offset = ((last - first) * scale, out_width), (top - first) * scale
                valid = target != ignore_index
                if not valid.any():
                    continue
                part = logits[image : image + 1, :, first:last].float()
                if channels_last:
                    part = part.contiguous(memory_format=torch.channels_last)
                upsampled = F.interpolate(part, size=size, mode="bilinear", align_corners=False)
                stop = offset + target.shape[0]
                band = _label_rows(upsampled, channels_last, offset, stop)
                log_probabilities = band.log_softmax(dim=class_dim)
                safe = torch.where(valid, target, 0)  # ignored pixels point at class 0, weight 0
                pixel_weight = valid.float() if weight is None else weight[safe] * valid
                safe, pixel_weight = safe.unsqueeze(class_dim), pixel_weight.unsqueeze(class_dim)
                total -= (log_probabilities.gather(class_dim, safe) * pixel_weight).sum()
                # d loss / d band = weight[y]·(softmax − one-hot(y)) at labelled pixels.
                band_gradient = log_probabilities.exp_().mul_(pixel_weight)
                band_gradient.scatter_add_(class_dim, safe, -pixel_weight)
                upsampled_gradient = torch.zeros_like(upsampled)
                _label_rows(upsampled_gradient, channels_last, offset, stop).copy_(band_gradient)
                gradient[image : image + 1, :, first:last] += (
                    torch.ops.aten.upsample_bilinear2d_backward(
                        upsampled_gradient, list(size), [1, classes, last - first, width], False
                    )
                )
        ctx.save_for_backward(gradient)
        ctx.logits_dtype = logits.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (gradient,) = ctx.saved_tensors
        return (gradient * grad_output).to(ctx.logits_dtype), None, None, None


# ---------------------------------------------------------------------------------------
# Processes, devices, randomness
# ---------------------------------------------------------------------------------------
@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """The process's place in a torchrun job (or a single process) and its device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise SegformerError(f"device {device_name!r} requested but CUDA is not available")
    if world_size > 1:
        info = Distributed(
            int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0"))
        )
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(info.local_rank)
            return info, torch.device("cuda", info.local_rank)
        return info, torch.device("cpu")
    if cuda:
        return Distributed(), torch.device(
            device_name if device_name.startswith("cuda") else "cuda"
        )
    return Distributed(), torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's global RNG states, in plain types (loadable with weights_only=True)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": position,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(
        device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16
    )


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------
def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write the checkpoint through a temporary file beside ``path`` that is renamed into
    place: a kill at any moment leaves either the complete new file or none."""
    from segformer.inference.segmenter import write_atomic

    write_atomic(path, lambda file: torch.save(state, file))


def remove_partial_checkpoints(folder: Path) -> None:
    """Temporary files of checkpoint writes that a kill interrupted."""
    if folder.is_dir():
        for leftover in folder.glob(".step-*.tmp*"):
            leftover.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or foreign files
        raise SegformerError(
            f"{path}: not a readable training checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SegformerError(f"{path}: not a segformer training checkpoint")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise SegformerError(
            f"{path}: written by a newer segformer (checkpoint version {state['version']})"
        )
    return state


_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found)


def find_resume_checkpoint(target: str | os.PathLike[str]) -> Path:
    """A checkpoint file, or the latest one of a run folder."""
    path = Path(target)
    if path.is_file():
        return path
    for folder in (path / "checkpoints", path):
        found = list_checkpoints(folder)
        if found:
            return found[-1][1]
    raise SegformerError(f"{path}: no checkpoint to resume from (looked for checkpoints/step-*.pt)")


# ---------------------------------------------------------------------------------------
# Building the pieces of a run
# ---------------------------------------------------------------------------------------
def is_variant(name: str) -> bool:
    return name.lower().removeprefix("mit-").removeprefix("mit_") in VARIANTS


def open_split(
    config: TrainConfig, split: str, include: list[str] = (), exclude: list[str] = ()
) -> SegmentationDataset:
    """Split ``split`` of the run's data; ``a+b`` joins splits (train+val), and file-name
    patterns keep (``include``) or drop (``exclude``) images, so that, e.g., one whole
    recording can be held out for validation."""
    parts = [
        open_dataset(
            config.data,
            config.format,
            name,
            reduce_labels=config.reduce_labels,
            image_column=config.image_column,
            mask_column=config.mask_column,
            background=config.background,
        )
        for name in split.split("+")
    ]
    dataset = parts[0]
    if len(parts) == 1 and not include and not exclude:
        return dataset
    if any(isinstance(part, HFSegmentationDataset) for part in parts):
        raise SegformerError("joining splits or filtering files needs a file-based format")
    pairs = [pair for part in parts for pair in part.pairs]
    if include:
        pairs = [p for p in pairs if any(fnmatch.fnmatch(p[0].name, g) for g in include)]
    pairs = [p for p in pairs if not any(fnmatch.fnmatch(p[0].name, g) for g in exclude)]
    if not pairs:
        raise DataError(f"{config.data} [{split}]: no images left after the file-name filters")
    name = f"{config.data} [{split}" + (f" {' '.join(include)}" if include else "")
    name += (f" without {' '.join(exclude)}" if exclude else "") + "]"
    return dataclasses.replace(dataset, name=name, pairs=pairs)


def resolve_labels(
    config: TrainConfig, dataset: SegmentationDataset
) -> tuple[list[str] | None, list[list[int]] | None, str]:
    """Class names and colours, and where they came from: a labels JSON, the dataset format,
    or (when neither has them) the starting checkpoint."""
    if config.labels:
        names, palette = read_labels_file(config.labels)
        return names, palette, config.labels
    if dataset.labels:
        return list(dataset.labels), dataset.palette, f"the {config.format} format"
    if not is_variant(config.model):
        import segformer

        try:
            start = segformer.load(config.model, task="semantic-segmentation")
        except SegformerError:
            start = None  # an encoder-only checkpoint has no labels of its own
        if start is not None:
            return list(start.labels), start.metadata.palette, config.model
    return None, None, ""


def build_model(config: TrainConfig, labels: list[str]) -> SegformerForSemanticSegmentation:
    """A fresh model (``config.model`` is a variant) or one started from a checkpoint, with a
    classifier for ``labels`` (made anew, near zero, when the checkpoint's label set differs)."""
    import segformer

    overrides = {} if config.drop_path_rate is None else {"drop_path_rate": config.drop_path_rate}
    torch.manual_seed(config.seed)
    if is_variant(config.model):
        return SegformerForSemanticSegmentation(
            SegformerConfig.from_variant(config.model, labels=labels, **overrides)
        )
    try:
        model = segformer.load(config.model, task="semantic-segmentation", **overrides)
    except SegformerError:  # an encoder-only checkpoint needs the label count to load
        return segformer.load(
            config.model, labels=labels, task="semantic-segmentation", **overrides
        )
    if model.config.num_labels != len(labels):
        return segformer.load(
            config.model, labels=labels, task="semantic-segmentation", **overrides
        )
    if model.labels != list(labels):  # same count: only the names change
        model.config = model.config.with_labels(list(labels))
    return model


def resolve_class_weights(config: TrainConfig, report: Any, num_labels: int) -> list[float] | None:
    if config.class_weights is None:
        return None
    if isinstance(config.class_weights, str):
        if report is None:
            raise SegformerError(
                "class_weights from the data need the pre-flight scan (preflight: true)"
            )
        return report.class_weights(config.class_weights)
    if len(config.class_weights) != num_labels:
        raise SegformerError(
            f"config: class_weights has {len(config.class_weights)} values for {num_labels} classes"
        )
    return [float(w) for w in config.class_weights]


def inference_mode(config: TrainConfig) -> Any:
    from segformer.inference.modes import InferenceMode

    if config.eval_mode == "slide":
        return InferenceMode(
            "slide", crop_size=config.eval_crop_size or config.crop_size, stride=config.eval_stride
        )
    return InferenceMode("whole")


def image_processor(config: TrainConfig) -> Any:
    """How validation (and, through the exported preprocessor_config.json, every later
    prediction) turns an image into pixel values: a keep-ratio resize into ``eval_scale``, a
    fixed ``eval_size``, or the native size."""
    from segformer.inference.processing import ImageProcessor

    if config.eval_size:
        return ImageProcessor(do_resize=True, size=tuple(config.eval_size))
    if config.eval_scale:
        return ImageProcessor(
            do_resize=True,
            keep_ratio=True,
            scale=tuple(config.eval_scale),
            size_divisor=32,
            size=tuple(config.crop_size),
        )
    return ImageProcessor(do_resize=False, size=tuple(config.crop_size))


class BatchStream:
    """Endless training batches, epoch after epoch, remembering the position (epoch and
    batches consumed in it) that a checkpoint needs to continue from the next batch."""

    def __init__(
        self,
        loader: torch.utils.data.DataLoader,
        sampler: Any,
        batch_size: int,
        epoch: int,
        batches_done: int,
    ):
        self.loader, self.sampler, self.batch_size = loader, sampler, batch_size
        self.epoch, self.batches_done = epoch, batches_done
        self._iterator: Iterator | None = None

    def __next__(self) -> dict[str, Tensor]:
        while True:
            if self._iterator is None:
                self.sampler.set_epoch(self.epoch, skip=self.batches_done * self.batch_size)
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch, self.batches_done = self.epoch + 1, 0
                continue
            self.batches_done += 1
            return batch

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}


class WeightAverage:
    """An exponential moving average of a model's parameters (Polyak averaging, as in timm's
    ModelEmaV2). The decay ramps up as ``(1 + n) / (10 + n)`` over the first updates so the
    average is not anchored to the random initialisation; buffers (BatchNorm statistics) are
    copied from the trained model, not averaged."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged = [p for p in self.model.parameters()]
        current = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(averaged, current, 1.0 - decay)

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        for mine, theirs in zip(self.model.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, Any]:
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return {"weights": weights, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["weights"])
        self.updates = int(state["updates"])


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best_step: int | None
    best_metrics: SegmentationMetrics | None
    final_metrics: SegmentationMetrics | None
    history: dict[str, list[dict[str, float]]]


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------
def train(
    config: TrainConfig,
    resume: str | os.PathLike[str] | bool = False,
    overrides: dict[str, Any] | None = None,
) -> TrainResult:
    """Train as ``config`` says. ``resume``: True (the latest checkpoint of
    ``config.output_dir``), a run folder, or a checkpoint file; the run's saved config is then
    used, with ``overrides`` (settings given explicitly this time) applied on top."""
    # -- where we start from ----------------------------------------------------------------
    checkpoint, checkpoint_path = None, None
    if resume:
        checkpoint_path = find_resume_checkpoint(config.output_dir if resume is True else resume)
        checkpoint = load_checkpoint(checkpoint_path)
        saved = TrainConfig.from_dict(checkpoint["train_config"])
        config = TrainConfig.from_dict(overrides or {}, base=saved)
        changed = [
            f"{k}: {getattr(saved, k)!r} → {getattr(config, k)!r}"
            for k in (overrides or {})
            if getattr(saved, k.replace("-", "_")) != getattr(config, k.replace("-", "_"))
        ]
        if changed:
            log.warning(
                "resuming with changed settings (no longer an exact continuation): %s",
                "; ".join(changed),
            )

    process, device = setup_distributed(config.device)
    if config.precision == "fp16" and device.type != "cuda":
        raise SegformerError("fp16 training needs a CUDA device; use precision bf16 on CPU")
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        # CUDA has no deterministic bilinear-upsampling backward: warn there instead of failing.
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    run_dir = Path(config.output_dir)
    checkpoint_dir = run_dir / "checkpoints"
    if checkpoint is None and list_checkpoints(checkpoint_dir):
        raise SegformerError(
            f"{run_dir} already holds checkpoints: pass --resume to continue that run, or choose another output_dir"
        )
    if process.is_main:
        remove_partial_checkpoints(checkpoint_dir)

    # -- data ---------------------------------------------------------------------------------
    train_set = open_split(config, config.train_split, exclude=config.train_exclude)
    val_set = (
        open_split(config, config.val_split, include=config.val_include)
        if config.val_split
        else None
    )
    if checkpoint is not None:
        labels, palette = list(checkpoint["labels"]), checkpoint.get("palette")
    else:
        labels, palette, label_source = resolve_labels(config, train_set)
        if labels is None:
            report = scan(train_set, num_labels=IGNORE_INDEX)  # any id is fine: we learn the count
            present = np.nonzero(report.class_pixels)[0]
            if not len(present):
                raise DataError(f"{train_set.name}: every mask is entirely ignored")
            labels = [f"class_{i}" for i in range(int(present.max()) + 1)]
            log.warning(
                "no class names given (labels: a JSON file): using %d generic ones", len(labels)
            )
        else:
            log.info("%d classes, named by %s", len(labels), label_source)
    report = None
    if config.preflight:
        started = time.perf_counter()
        report = scan(train_set, len(labels))
        if val_set is not None:
            scan(val_set, len(labels))
        checked = f"{len(train_set)} training" + (
            f" and {len(val_set)} validation" if val_set else ""
        )
        log.info("pre-flight: %s images checked in %.1f s", checked, time.perf_counter() - started)
    class_weights = resolve_class_weights(config, report, len(labels))

    transform = TrainTransform(
        crop_size=tuple(config.crop_size),
        scale=tuple(config.scale) if config.scale else None,
        ratio_range=tuple(config.ratio_range),
        cat_max_ratio=config.cat_max_ratio,
        flip_prob=config.flip_prob,
        photometric=config.photometric,
        lighting=config.lighting,
    )
    loader, sampler = train_loader(
        AugmentedDataset(train_set, transform, config.seed),
        config.batch_size,
        config.num_workers,
        config.seed,
        process.rank,
        process.world_size,
        pin_memory=device.type == "cuda",
    )
    val_loader = (
        eval_loader(val_set, config.num_workers, process.rank, process.world_size)
        if val_set
        else None
    )

    # -- model and optimisation -------------------------------------------------------------
    if checkpoint is not None:
        model = SegformerForSemanticSegmentation(
            SegformerConfig.from_hf_dict(checkpoint["model_config"])
        )
        model.load_state_dict(checkpoint["model"])
    else:
        model = build_model(config, labels)
    model.metadata = _export_metadata(config, palette, None, 0)
    model.to(device).train()
    # The averaged weights are what validation sees and what is exported; the optimiser
    # trains ``model``.
    ema = WeightAverage(model, config.ema_decay) if config.ema_decay else None
    if ema is not None and checkpoint is not None and "ema" in checkpoint:
        ema.load_state_dict(checkpoint["ema"])
    evaluated = ema.model if ema is not None else model
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.lr, config.weight_decay, config.head_lr_mult),
        lr=config.lr,
        betas=tuple(config.betas),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules(config, optimizer))
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    weights = (
        torch.tensor(class_weights, dtype=torch.float32, device=device) if class_weights else None
    )

    step, epoch, batches_done = 0, 0, 0
    best: dict[str, Any] = {"mIoU": None, "step": None, "confusion": None}
    history: dict[str, list[dict[str, float]]] = {"train": [], "val": []}
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        # The schedule is a function of the step and of this run's settings (which may extend
        # max_steps); the saved state only says where we are.
        scheduler.lr_lambdas = schedules(config, optimizer)
        for group, base_lr, schedule in zip(
            optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base_lr * schedule(scheduler.last_epoch)
        scaler.load_state_dict(checkpoint["scaler"])
        step = checkpoint["step"]
        epoch, batches_done = checkpoint["data"]["epoch"], checkpoint["data"]["batches_done"]
        best, history = checkpoint["best"], checkpoint["history"]
        states = checkpoint["rng"]
        if len(states) == process.world_size:
            set_rng_state(states[process.rank])
        else:
            log.warning(
                "resuming on %d processes a run saved on %d: random streams restart",
                process.world_size,
                len(states),
            )
            seed_everything(config.seed + step + process.rank)
        log.info("resumed from %s at step %d", checkpoint_path, step)
    else:
        seed_everything(
            config.seed + process.rank
        )  # each process its own dropout / drop-path stream

    trained: nn.Module = model
    if process.active:
        if device.type == "cuda":
            trained = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        trained = nn.parallel.DistributedDataParallel(
            trained, device_ids=[device.index] if device.type == "cuda" else None
        )
    batches = BatchStream(loader, sampler, config.batch_size, epoch, batches_done)
    writer = None
    if process.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
        writer = _tensorboard(run_dir)

    def validate() -> SegmentationMetrics:
        from segformer.inference.segmenter import Segmenter

        _sync_buffers(model, process)
        if ema is not None:
            ema.copy_buffers(model)
        # Exactly the prediction path: the processor and inference mode the exported model keeps.
        segmenter = Segmenter(
            evaluated,
            image_processor(config),
            device=str(device),
            backend="auto",
            mode=inference_mode(config),
            max_pixels=None,
        )
        metrics = evaluate(segmenter, val_loader, labels)
        model.train()
        if ema is not None:
            ema.model.eval()
        summary = metrics.summary()
        history["val"].append({"step": step, **summary})
        if best["mIoU"] is None or summary["mIoU"] > best["mIoU"]:
            best.update(
                {"mIoU": summary["mIoU"], "step": step, "confusion": metrics.confusion.tolist()}
            )
            if process.is_main:
                export("best", metrics)
        if writer is not None:
            for key, value in summary.items():
                writer.add_scalar(f"val/{key}", value, step)
            for name, iou in zip(metrics.labels, metrics.iou, strict=True):
                if not math.isnan(iou):
                    writer.add_scalar(f"val_iou/{name}", 100 * iou, step)
        if process.is_main:
            progress.write(
                f"step {step}: val mIoU {summary['mIoU']:.2f}  mAcc {summary['mAcc']:.2f}  aAcc {summary['aAcc']:.2f}"
                f"  (best {best['mIoU']:.2f} at step {best['step']})"
            )
        return metrics

    def checkpoint_state() -> dict[str, Any]:
        _sync_buffers(model, process)
        rng = [rng_state()]
        if process.active:
            rng = [None] * process.world_size
            dist.all_gather_object(rng, rng_state())
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            **({"ema": ema.state_dict()} if ema is not None else {}),
            "model_config": model.config.to_hf_dict(),
            "labels": labels,
            "palette": palette,
            "train_config": dataclasses.asdict(config),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng,
            "data": batches.position(),
            "best": best,
            "history": history,
        }

    def save_and_prune(state: dict[str, Any]) -> None:
        save_checkpoint(state, checkpoint_dir / f"step-{step:07d}.pt")
        keep = {path for _, path in list_checkpoints(checkpoint_dir)[-config.keep_checkpoints :]}
        if best["step"] is not None:
            keep.add(checkpoint_dir / f"step-{best['step']:07d}.pt")
        for _, path in list_checkpoints(checkpoint_dir):
            if path not in keep:
                path.unlink(missing_ok=True)

    def export(folder: str, metrics: SegmentationMetrics | None) -> None:
        import segformer

        if ema is not None:
            ema.copy_buffers(model)
        evaluated.metadata = _export_metadata(config, palette, metrics, step)
        segformer.save(evaluated, run_dir / folder)

    # -- the loop ---------------------------------------------------------------------------
    images_per_step = config.batch_size * config.grad_accum_steps * process.world_size
    progress = _progress(config.max_steps, step, process.is_main)
    running_loss, running_count = torch.zeros((), device=device), 0
    window_start, window_step = time.perf_counter(), step
    last_metrics: SegmentationMetrics | None = None
    saved_step, validated_step = (step if checkpoint is not None else None), None
    while step < config.max_steps:
        for micro in range(config.grad_accum_steps):
            batch = next(batches)
            pixel_values = batch["pixel_values"].to(device, non_blocking=True)
            target = batch["labels"].to(device, non_blocking=True)
            # Under DDP, gradients are averaged across processes only on the last micro-batch.
            accumulate_only = process.active and micro < config.grad_accum_steps - 1
            with trained.no_sync() if accumulate_only else contextlib.nullcontext():
                with autocast(device, config.precision):
                    logits = trained(pixel_values)
                loss = segmentation_loss(logits, target, weights)
                _stop_if_diverged(loss, step, process, checkpoint_dir)
                scaler.scale(loss / config.grad_accum_steps).backward()
            running_loss += loss.detach()
            running_count += 1
        if config.clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
        lr = optimizer.param_groups[0]["lr"]  # the encoder's rate for this step
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema is not None:
            ema.update(model)
        step += 1
        progress.update(1)

        if step % config.log_interval == 0 or step == config.max_steps:
            mean_loss = _mean_across(running_loss / running_count, process)
            speed = (
                images_per_step
                * (step - window_step)
                / max(time.perf_counter() - window_start, 1e-9)
            )
            history["train"].append(
                {"step": step, "loss": mean_loss, "lr": lr, "images_per_s": speed}
            )
            if writer is not None:
                writer.add_scalar("train/loss", mean_loss, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/images_per_s", speed, step)
            progress.set_postfix(
                loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}", epoch=batches.epoch
            )
            running_loss, running_count = torch.zeros((), device=device), 0
            window_start, window_step = time.perf_counter(), step
        if val_loader is not None and config.eval_interval and step % config.eval_interval == 0:
            last_metrics, validated_step = validate(), step
        # A new best is checkpointed too, so the best weights can always be resumed from.
        if (
            step % config.checkpoint_interval == 0
            or step == config.max_steps
            or best["step"] == step
        ):
            state = checkpoint_state()
            if process.is_main:
                save_and_prune(state)
            saved_step = step
    progress.close()

    # -- the end ------------------------------------------------------------------------------
    if val_loader is not None and validated_step != step:
        last_metrics = validate()
        if saved_step == step:  # the final checkpoint should know this result
            state = checkpoint_state()  # a collective: every process takes part
            if process.is_main:
                save_and_prune(state)
    best_metrics = (
        SegmentationMetrics(labels, np.asarray(best["confusion"], dtype=np.int64))
        if best["confusion"]
        else None
    )
    if process.is_main:
        export("last", last_metrics)
        if val_loader is None:
            export("best", None)
        reports.write_json(history, run_dir / "history.json")
        about = {
            "step": best["step"],
            "data": config.data,
            "format": config.format,
            "split": config.val_split,
            "mode": inference_mode(config).describe(),
        }
        reports.write_training_report(run_dir, history, best_metrics, about, palette)
        if writer is not None:
            writer.close()
        if best_metrics is not None:
            log.info("best validation, step %s:\n%s", best["step"], best_metrics.table())
        log.info("run folder: %s (best model: %s)", run_dir, run_dir / "best")
    if process.active:
        dist.barrier()
    return TrainResult(run_dir, step, best["step"], best_metrics, last_metrics, history)


# ---------------------------------------------------------------------------------------
# Loop helpers
# ---------------------------------------------------------------------------------------
def _sync_buffers(model: nn.Module, process: Distributed) -> None:
    """Give every process rank 0's BatchNorm statistics, so evaluation and the saved model
    agree across processes (DDP syncs buffers only at the start of a forward pass)."""
    if process.active:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def _mean_across(value: Tensor, process: Distributed) -> float:
    if process.active:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= process.world_size
    return float(value)


def _stop_if_diverged(loss: Tensor, step: int, process: Distributed, checkpoint_dir: Path) -> None:
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if process.active:  # every process stops together, none waits forever in a collective
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        saved = list_checkpoints(checkpoint_dir)
        keep = (
            f"the last good checkpoint is {saved[-1][1]}"
            if saved
            else "no checkpoint was saved yet"
        )
        raise TrainingDiverged(
            f"loss is {float(loss.detach())} at step {step + 1}: training diverged; {keep} "
            "(resume from it with a lower lr, fp32, or clip_grad_norm)"
        )


def _export_metadata(
    config: TrainConfig, palette: Any, metrics: SegmentationMetrics | None, step: int
) -> ModelMetadata:
    metadata = ModelMetadata(
        preprocessing=image_processor(config).to_dict(), palette=palette or None
    )
    if metrics is not None:
        metadata.metrics = {
            "dataset": f"{config.format}:{config.data}",
            "split": config.val_split,
            "mode": config.eval_mode,
            **{k: round(v, 4) for k, v in metrics.summary().items()},
            "per_class_IoU": {
                n: (None if math.isnan(v) else round(100 * v, 4))
                for n, v in zip(metrics.labels, metrics.iou, strict=True)
            },
        }
    metadata.training = {
        "steps": step,
        "model": config.model,
        "recipe": dataclasses.asdict(config),
    }
    return metadata


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no event files will be written")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
        file=sys.stderr,
    )
