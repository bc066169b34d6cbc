"""Reading and writing checkpoints: ``load`` takes any file, folder or name a user has (the
key maps live in ``segformer.weights.formats``, name resolution in
``segformer.weights.resolve``); ``save`` writes Hugging Face layout that transformers loads
unchanged, with the model's metadata.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from segformer.errors import CheckpointError
from segformer.models.config import SegformerConfig
from segformer.models.metadata import DEFAULT_PREPROCESSING, ModelMetadata
from segformer.models.segformer import (
    SegformerForImageClassification,
    SegformerForSemanticSegmentation,
    SegformerModel,
)
from segformer.weights.builtin import DEFAULT_MODEL, builtin_path
from segformer.weights.formats import (
    CLASSIFICATION,
    SEGMENTATION,
    StateDict,
    detect_format,
    infer_config,
    to_hf_names,
    to_our_names,
)
from segformer.weights.resolve import resolve

log = logging.getLogger("segformer")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# Terminal colour codes: torch puts some in its messages, and they garble logs and JSON.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# torch's weights-only refusal names the object it would not rebuild: "Unsupported global:
# GLOBAL numpy._core.multiarray._reconstruct was not an allowed global …".
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _first_line(message: str, exc: BaseException) -> str:
    lines = _ANSI.sub("", message).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def _refusal(message: str) -> str:
    """Our own words for torch's weights-only refusal. torch's message advises re-loading with
    ``weights_only=False``, which would run whatever code the file carries: we never pass that
    on. Instead: what was refused, and the safe way to get usable weights."""
    found = _UNSUPPORTED_GLOBAL.search(_ANSI.sub("", message))
    what = f"a Python object ({found.group(1)})" if found else "Python objects"
    return (
        f"refused to load: the file holds {what} besides tensors and plain data, and rebuilding "
        "it could run code; save the weights alone (torch.save(model.state_dict(), path)) or as "
        ".safetensors where the file came from"
    )


# ---------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------
def read_state_dict(path: Path) -> tuple[StateDict, dict[str, Any]]:
    """Tensors and any metadata (mmseg's ``meta``) from a .safetensors, .bin, .pth or .pt file.
    Pickle files are read with ``weights_only=True``: nothing in them is ever executed."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path)), {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: {_refusal(str(exc))}") from None
    except Exception as exc:  # torch.load fails on junk with many exception types
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({_first_line(str(exc), exc)})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    meta: dict[str, Any] = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    for key in ("state_dict", "model", "module"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path}: contains no tensors")
    return state, meta


