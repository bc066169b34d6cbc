"""Fine-tuning and training from scratch: the SegFormer paper's recipe in one readable loop.

    config   TrainConfig (a dataclass; from YAML/TOML and command-line overrides)
    data     open_dataset → pre-flight scan → AugmentedDataset → DataLoader workers
    model    from scratch (a variant), an ImageNet MiT encoder, or any segmentation checkpoint
    optim    AdamW, decoder head lr ×10, no weight decay on norms and biases;
             linear warm-up then polynomial decay, stepped per optimizer step
    loop     autocast → cross-entropy over valid pixels → backward (accumulated) → clip → step
    around   validation (mIoU from one confusion matrix), atomic checkpoints with everything
             needed to continue exactly, TensorBoard, tqdm, plots, export of the best model

``train`` reads top to bottom: where to start from, the data, the model and its optimiser
(a ``Learner``), then the loop, whose progress lives in one ``RunState`` (step, data
position, best result, history) that checkpoints save and restore. The loss is in
``training.loss``, checkpoint files in ``training.checkpointing``, processes in
``training.distributed``.

Runs survive: a checkpoint holds the model, optimizer, scheduler, scaler, every RNG state and
the data position (epoch + batches consumed). Data order and augmentation are functions of
(seed, epoch, index), so ``resume`` continues with exactly the batches an uninterrupted run
would have seen; on CPU with ``deterministic=True`` the final weights are bit-identical. A run
killed before its first checkpoint was complete resumes from step 0 with its saved config;
files whose writing a kill interrupted are removed when a run starts in the folder.

Distributed: under ``torchrun`` each process trains on its share of every epoch (gloo on CPU,
nccl on GPU), validation sums the processes' confusion matrices, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

import segformer
from segformer.errors import DataError, SegformerError, TrainingDiverged
from segformer.inference.modes import InferenceMode
from segformer.inference.processing import ImageProcessor
from segformer.inference.segmenter import Segmenter
from segformer.models.config import VARIANTS, SegformerConfig
from segformer.models.metadata import ModelMetadata
from segformer.models.segformer import SegformerForSemanticSegmentation
from segformer.training import reports
from segformer.training.checkpointing import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    all_rng_states,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_interrupted_writes,
    restore_rng,
    save_and_prune,
    seed_everything,
)
from segformer.training.config import TrainConfig, read_config_file
from segformer.training.datacheck import scan
from segformer.training.datasets import (
    AugmentedDataset,
    SegmentationDataset,
    eval_loader,
    loader_batches,
    open_splits,
    train_loader,
)
from segformer.training.distributed import (
    Distributed,
    all_true,
    mean_across,
    setup_distributed,
    sync_buffers,
)
from segformer.training.files import read_labels_file
from segformer.training.loss import segmentation_loss
from segformer.training.metrics import SegmentationMetrics, evaluate
from segformer.training.transforms import IGNORE_INDEX, TrainTransform

__all__ = [
    "RunState",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "read_config_file",
    "segmentation_loss",
    "train",
]

log = logging.getLogger("segformer")


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


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(
        device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16
    )


# ---------------------------------------------------------------------------------------
# Building the pieces of a run
# ---------------------------------------------------------------------------------------
def is_variant(name: str) -> bool:
    return name.lower().removeprefix("mit-").removeprefix("mit_") in VARIANTS


def open_split(
    config: TrainConfig, split: str, include: list[str] = (), exclude: list[str] = ()
) -> SegmentationDataset:
    """Split ``split`` of the run's data (``a+b`` joins splits; see ``open_splits`` for the
    file-name filters)."""
    return open_splits(
        config.data,
        config.format,
        split,
        include=include,
        exclude=exclude,
        reduce_labels=config.reduce_labels,
        image_column=config.image_column,
        mask_column=config.mask_column,
        background=config.background,
    )


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

    if config.eval_mode == "slide":
        return InferenceMode(
            "slide", crop_size=config.eval_crop_size or config.crop_size, stride=config.eval_stride
        )
    return InferenceMode("whole")


def image_processor(config: TrainConfig) -> Any:
    """How validation (and, through the exported preprocessor_config.json, every later
    prediction) turns an image into pixel values: a keep-ratio resize into ``eval_scale``, a
    fixed ``eval_size``, or the native size."""

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
    """Endless training batches, epoch after epoch. The position (epoch and batches consumed
    in it) that a checkpoint needs to continue from the next batch is kept in the run's
    ``RunState``."""

    def __init__(
        self,
        loader: torch.utils.data.DataLoader,
        sampler: Any,
        batch_size: int,
        position: RunState,
    ):
        self.loader, self.sampler, self.batch_size = loader, sampler, batch_size
        self.position = position
        self._iterator: Iterator | None = None

    def __next__(self) -> dict[str, Tensor]:
        position = self.position
        while True:
            if self._iterator is None:
                self.sampler.set_epoch(position.epoch, skip=position.batches_done * self.batch_size)
                self._iterator = loader_batches(self.loader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                position.epoch, position.batches_done = position.epoch + 1, 0
                continue
            position.batches_done += 1
            return batch


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


# ---------------------------------------------------------------------------------------
# The state of a run
# ---------------------------------------------------------------------------------------
def _no_best() -> dict[str, Any]:
    return {"mIoU": None, "step": None, "confusion": None}


@dataclass
class RunState:
    """Where a run is. ``step``: optimizer steps done; ``epoch`` / ``batches_done``: the data
    position (batches consumed in that epoch); ``best``: the best validation (mIoU, step,
    confusion counts); ``history``: the logged training and validation records. These are
    what a checkpoint saves beside the weights. ``saved_step`` / ``validated_step``: the last
    step this process checkpointed / validated at, so the end of the run does neither twice."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    best: dict[str, Any] = field(default_factory=_no_best)
    history: dict[str, list[dict[str, float]]] = field(
        default_factory=lambda: {"train": [], "val": []}
    )
    saved_step: int | None = None
    validated_step: int | None = None

    def to_checkpoint(self) -> dict[str, Any]:
        """The checkpoint entries this state fills (the file format's step, data, best,
        history)."""
        return {
            "step": self.step,
            "data": {"epoch": self.epoch, "batches_done": self.batches_done},
            "best": self.best,
            "history": self.history,
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> RunState:
        step = int(checkpoint["step"])
        return cls(
            step=step,
            epoch=int(checkpoint["data"]["epoch"]),
            batches_done=int(checkpoint["data"]["batches_done"]),
            best=checkpoint["best"],
            history=checkpoint["history"],
            saved_step=step,
        )

    def record_training(self, loss: float, lr: float, images_per_s: float) -> dict[str, float]:
        record = {"step": self.step, "loss": loss, "lr": lr, "images_per_s": images_per_s}
        self.history["train"].append(record)
        return record

    def record_validation(self, metrics: SegmentationMetrics) -> bool:
        """Add a validation result; returns whether it is a new best."""
        summary = metrics.summary()
        self.history["val"].append({"step": self.step, **summary})
        self.validated_step = self.step
        if self.best["mIoU"] is not None and summary["mIoU"] <= self.best["mIoU"]:
            return False
        self.best.update(
            {"mIoU": summary["mIoU"], "step": self.step, "confusion": metrics.confusion.tolist()}
        )
        return True

    def best_metrics(self, labels: list[str]) -> SegmentationMetrics | None:
        if not self.best["confusion"]:
            return None
        return SegmentationMetrics(labels, np.asarray(self.best["confusion"], dtype=np.int64))


@dataclass
class Learner:
    """The model and what trains it. ``ema``: the weight average, when the run keeps one; it
    is then what validation sees and what is exported (``evaluated``)."""

    model: SegformerForSemanticSegmentation
    ema: WeightAverage | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler

    @property
    def evaluated(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model


@dataclass
class RunData:
    """The run's data: class names and colours, loss weights, and the loaders."""

    labels: list[str]
    palette: list[list[int]] | None
    class_weights: Tensor | None
    loader: torch.utils.data.DataLoader
    sampler: Any
    val_set: SegmentationDataset | None
    val_loader: torch.utils.data.DataLoader | None


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
    config, checkpoint = starting_point(config, resume, overrides)
    process, device = set_up_process(config)
    run_dir = Path(config.output_dir)
    checkpoint_dir = run_dir / "checkpoints"
    if checkpoint is None and list_checkpoints(checkpoint_dir):
        raise SegformerError(
            f"{run_dir} already holds checkpoints: pass --resume to continue that run, or choose another output_dir"
        )
    if process.is_main:
        for leftover in remove_interrupted_writes(run_dir):
            log.info("removed %s (left by an interrupted write)", leftover)

    with _removed_if_failed(run_dir, process) as cleanup:
        data = prepare_data(config, checkpoint, process, device)
        learner = build_learner(config, data, checkpoint, device)
        state = RunState.from_checkpoint(checkpoint) if checkpoint else RunState()
        if checkpoint is None:
            seed_everything(config.seed + process.rank)  # each its own dropout / drop-path stream
        elif not restore_rng(checkpoint["rng"], process, config.seed, state.step):
            log.warning(
                "resuming on %d processes a run saved on %d: random streams restart",
                process.world_size,
                len(checkpoint["rng"]),
            )
        trained = _for_processes(learner.model, process, device)
        batches = BatchStream(data.loader, data.sampler, config.batch_size, state)
        writer = None
        if process.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            config.save(run_dir / "config.yaml")
            writer = _tensorboard(run_dir)
            if writer is not None:
                cleanup.callback(writer.close)
        progress = cleanup.enter_context(
            contextlib.closing(_progress(config.max_steps, state.step, process.is_main))
        )

        # -- the loop ---------------------------------------------------------------------
        images_per_step = config.batch_size * config.grad_accum_steps * process.world_size
        window = _LossWindow(device, state.step)
        last_metrics: SegmentationMetrics | None = None
        while state.step < config.max_steps:
            losses, lr = train_step(learner, trained, batches, data, config, process, state.step)
            window.add(losses)
            state.step += 1
            progress.update(1)
            if state.step % config.log_interval == 0 or state.step == config.max_steps:
                loss, speed = window.close(state.step, process, images_per_step)
                record = state.record_training(loss, lr, speed)
                _log_training(record, state.epoch, writer, progress)
            if (
                data.val_loader is not None
                and config.eval_interval
                and state.step % config.eval_interval == 0
            ):
                last_metrics = validate_and_record(
                    learner, data, state, config, process, device, writer, progress
                )
            # A new best is checkpointed too, so the best weights can always be resumed from.
            if (
                state.step % config.checkpoint_interval == 0
                or state.step == config.max_steps
                or state.best["step"] == state.step
            ):
                save_checkpoint_of(learner, data, state, config, process)
        progress.close()

        # -- the end ----------------------------------------------------------------------
        if data.val_loader is not None and state.validated_step != state.step:
            last_metrics = validate_and_record(
                learner, data, state, config, process, device, writer, progress
            )
            if state.saved_step == state.step:  # the final checkpoint should know this result
                save_checkpoint_of(learner, data, state, config, process)  # a collective
        best_metrics = state.best_metrics(data.labels)
        if process.is_main:
            export_model(learner, config, data.palette, last_metrics, state.step, run_dir / "last")
            if data.val_loader is None:
                export_model(learner, config, data.palette, None, state.step, run_dir / "best")
            write_reports(run_dir, config, state, best_metrics, data.palette)
        if process.active:
            dist.barrier()
        return TrainResult(
            run_dir, state.step, state.best["step"], best_metrics, last_metrics, state.history
        )


# ---------------------------------------------------------------------------------------
# Setting a run up
# ---------------------------------------------------------------------------------------
def starting_point(
    config: TrainConfig, resume: str | os.PathLike[str] | bool, overrides: dict[str, Any] | None
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The run's config and the checkpoint to continue from (None: start at step 0).

    Resuming takes the saved config with ``overrides`` on top. A run folder that has its
    config.yaml but no complete checkpoint yet (killed before or during its first checkpoint
    write) is started again from step 0 with that config: nothing of it could be kept."""
    if not resume:
        return config, None
    target = Path(config.output_dir if resume is True else resume)
    try:
        path = find_resume_checkpoint(target)
    except SegformerError:
        if not (target / "config.yaml").is_file():
            raise
        log.warning(
            "%s: no complete checkpoint yet: starting the run again from step 0 with its saved config",
            target,
        )
        return TrainConfig.from_dict(
            overrides or {}, TrainConfig.from_file(target / "config.yaml")
        ), None
    checkpoint = load_checkpoint(path)
    saved = TrainConfig.from_dict(checkpoint["train_config"])
    config = TrainConfig.from_dict(overrides or {}, base=saved)
    changed = [
        f"{k}: {getattr(saved, k)!r} → {getattr(config, k)!r}"
        for k in (key.replace("-", "_") for key in overrides or {})
        if getattr(saved, k) != getattr(config, k)
    ]
    if changed:
        log.warning(
            "resuming with changed settings (no longer an exact continuation): %s",
            "; ".join(changed),
        )
    log.info("resumed from %s at step %d", path, checkpoint["step"])
    return config, checkpoint


def set_up_process(config: TrainConfig) -> tuple[Distributed, torch.device]:
    """This process's place in the job, its device, threads and determinism."""
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
    return process, device


@contextlib.contextmanager
def _removed_if_failed(run_dir: Path, process: Distributed) -> Iterator[contextlib.ExitStack]:
    """Closes what is registered on the yielded stack (event writer, progress bar); and when
    the block fails, removes the run folder if this call created it and no checkpoint was
    saved: a failed first attempt leaves nothing behind that a retry would trip over."""
    created = process.is_main and not run_dir.exists()
    with contextlib.ExitStack() as cleanup:
        try:
            yield cleanup
        except Exception:
            cleanup.close()
            if created and not list_checkpoints(run_dir / "checkpoints"):
                shutil.rmtree(run_dir, ignore_errors=True)
            raise


def prepare_data(
    config: TrainConfig,
    checkpoint: dict[str, Any] | None,
    process: Distributed,
    device: torch.device,
) -> RunData:
    """Open the splits, settle the class names, check every mask (pre-flight), and make the
    training and validation loaders."""
    train_set = open_split(config, config.train_split, exclude=config.train_exclude)
    val_set = (
        open_split(config, config.val_split, include=config.val_include)
        if config.val_split
        else None
    )
    if checkpoint is not None:
        labels, palette = list(checkpoint["labels"]), checkpoint.get("palette")
    else:
        labels, palette = class_names(config, train_set)
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
    # Without the pre-flight scan each mask is checked as it is read.
    augmented = AugmentedDataset(
        train_set, transform, config.seed, num_labels=None if config.preflight else len(labels)
    )
    # Rare-class sampling needs the per-image classes of the scan (the config requires it).
    weights = (
        report.class_balanced_weights(config.sampling_temperature)
        if config.sampling == "class-balanced" and report is not None
        else None
    )
    loader, sampler = train_loader(
        augmented,
        config.batch_size,
        config.num_workers,
        config.seed,
        process.rank,
        process.world_size,
        pin_memory=device.type == "cuda",
        weights=weights,
    )
    val_loader = (
        eval_loader(val_set, config.num_workers, process.rank, process.world_size)
        if val_set
        else None
    )
    weights = (
        torch.tensor(class_weights, dtype=torch.float32, device=device) if class_weights else None
    )
    return RunData(labels, palette, weights, loader, sampler, val_set, val_loader)


def class_names(
    config: TrainConfig, train_set: SegmentationDataset
) -> tuple[list[str], list[list[int]] | None]:
    """The classes of a new run: named by a labels file, the format or the starting model;
    else generic names for every id the masks use."""
    labels, palette, label_source = resolve_labels(config, train_set)
    if labels is not None:
        log.info("%d classes, named by %s", len(labels), label_source)
        return labels, palette
    report = scan(train_set, num_labels=IGNORE_INDEX)  # any id is fine: we learn the count
    present = np.nonzero(report.class_pixels)[0]
    if not len(present):
        raise DataError(f"{train_set.name}: every mask is entirely ignored")
    labels = [f"class_{i}" for i in range(int(present.max()) + 1)]
    log.warning("no class names given (labels: a JSON file): using %d generic ones", len(labels))
    return labels, palette


def build_learner(
    config: TrainConfig, data: RunData, checkpoint: dict[str, Any] | None, device: torch.device
) -> Learner:
    """The model (new, from a checkpoint to start from, or the run's own checkpoint), its
    weight average, AdamW, the schedule and the loss scaler; restored from ``checkpoint``."""
    if checkpoint is not None:
        model = SegformerForSemanticSegmentation(
            SegformerConfig.from_hf_dict(checkpoint["model_config"])
        )
        model.load_state_dict(checkpoint["model"])
    else:
        model = build_model(config, data.labels)
    model.metadata = _export_metadata(config, data.palette, None, 0)
    model.to(device).train()
    # The averaged weights are what validation sees and what is exported; the optimiser
    # trains ``model``.
    ema = WeightAverage(model, config.ema_decay) if config.ema_decay else None
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.lr, config.weight_decay, config.head_lr_mult),
        lr=config.lr,
        betas=tuple(config.betas),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules(config, optimizer))
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    if checkpoint is not None:
        if ema is not None and "ema" in checkpoint:
            ema.load_state_dict(checkpoint["ema"])
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
    return Learner(model, ema, optimizer, scheduler, scaler)


def _for_processes(model: nn.Module, process: Distributed, device: torch.device) -> nn.Module:
    """What the forward pass runs: the model itself, or under torchrun its DDP wrapper."""
    if not process.active:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


# ---------------------------------------------------------------------------------------
# One step, validation, export, checkpoints, reports
# ---------------------------------------------------------------------------------------
def train_step(
    learner: Learner,
    trained: nn.Module,
    batches: BatchStream,
    data: RunData,
    config: TrainConfig,
    process: Distributed,
    step: int,
) -> tuple[list[Tensor], float]:
    """One optimizer step over ``grad_accum_steps`` batches. Returns the batches' losses
    (detached, on the device: reading them would wait for the device) and the encoder's
    learning rate the step used."""
    device = next(learner.model.parameters()).device
    losses = []
    for micro in range(config.grad_accum_steps):
        batch = next(batches)
        pixel_values = batch["pixel_values"].to(device, non_blocking=True)
        target = batch["labels"].to(device, non_blocking=True)
        # Under DDP, gradients are averaged across processes only on the last micro-batch.
        accumulate_only = process.active and micro < config.grad_accum_steps - 1
        with trained.no_sync() if accumulate_only else contextlib.nullcontext():
            with autocast(device, config.precision):
                logits = trained(pixel_values)
            loss = segmentation_loss(logits, target, data.class_weights)
            _stop_if_diverged(loss, step, process, Path(config.output_dir) / "checkpoints")
            learner.scaler.scale(loss / config.grad_accum_steps).backward()
        losses.append(loss.detach())
    optimizer = learner.optimizer
    if config.clip_grad_norm is not None:
        learner.scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(learner.model.parameters(), config.clip_grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    learner.scaler.step(optimizer)
    learner.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    learner.scheduler.step()
    if learner.ema is not None:
        learner.ema.update(learner.model)
    return losses, lr


def _stop_if_diverged(loss: Tensor, step: int, process: Distributed, checkpoint_dir: Path) -> None:
    # Every process stops together, none waits forever in a collective.
    if all_true(bool(torch.isfinite(loss.detach())), process, loss.device):
        return
    saved = list_checkpoints(checkpoint_dir)
    keep = f"the last good checkpoint is {saved[-1][1]}" if saved else "no checkpoint was saved yet"
    raise TrainingDiverged(
        f"loss is {float(loss.detach())} at step {step + 1}: training diverged; {keep} "
        "(resume from it with a lower lr, fp32, or clip_grad_norm)"
    )


class _LossWindow:
    """Training losses and time since the last log line."""

    def __init__(self, device: torch.device, step: int) -> None:
        self.device = device
        self._reset(step)

    def _reset(self, step: int) -> None:
        self.total, self.count = torch.zeros((), device=self.device), 0
        self.start, self.start_step = time.perf_counter(), step

    def add(self, losses: list[Tensor]) -> None:
        for loss in losses:
            self.total += loss
            self.count += 1

    def close(self, step: int, process: Distributed, images_per_step: int) -> tuple[float, float]:
        """(mean loss over the window and all processes, images per second) and a new window."""
        loss = mean_across(self.total / self.count, process)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        speed = images_per_step * (step - self.start_step) / elapsed
        self._reset(step)
        return loss, speed


def validate(
    learner: Learner, data: RunData, config: TrainConfig, process: Distributed, device: torch.device
) -> SegmentationMetrics:
    """Score the evaluated weights on the validation split through the prediction path: the
    processor and inference mode the exported model keeps. The engine is PyTorch's exact
    ``fast`` one, not ``auto``: OpenVINO would convert the weights anew at every validation
    (they change) and leaves the thread's floating-point flags changed, which would make a
    resumed run differ from an uninterrupted one."""

    sync_buffers(learner.model, process)
    if learner.ema is not None:
        learner.ema.copy_buffers(learner.model)
    segmenter = Segmenter(
        learner.evaluated,
        image_processor(config),
        device=str(device),
        backend="fast",
        mode=inference_mode(config),
        max_pixels=None,
    )
    metrics = evaluate(segmenter, data.val_loader, data.labels, dataset=data.val_set)
    learner.model.train()
    if learner.ema is not None:
        learner.ema.model.eval()
    return metrics


def validate_and_record(
    learner: Learner,
    data: RunData,
    state: RunState,
    config: TrainConfig,
    process: Distributed,
    device: torch.device,
    writer: Any,
    progress: Any,
) -> SegmentationMetrics:
    """Validate, add the result to the history, export a new best, and log it."""
    metrics = validate(learner, data, config, process, device)
    if state.record_validation(metrics) and process.is_main:
        export_model(
            learner, config, data.palette, metrics, state.step, Path(config.output_dir) / "best"
        )
    summary, best = metrics.summary(), state.best
    if writer is not None:
        for key, value in summary.items():
            writer.add_scalar(f"val/{key}", value, state.step)
        for name, iou in zip(metrics.labels, metrics.iou, strict=True):
            if not math.isnan(iou):
                writer.add_scalar(f"val_iou/{name}", 100 * iou, state.step)
    if process.is_main:
        progress.write(
            f"step {state.step}: val mIoU {summary['mIoU']:.2f}  mAcc {summary['mAcc']:.2f}  aAcc {summary['aAcc']:.2f}"
            f"  (best {best['mIoU']:.2f} at step {best['step']})"
        )
    return metrics


def _log_training(record: dict[str, float], epoch: int, writer: Any, progress: Any) -> None:
    step = record["step"]
    if writer is not None:
        writer.add_scalar("train/loss", record["loss"], step)
        writer.add_scalar("train/lr", record["lr"], step)
        writer.add_scalar("train/images_per_s", record["images_per_s"], step)
    progress.set_postfix(
        loss=f"{record['loss']:.4f}",
        lr=f"{record['lr']:.2e}",
        img_s=f"{record['images_per_s']:.1f}",
        epoch=epoch,
    )


def export_model(
    learner: Learner,
    config: TrainConfig,
    palette: Any,
    metrics: SegmentationMetrics | None,
    step: int,
    folder: Path,
) -> None:
    """Save the evaluated weights as a loadable model folder, with the validation result."""

    if learner.ema is not None:
        learner.ema.copy_buffers(learner.model)
    learner.evaluated.metadata = _export_metadata(config, palette, metrics, step)
    segformer.save(learner.evaluated, folder)


def model_from_checkpoint(
    checkpoint: dict[str, Any], averaged: bool = True
) -> SegformerForSemanticSegmentation:
    """The model a checkpoint holds, as the run would export it at that step: the averaged (EMA)
    weights when the run keeps them and ``averaged`` (else the trained ones), with the run's
    preprocessing, palette and training record — for publishing a run that is still going."""
    config = TrainConfig.from_dict(checkpoint["train_config"])
    model = build_model(config, list(checkpoint["labels"])).eval()
    model.load_state_dict(checkpoint["model"])
    if averaged and checkpoint.get("ema"):
        average = WeightAverage(model, config.ema_decay)
        average.load_state_dict(checkpoint["ema"])
        average.copy_buffers(model)  # the trained model's BatchNorm statistics, as at export
        model = average.model
    model.metadata = _export_metadata(config, checkpoint.get("palette"), None, checkpoint["step"])
    return model


def checkpoint_state(
    learner: Learner, data: RunData, state: RunState, config: TrainConfig, process: Distributed
) -> dict[str, Any]:
    """Everything needed to continue the run exactly (see ``training.checkpointing`` for the
    format). A collective under torchrun: every process must call it."""
    sync_buffers(learner.model, process)
    model = learner.model
    progress = state.to_checkpoint()
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": progress["step"],
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **({"ema": learner.ema.state_dict()} if learner.ema is not None else {}),
        "model_config": model.config.to_hf_dict(),
        "labels": data.labels,
        "palette": data.palette,
        "train_config": dataclasses.asdict(config),
        "optimizer": learner.optimizer.state_dict(),
        "scheduler": learner.scheduler.state_dict(),
        "scaler": learner.scaler.state_dict(),
        "rng": all_rng_states(process),
        "data": progress["data"],
        "best": progress["best"],
        "history": progress["history"],
    }


def save_checkpoint_of(
    learner: Learner, data: RunData, state: RunState, config: TrainConfig, process: Distributed
) -> None:
    """Checkpoint the run at its current step (rank 0 writes; every process takes part)."""
    checkpoint = checkpoint_state(learner, data, state, config, process)
    if process.is_main:
        save_and_prune(
            checkpoint,
            Path(config.output_dir) / "checkpoints",
            config.keep_checkpoints,
            state.best["step"],
        )
    state.saved_step = state.step


def write_reports(
    run_dir: Path,
    config: TrainConfig,
    state: RunState,
    best_metrics: SegmentationMetrics | None,
    palette: Any,
) -> None:
    """history.json, the plots, and the best validation's metrics.json and table."""
    reports.write_json(state.history, run_dir / "history.json")
    about = {
        "step": state.best["step"],
        "data": config.data,
        "format": config.format,
        "split": config.val_split,
        "mode": inference_mode(config).describe(),
    }
    reports.write_training_report(run_dir, state.history, best_metrics, about, palette)
    if best_metrics is not None:
        log.info("best validation, step %s:\n%s", state.best["step"], best_metrics.table())
    log.info("run folder: %s (best model: %s)", run_dir, run_dir / "best")


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------
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

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
        file=sys.stderr,
    )
