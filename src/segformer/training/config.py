"""The settings of a training run: one dataclass, read from YAML or TOML files and command-line
overrides, saved with every run. Kept free of torch so the command line can list the
settings (``segformer train --help``) instantly; ``segformer.training.loop`` runs them."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segformer.errors import SegformerError

# Kept in step with segformer.training.datasets.FORMATS (data imports torch; this module must not).
DATASET_FORMATS = (
    "folder", "binary", "list", "camvid", "ade20k", "cityscapes", "hf",
    "coco", "voc", "cvat", "roboflow", "labelstudio",
)  # fmt: skip
PRECISIONS = ("fp32", "bf16", "fp16")
CLASS_WEIGHTING = ("median-frequency", "enet")
SAMPLING = ("uniform", "class-balanced")


@dataclass
class TrainConfig:
    """Everything a training run depends on (``HELP`` explains each setting). The defaults are
    the paper's ADE20K recipe (mmseg's segformer_mit-b0_512x512_160k_ade20k). Sizes are
    (height, width); scales are (long side, short side)."""

    # data
    data: str = ""
    format: str = "folder"
    train_split: str = "train"
    val_split: str | None = "val"
    train_exclude: list[str] = field(default_factory=list)
    val_include: list[str] = field(default_factory=list)
    labels: str | None = None
    reduce_labels: bool | None = None
    image_column: str | None = None
    mask_column: str | None = None
    background: bool = True
    # model
    model: str = "b0"
    drop_path_rate: float | None = None
    # augmentation
    crop_size: list[int] = field(default_factory=lambda: [512, 512])
    scale: list[int] | None = field(default_factory=lambda: [2048, 512])
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    lighting: bool = False
    # optimisation
    max_steps: int = 160_000
    batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 6e-5
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 1500
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    min_lr: float = 0.0
    restarts: list[int] = field(default_factory=list)
    restart_lr: float = 0.5
    clip_grad_norm: float | None = None
    ema_decay: float | None = None
    class_weights: list[float] | str | None = None
    sampling: str = "uniform"
    sampling_temperature: float = 0.01
    precision: str = "fp32"
    device: str = "auto"
    # validation
    eval_interval: int = 4000
    eval_mode: str = "whole"
    eval_scale: list[int] | None = field(default_factory=lambda: [2048, 512])
    eval_size: list[int] | None = None
    eval_crop_size: list[int] | None = None
    eval_stride: list[int] | None = None
    # run
    output_dir: str = "runs/segformer"
    seed: int = 0
    deterministic: bool = False
    num_workers: int = 4
    threads: int | None = None
    checkpoint_interval: int = 4000
    keep_checkpoints: int = 3
    log_interval: int = 50
    preflight: bool = True

    # -- validation of values ------------------------------------------------------------
    # Every value is checked here, before any data is read, so that a bad setting (from a
    # file, --set or a resumed run) is one line and exit 2, never a NaN loss hours later.
    # Comparisons are written so that NaN fails them.
    def __post_init__(self) -> None:
        self._check_choices_and_sizes()
        self._check_optimisation()
        self._check_run()

    def _check_choices_and_sizes(self) -> None:
        _need(
            self.format in DATASET_FORMATS,
            f"format must be one of {', '.join(DATASET_FORMATS)}, not {self.format!r}",
        )
        _need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}")
        _need(self.eval_mode in ("whole", "slide"), "eval_mode must be whole or slide")
        for name in (
            "crop_size",
            "eval_size",
            "eval_scale",
            "eval_crop_size",
            "eval_stride",
            "scale",
        ):
            value = getattr(self, name)
            _need(
                value is None or (len(value) == 2 and min(value) > 0),
                f"{name} must be two positive integers",
            )
        _need(self.crop_size is not None, "crop_size is required")
        _need(
            len(self.ratio_range) == 2
            and 0 < self.ratio_range[0] <= self.ratio_range[1] < math.inf,
            "bad ratio_range",
        )
        _need(0 < self.cat_max_ratio <= 1, "cat_max_ratio must be in (0, 1] (1: off)")
        _need(0 <= self.flip_prob <= 1, "flip_prob must be in [0, 1]")
        _need(
            self.drop_path_rate is None or 0 <= self.drop_path_rate < 1,
            "drop_path_rate must be in [0, 1) (or none)",
        )

    def _check_optimisation(self) -> None:
        _need(
            self.max_steps > 0 and self.batch_size > 0 and self.grad_accum_steps > 0,
            "steps and sizes must be > 0",
        )
        _need(0 < self.lr < math.inf, f"lr must be a positive number, not {self.lr}")
        _need(0 < self.head_lr_mult < math.inf, "head_lr_mult must be a positive number")
        _need(
            0 <= self.weight_decay < math.inf,
            f"weight_decay must be 0 or a positive number, not {self.weight_decay}",
        )
        _need(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas must be two numbers in [0, 1)",
        )
        _need(self.warmup_steps >= 0 and 0 <= self.warmup_ratio <= 1, "bad warm-up settings")
        _need(0 <= self.poly_power < math.inf, "poly_power must be 0 or a positive number")
        _need(0 <= self.min_lr <= self.lr, "min_lr must be between 0 and lr")
        cycle_bounds = [0, *self.restarts, self.max_steps]
        _need(
            all(a < b for a, b in itertools.pairwise(cycle_bounds)),
            "restarts must be increasing steps between 0 and max_steps",
        )
        _need(0 < self.restart_lr <= 1, "restart_lr must be in (0, 1]")
        _need(
            self.clip_grad_norm is None or 0 < self.clip_grad_norm < math.inf,
            "clip_grad_norm must be a positive number (or none)",
        )
        _need(
            self.ema_decay is None or 0 < self.ema_decay < 1,
            "ema_decay must be between 0 and 1 (or none)",
        )
        if isinstance(self.class_weights, str):
            _need(
                self.class_weights in CLASS_WEIGHTING,
                f"class_weights must be a list or one of {CLASS_WEIGHTING}",
            )
        elif self.class_weights is not None:
            _need(
                all(0 <= w < math.inf for w in self.class_weights) and any(self.class_weights),
                "class_weights must be numbers ≥ 0, not all 0",
            )
        _need(self.sampling in SAMPLING, f"sampling must be one of {', '.join(SAMPLING)}")
        _need(
            0 < self.sampling_temperature < math.inf,
            "sampling_temperature must be a positive number",
        )
        _need(
            self.sampling == "uniform" or self.preflight,
            "sampling: class-balanced needs the pre-flight scan of the masks (preflight: true)",
        )

    def _check_run(self) -> None:
        _need(self.checkpoint_interval > 0 and self.log_interval > 0, "intervals must be > 0")
        _need(
            self.eval_interval >= 0 and self.keep_checkpoints >= 1,
            "bad eval_interval or keep_checkpoints",
        )
        _need(self.num_workers >= 0, "num_workers must be 0 or more")
        _need(self.threads is None or self.threads > 0, "threads must be > 0 (or none)")

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def field_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
        """A config from ``values`` (keys may use - or _) applied over ``base`` (or defaults)."""
        names = [f.name for f in dataclasses.fields(cls)]
        parsed = {}
        for raw_key, value in values.items():
            key = raw_key.replace("-", "_")
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise SegformerError(f"config: unknown setting {raw_key!r}{hint}")
            parsed[key] = coerce(key, value)
        start = dataclasses.asdict(base) if base is not None else {}
        return cls(**{**start, **parsed})

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TrainConfig:
        return cls.from_dict(read_config_file(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the settings as YAML (atomically), loadable again with ``from_file``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The ".tmp" suffix marks what a kill leaves behind, for the next run to clean up.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                yaml.safe_dump(dataclasses.asdict(self), f, sort_keys=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise SegformerError(f"config: {message}")


HELP: dict[str, str] = {
    "data": "dataset folder (or list file)",
    "format": f"dataset format: {', '.join(DATASET_FORMATS)}",
    "train_split": "split to train on",
    "val_split": "split to validate on (none: no validation); splits join with + (train+val)",
    "train_exclude": "file-name patterns (fnmatch) of training images to leave out, e.g. 0006R0_*",
    "val_include": "file-name patterns of the validation images to keep (empty: all)",
    "labels": "JSON file with class names (and palette); default: the format's, else the starting model's",
    "reduce_labels": "map 0 → ignore and k → k−1 (default: on for ade20k only)",
    "image_column": "hf format: the image column (default: auto-detected)",
    "mask_column": "hf format: the annotation column (default: auto-detected)",
    "background": "coco, labelstudio: pixels no object covers are class 0 'background' (true) "
    "or ignored (false)",
    "model": "a variant (b0 … b5) to train from scratch, or a checkpoint to start from: an ImageNet "
    "MiT encoder, or a segmentation model (its head is re-made when the label set differs)",
    "drop_path_rate": "stochastic depth at the last encoder block (default: 0.1, or the checkpoint's)",
    "crop_size": "training crop (height, width)",
    "scale": "base scale (long, short) of the random resize (none: each image's own size)",
    "ratio_range": "random resize: ratio range applied to the base scale",
    "cat_max_ratio": "redraw crops where one class covers more than this share of labelled pixels",
    "flip_prob": "horizontal flip probability",
    "photometric": "photometric distortion: brightness, contrast, saturation, hue",
    "lighting": "lighting changes for dusk and overcast scenes: gamma 0.5–2 and colour temperature",
    "max_steps": "optimizer steps",
    "batch_size": "images per process per forward pass",
    "grad_accum_steps": "forward passes accumulated into each optimizer step",
    "lr": "AdamW learning rate of the encoder",
    "head_lr_mult": "decoder head learning-rate multiplier",
    "weight_decay": "AdamW weight decay (norms and biases get none)",
    "betas": "AdamW betas",
    "warmup_steps": "linear warm-up steps",
    "warmup_ratio": "learning rate at step 0, as a fraction of the scheduled rate",
    "poly_power": "power of the polynomial decay",
    "min_lr": "learning rate the decay ends at",
    "restarts": "steps at which the rate restarts (warm restarts): each cycle decays to min_lr "
    "by the next restart or max_steps",
    "restart_lr": "rate a restart jumps back to, as a fraction of lr",
    "clip_grad_norm": "clip the gradient norm to this (none: no clipping)",
    "ema_decay": "keep an exponential moving average of the weights with this decay; validate, "
    "select and export the averaged weights (none: off)",
    "class_weights": "loss weight per class, or median-frequency / enet (computed from the training masks)",
    "sampling": "uniform (each image once per epoch) or class-balanced (rare-class sampling: images "
    "holding rare classes drawn more often, with replacement)",
    "sampling_temperature": "class-balanced: a class is drawn with probability ∝ exp((1 − its pixel "
    "share) / T); smaller T favours the rarest classes more",
    "precision": "fp32, bf16 (autocast; CPU or CUDA) or fp16 (CUDA, with loss scaling)",
    "device": "auto, cpu, cuda, cuda:N",
    "eval_interval": "validate every N steps (0: only at the end)",
    "eval_mode": "validation inference: whole or slide",
    "eval_scale": "validation resize: fit into (long, short) keeping the aspect ratio, sides rounded "
    "up to a multiple of 32 (none: native size)",
    "eval_size": "validation resize to a fixed (height, width) instead of eval_scale",
    "eval_crop_size": "slide window (height, width) (default: crop_size)",
    "eval_stride": "slide step (height, width) (default: 2/3 of the window)",
    "output_dir": "run folder: checkpoints, logs, plots, exported models",
    "seed": "seed of initialisation, data order and augmentation",
    "deterministic": "deterministic algorithms only (bit-identical resume on CPU)",
    "num_workers": "data-loader worker processes per training process",
    "threads": "torch CPU threads per process (default: torch's choice)",
    "checkpoint_interval": "save a checkpoint every N steps (and at every new best)",
    "keep_checkpoints": "keep the last K checkpoints (and the best one)",
    "log_interval": "log loss and learning rate every N steps",
    "preflight": "check every mask and image size before training",
}


def _toml_module() -> Any:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise SegformerError(
                "TOML config files need Python 3.11 or the tomli package; or use YAML"
            ) from None
    return tomllib


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Settings from a YAML (.yaml/.yml) or TOML (.toml) file: a flat mapping of setting names."""
    path = Path(path)
    is_toml = path.suffix.lower() == ".toml"
    toml = _toml_module() if is_toml else None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SegformerError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    try:
        data = toml.loads(text) if toml is not None else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:  # TOMLDecodeError is a ValueError
        first = str(exc).strip().splitlines()[0]
        raise SegformerError(
            f"{path}: not valid {'TOML' if is_toml else 'YAML'} ({first})"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SegformerError(f"{path}: a config file must be a mapping of setting: value")
    return data


def _type_name(kind: Any) -> str:
    return str(kind) if typing.get_origin(kind) else kind.__name__


def coerce(name: str, value: Any) -> Any:
    """``value`` (from YAML/TOML, or a command-line string) as field ``name``'s type. Strings
    are read as YAML scalars/lists, and "a,b" as a list; "none" empties an optional setting."""
    kind = TrainConfig.field_types()[name]
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    members = typing.get_args(kind) if union else (kind,)
    nullable = type(None) in members
    options = [m for m in members if m is not type(None)]
    if isinstance(value, str):
        text = value.strip()
        if nullable and text.lower() in ("none", "null", ""):
            return None
        if options == [str]:
            return value
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            parsed = text
        if isinstance(parsed, str) and "," in parsed:
            parsed = [v.strip() for v in parsed.split(",")]
        for option in options:
            converted = _convert(parsed, option) if option is not str else None
            if converted is not None:
                return converted
        if str in options:
            return value
    elif value is None:
        if nullable:
            return None
        raise SegformerError(f"config: {name} cannot be empty")
    else:
        for option in options:
            converted = _convert(value, option)
            if converted is not None:
                return converted
    expected = " or ".join(_type_name(o) for o in options)
    raise SegformerError(f"config: {name} must be {expected}, not {value!r}")


def _convert(value: Any, kind: Any) -> Any:
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            return None
        items = [_convert(v, item) for v in value]
        return None if any(i is None for i in items) else items
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # "1" on the command line reads as 1
            return bool(value)
        if isinstance(value, str) and value.lower() in (
            "true",
            "yes",
            "on",
            "1",
            "false",
            "no",
            "off",
            "0",
        ):
            return value.lower() in ("true", "yes", "on", "1")
        return None
    if kind is int:
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))  # also "1e4"
            except ValueError:
                return None
            return int(number) if number.is_integer() else None
        return None
    if kind is float:
        if isinstance(value, bool):
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    if kind is str:
        return value if isinstance(value, str) else None
    return None
