"""Model configuration: one dataclass, the MiT variants as rows of data, and the Hugging Face
``config.json`` format read and written at the edge."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segformer.errors import CheckpointError

# The MiT encoder family (Xie et al. 2021, table 6). Heads, reduction ratios, patch sizes,
# strides and the Mix-FFN ratio are shared by every variant; only width, depth and the
# decoder width change.
VARIANTS: dict[str, dict[str, Any]] = {
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
    "b3": {
        "hidden_sizes": [64, 128, 320, 512],
        "depths": [3, 4, 18, 3],
        "decoder_hidden_size": 768,
    },
    "b4": {
        "hidden_sizes": [64, 128, 320, 512],
        "depths": [3, 8, 27, 3],
        "decoder_hidden_size": 768,
    },
    "b5": {
        "hidden_sizes": [64, 128, 320, 512],
        "depths": [3, 6, 40, 3],
        "decoder_hidden_size": 768,
    },
}

# transformers builds every LayerNorm with PyTorch's default eps (1e-5) and ignores the
# ``layer_norm_eps`` its config.json carries (1e-6 in the published nvidia/* files). NVlabs'
# original code uses 1e-6 in the transformer blocks and the stage-closing norms, and 1e-5 in
# the patch embedding and the key/value reduction. We keep the block/stage value as a field
# and set it from the checkpoint format, so each checkpoint runs as its own code ran it.
TRANSFORMERS_LAYER_NORM_EPS = 1e-5
NVLABS_LAYER_NORM_EPS = 1e-6

# Keys of a Hugging Face SegFormer config.json that carry no information for us: bookkeeping,
# or options transformers itself no longer reads. Anything else unknown is kept in ``extra``
# so that a round trip through our loader and saver does not lose it.
_HF_IGNORED_KEYS = {
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "num_encoder_blocks",
    "reshape_last_stage",
    "label2id",
    "layer_norm_eps",
    "output_hidden_states",
    "return_dict",
    "problem_type",
    "_name_or_path",
}


@dataclass
class SegformerConfig:
    """Everything needed to build a SegFormer. Field names follow Hugging Face's config.json."""

    hidden_sizes: list[int] = field(default_factory=lambda: [32, 64, 160, 256])
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    num_attention_heads: list[int] = field(default_factory=lambda: [1, 2, 5, 8])
    sr_ratios: list[int] = field(default_factory=lambda: [8, 4, 2, 1])
    patch_sizes: list[int] = field(default_factory=lambda: [7, 3, 3, 3])
    strides: list[int] = field(default_factory=lambda: [4, 2, 2, 2])
    mlp_ratios: list[int] = field(default_factory=lambda: [4, 4, 4, 4])
    num_channels: int = 3
    decoder_hidden_size: int = 256
    id2label: dict[int, str] = field(default_factory=dict)
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    classifier_dropout_prob: float = 0.1
    drop_path_rate: float = 0.1
    layer_norm_eps: float = TRANSFORMERS_LAYER_NORM_EPS
    initializer_range: float = 0.02
    semantic_loss_ignore_index: int = 255
    # Unknown config.json keys, written back unchanged on save.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A config.json is user input: every field is checked for type and range here, so a
        # bad file gets one line naming the field instead of a TypeError or ZeroDivisionError
        # deep inside the model's constructor.
        for name in _STAGE_LISTS:
            setattr(self, name, _positive_ints(getattr(self, name), name))
        for name in ("num_channels", "decoder_hidden_size"):
            setattr(self, name, _positive_int(getattr(self, name), name))
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob",
                     "classifier_dropout_prob", "drop_path_rate"):  # fmt: skip
            value = _number(getattr(self, name), name)
            if not 0.0 <= value < 1.0:
                raise CheckpointError(f"config: {name} must be in [0, 1), got {value!r}")
            setattr(self, name, value)
        self.layer_norm_eps = _number(self.layer_norm_eps, "layer_norm_eps")
        if not self.layer_norm_eps > 0:
            raise CheckpointError(
                f"config: layer_norm_eps must be positive, got {self.layer_norm_eps!r}"
            )
        self.initializer_range = _number(self.initializer_range, "initializer_range")
        if self.initializer_range < 0:
            raise CheckpointError(
                f"config: initializer_range must not be negative, got {self.initializer_range!r}"
            )
        if not isinstance(self.id2label, dict):
            raise CheckpointError(
                f"config: id2label must map class ids to names, got {type(self.id2label).__name__}"
            )
        try:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        except (TypeError, ValueError):
            raise CheckpointError("config: id2label keys must be class ids (0, 1, …)") from None
        if not isinstance(self.semantic_loss_ignore_index, int) or isinstance(
            self.semantic_loss_ignore_index, bool
        ):
            raise CheckpointError(
                "config: semantic_loss_ignore_index must be an integer, "
                f"got {self.semantic_loss_ignore_index!r}"
            )
        lengths = {len(getattr(self, name)) for name in _STAGE_LISTS}
        if len(lengths) != 1:
            raise CheckpointError(
                "config: hidden_sizes, depths, num_attention_heads, sr_ratios, patch_sizes, "
                "strides and mlp_ratios must all have one entry per stage"
            )
        for width, heads in zip(self.hidden_sizes, self.num_attention_heads, strict=True):
            if width % heads:
                raise CheckpointError(
                    f"config: hidden size {width} is not divisible by {heads} heads"
                )
        if self.hidden_act not in ACTIVATIONS:
            raise CheckpointError(
                f"config: hidden_act {self.hidden_act!r} is not supported (use one of {sorted(ACTIVATIONS)})"
            )
        if self.id2label and sorted(self.id2label) != list(range(len(self.id2label))):
            raise CheckpointError("config: id2label keys must be 0..num_labels-1")

    # -- derived ------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def num_stages(self) -> int:
        return len(self.hidden_sizes)

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in range(self.num_labels)]

    @property
    def variant(self) -> str | None:
        """The MiT variant name (``"b0"`` …) when the encoder is one of the table's rows."""
        for name, row in VARIANTS.items():
            if (
                self.hidden_sizes == row["hidden_sizes"]
                and self.depths == row["depths"]
                and self.num_attention_heads == [1, 2, 5, 8]
                and self.sr_ratios == [8, 4, 2, 1]
            ):
                return name
        return None

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_variant(
        cls,
        variant: str,
        num_labels: int | None = None,
        labels: list[str] | None = None,
        **overrides: Any,
    ) -> SegformerConfig:
        """A config for ``"b0"`` … ``"b5"`` with ``num_labels`` generic labels or the given names."""
        key = variant.lower().removeprefix("mit-").removeprefix("mit_")
        if key not in VARIANTS:
            raise CheckpointError(
                f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}"
            )
        if labels is None:
            labels = [f"class_{i}" for i in range(num_labels or 0)]
        elif num_labels is not None and num_labels != len(labels):
            raise CheckpointError(f"num_labels={num_labels} but {len(labels)} label names given")
        values = {**VARIANTS[key], "id2label": dict(enumerate(labels)), **overrides}
        return cls(**values)

    def with_labels(self, labels: list[str]) -> SegformerConfig:
        return dataclasses.replace(self, id2label=dict(enumerate(labels)))

    # -- Hugging Face config.json -------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> SegformerConfig:
        if data.get("model_type", "segformer") != "segformer":
            raise CheckpointError(
                f"config.json describes a {data['model_type']!r} model, not a SegFormer"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "id2label", "layer_norm_eps"}
        values: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        id2label = data.get("id2label")
        if id2label is None and "num_labels" in data:
            count = data["num_labels"]
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise CheckpointError(f"config: num_labels must be a whole number, got {count!r}")
            id2label = {i: f"LABEL_{i}" for i in range(count)}
        values["id2label"] = id2label or {}
        ours = data.get("segformer") or {}
        if not isinstance(ours, dict):
            raise CheckpointError('config: "segformer" must be a JSON object')
        # See TRANSFORMERS_LAYER_NORM_EPS: the file's layer_norm_eps is not what transformers
        # computes with, unless the file was written by us and says otherwise.
        values["layer_norm_eps"] = ours.get("layer_norm_eps", TRANSFORMERS_LAYER_NORM_EPS)
        extra = {k: v for k, v in data.items() if k not in known and k not in _HF_IGNORED_KEYS}
        extra.pop("id2label", None)
        extra.pop("num_labels", None)
        extra.pop("segformer", None)
        values["extra"] = extra
        return cls(**values)

    def to_hf_dict(self, architecture: str = "SegformerForSemanticSegmentation") -> dict[str, Any]:
        data: dict[str, Any] = {"architectures": [architecture], "model_type": "segformer"}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "id2label", "layer_norm_eps"):
                continue
            data[f.name] = getattr(self, f.name)
        data["num_encoder_blocks"] = self.num_stages
        data["reshape_last_stage"] = True
        data["layer_norm_eps"] = 1e-6  # what transformers' own files say; it does not read it
        data["id2label"] = {str(i): name for i, name in self.id2label.items()}
        data["label2id"] = {name: i for i, name in self.id2label.items()}
        data.update(self.extra)
        if self.layer_norm_eps != TRANSFORMERS_LAYER_NORM_EPS:
            data.setdefault("segformer", {})["layer_norm_eps"] = self.layer_norm_eps
        return data

    @classmethod
    def from_json_file(cls, path: str | Path) -> SegformerConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not a readable config.json ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: config.json must hold a JSON object")
        return cls.from_hf_dict(data)


# The per-stage lists of a config: one positive integer per encoder stage each.
_STAGE_LISTS = (
    "hidden_sizes",
    "depths",
    "num_attention_heads",
    "sr_ratios",
    "patch_sizes",
    "strides",
    "mlp_ratios",
)


def _positive_int(value: Any, name: str) -> int:
    # JSON has no integer type of its own: 2.0 is accepted as 2, 2.5 and true are not.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise CheckpointError(f"config: {name} must be a whole number, got {value!r}")
    if value < 1:
        raise CheckpointError(f"config: {name} must be at least 1, got {value!r}")
    return int(value)


def _positive_ints(values: Any, name: str) -> list[int]:
    if not isinstance(values, (list, tuple)) or not values:
        raise CheckpointError(
            f"config: {name} must be a list of whole numbers, one per stage, got {values!r}"
        )
    return [_positive_int(v, f"{name}[{i}]") for i, v in enumerate(values)]


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise CheckpointError(f"config: {name} must be a number, got {value!r}")
    return float(value)


ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")