def _read_model_dir(
    folder: Path,
) -> tuple[StateDict, dict[str, Any], SegformerConfig | None, dict[str, Any]]:
    config_path = folder / "config.json"
    config_data: dict[str, Any] = {}
    config = None
    if config_path.is_file():
        config = SegformerConfig.from_json_file(config_path)
        config_data = json.loads(config_path.read_text(encoding="utf-8"))
    weights = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]
    if not weights:
        loose = sorted(
            p for p in folder.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".bin")
        )
        if len(loose) != 1:
            found = ", ".join(p.name for p in loose) or "none"
            raise CheckpointError(
                f"{folder}: expected model.safetensors or pytorch_model.bin (weight files found: {found})"
            )
        weights = loose
    state, meta = read_state_dict(weights[0])
    extras = {
        "segformer": config_data.get("segformer", {}),
        "architectures": config_data.get("architectures", []),
    }
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        try:
            extras["preprocessing"] = json.loads(preprocessor.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{preprocessor}: not valid JSON ({exc})") from None
    return state, meta, config, extras


def _match(model: torch.nn.Module, state: StateDict, skip: tuple[str, ...], source: str) -> None:
    """Copy ``state`` into ``model``; anything missing, unexpected or mis-shaped is an error."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    given = {k: v for k, v in state.items() if not k.startswith(skip)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = [
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(given) & set(expected))
        if given[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        parts = []
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
        ):
            if items:
                shown = ", ".join(items[:4]) + (
                    f" … (+{len(items) - 4} more)" if len(items) > 4 else ""
                )
                parts.append(f"{len(items)} {title}: {shown}")
        raise CheckpointError(f"{source}: weights do not fit the model; " + "; ".join(parts))
    model.load_state_dict(given, strict=False)


def _agreeing_config(
    config: SegformerConfig | None, inferred: SegformerConfig, meta: dict[str, Any], source: str
) -> SegformerConfig:
    """The config.json that came with the weights, checked against the one their shapes
    imply; or the inferred one (with mmseg's class names) when there is none."""
    if config is None:
        if meta.get("CLASSES") and len(meta["CLASSES"]) == inferred.num_labels:
            return inferred.with_labels([str(c) for c in meta["CLASSES"]])
        return inferred
    for name in ("hidden_sizes", "depths", "mlp_ratios", "sr_ratios"):
        said, found = getattr(config, name), getattr(inferred, name)
        if said != found:
            raise CheckpointError(
                f"{source}: config.json says {name} {said} but the weights have {found}: "
                "the config and the weights do not belong together"
            )
    if config.num_labels == 0:
        return replace(config, id2label=inferred.id2label)
    return config


def load(
    name_or_path: str | os.PathLike[str],
    *,
    num_labels: int | None = None,
    labels: list[str] | None = None,
    task: str | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
    **config_overrides: Any,
) -> SegformerModel:
    """Load any SegFormer checkpoint and return the model in eval mode.

    ``name_or_path``: a built-in model name, a checkpoint file (.safetensors, .bin, .pth), a
    folder in Hugging Face layout, or a hub id (cached or downloaded via huggingface_hub).
    ``num_labels`` / ``labels``: a different label set re-initialises only the classifier.
    ``task``: ``"semantic-segmentation"`` or ``"image-classification"``; an ImageNet encoder
    loaded for segmentation gets a freshly initialised decoder.
    ``config_overrides``: config fields to change (e.g. ``drop_path_rate=0.2`` for training).
    """
    source = str(name_or_path)
    path = resolve(name_or_path, revision)
    if path.is_dir():
        state, meta, config, extras = _read_model_dir(path)
    else:
        state, meta = read_state_dict(path)
        config, extras = None, {}
        sibling = path.parent / "config.json"
        if sibling.is_file():
            config = SegformerConfig.from_json_file(sibling)
    try:
        fmt = detect_format(state)
    except CheckpointError as exc:  # name the file: the tensors alone do not say where it was
        raise CheckpointError(f"{path}: {exc}") from None
    state = to_our_names(state, fmt)
    inferred, stored_task = infer_config(state, fmt)
    config = _agreeing_config(config, inferred, meta, source)
    if stored_task == SEGMENTATION and "SegformerForImageClassification" in extras.get(
        "architectures", []
    ):
        stored_task = CLASSIFICATION
    task = task or (SEGMENTATION if stored_task == "encoder" else stored_task)
    if task not in (SEGMENTATION, CLASSIFICATION):
        raise CheckpointError(f"task must be {SEGMENTATION!r} or {CLASSIFICATION!r}, not {task!r}")

    if config_overrides:
        unknown = set(config_overrides) - set(config.__dataclass_fields__)
        if unknown:
            raise CheckpointError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        config = replace(config, **config_overrides)
    stored_labels = config.num_labels
    if labels is not None:
        config = config.with_labels(list(labels))
    elif num_labels is not None and num_labels != config.num_labels:
        config = config.with_labels([f"class_{i}" for i in range(num_labels)])
    if config.num_labels == 0:
        raise CheckpointError(f"{source}: an encoder-only checkpoint needs num_labels= or labels=")

    model_cls = (
        SegformerForSemanticSegmentation
        if task == SEGMENTATION
        else SegformerForImageClassification
    )
    model = model_cls(config)
    head = "decode_head.classifier." if task == SEGMENTATION else "classifier."
    skip: tuple[str, ...] = ()
    if task != stored_task:
        # Only the encoder carries over between tasks (e.g. an ImageNet MiT as a start).
        skip = ("decode_head.", "classifier.")
        log.warning("%s: loaded the encoder only; the %s head is newly initialised", source, task)
    elif config.num_labels != stored_labels:
        skip = (head,)
        log.warning(
            "%s: checkpoint has %d labels, model has %d: the classifier is newly initialised",
            source,
            stored_labels,
            config.num_labels,
        )
    _match(model, state, skip, source)

    metadata = ModelMetadata.from_json(extras.get("segformer"))
    metadata.source = metadata.source or source
    metadata.format = fmt
    metadata.preprocessing = extras.get("preprocessing")
    if meta.get("PALETTE") and len(meta["PALETTE"]) == config.num_labels and not metadata.palette:
        metadata.palette = [[int(c) for c in rgb] for rgb in meta["PALETTE"]]
    if skip:  # a new head: the stored palette and scores describe a model we no longer have
        metadata.palette = metadata.metrics = metadata.out_of_domain = None
    model.metadata = metadata
    model.eval()
    if device is not None:
        model.to(device)
    return model


def load_segmentation_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    purpose: str = "segmentation",
    revision: str | None = None,
) -> SegformerForSemanticSegmentation:
    """``load`` for the places that need a segmentation model: ``None`` means the package's
    built-in default model, and a classification checkpoint is refused in one line saying
    that ``purpose`` needs a segmentation model."""
    if name_or_path is None:
        if builtin_path(DEFAULT_MODEL) is None:
            raise CheckpointError(
                f"no model given, and the built-in model {DEFAULT_MODEL!r} is not installed in "
                "this package: name one (--model M on the command line, M in Python)"
            )
        name_or_path = DEFAULT_MODEL
    model = load(name_or_path, revision=revision)
    if not isinstance(model, SegformerForSemanticSegmentation):
        raise CheckpointError(
            f"{name_or_path}: an image-classification model; {purpose} needs a segmentation model"
        )
    return model


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------
def save(model: SegformerModel, folder: str | os.PathLike[str]) -> Path:
    """Write ``model`` in Hugging Face layout (config.json, model.safetensors with the classic
    key names, preprocessor_config.json) so that transformers loads it unchanged. Metadata
    (palette, licence, metrics …) travels in config.json under ``"segformer"``. Files appear
    whole or not at all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    architecture = (
        "SegformerForSemanticSegmentation"
        if isinstance(model, SegformerForSemanticSegmentation)
        else "SegformerForImageClassification"
    )
    config = model.config.to_hf_dict(architecture)
    meta = model.metadata.to_json()
    if meta:
        config.setdefault("segformer", {}).update(meta)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    preprocessing = model.metadata.preprocessing or DEFAULT_PREPROCESSING
    with tempfile.TemporaryDirectory(dir=folder, prefix=".saving-") as tmp:
        tmp_dir = Path(tmp)
        save_safetensors(
            to_hf_names(state), str(tmp_dir / "model.safetensors"), metadata={"format": "pt"}
        )
        (tmp_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp_dir / "preprocessor_config.json").write_text(
            json.dumps(preprocessing, indent=2) + "\n", encoding="utf-8"
        )
        for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
            os.replace(tmp_dir / name, folder / name)
    stale = folder / "pytorch_model.bin"
    if stale.exists():  # would shadow nothing (safetensors wins) but confuses people
        stale.unlink()
    return folder
