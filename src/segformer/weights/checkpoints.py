"""Checkpoints: every format users have, mapped to our parameter names at the edge.

Formats (each is a key-map, nothing more):

- ``hf``: Hugging Face files as transformers' ``save_pretrained`` and the nvidia/* hub models
  write them (``segformer.encoder.block.0.0.attention.self.query.weight`` …).
- ``hf-live``: the names transformers 5.x uses inside a live model, which is what a user gets
  from ``torch.save(model.state_dict())`` (``segformer.stages.0.blocks.0.attention.q_proj`` …).
- ``nvlabs``: NVlabs SegFormer / mmsegmentation ``.pth`` files (``backbone.block1.0.attn.kv`` …).
- ``mit``: ImageNet-pretrained MiT encoders (the ``nvlabs`` backbone names without ``backbone.``,
  plus a ``head`` classifier).
- ``segformer``: our own names, as ``model.state_dict()`` gives them.

``load`` resolves a name in one place: built-in model → local file → local folder →
Hugging Face cache / hub.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from segformer.errors import CheckpointError
from segformer.models.config import NVLABS_LAYER_NORM_EPS, SegformerConfig
from segformer.models.segformer import (
    SegformerForImageClassification,
    SegformerForSemanticSegmentation,
    SegformerModel,
)

log = logging.getLogger("segformer")

StateDict = dict[str, torch.Tensor]

SEGMENTATION = "semantic-segmentation"
CLASSIFICATION = "image-classification"

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_FILES = [
    "config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "preprocessor_config.json",
    "README.md",
]

# ---------------------------------------------------------------------------------------
# Key maps: (pattern, replacement) applied in order to every key. A key ending in "#k" or
# "#v" is one half of our fused key/value matrix; _merge_key_value joins the halves.
# ---------------------------------------------------------------------------------------
_BLOCK = r"encoder.stages.\1.blocks.\2"

HF_RULES = [
    (r"^segformer\.", ""),
    (r"^encoder\.patch_embeddings\.(\d+)\.layer_norm\.", r"encoder.stages.\1.patch_embed.norm."),
    (r"^encoder\.patch_embeddings\.(\d+)\.proj\.", r"encoder.stages.\1.patch_embed.proj."),
    (r"^encoder\.layer_norm\.(\d+)\.", r"encoder.stages.\1.norm."),
    (r"^encoder\.block\.(\d+)\.(\d+)\.layer_norm_1\.", _BLOCK + ".norm1."),
    (r"^encoder\.block\.(\d+)\.(\d+)\.layer_norm_2\.", _BLOCK + ".norm2."),
    (r"^encoder\.block\.(\d+)\.(\d+)\.attention\.self\.query\.", _BLOCK + ".attention.query."),
    (
        r"^encoder\.block\.(\d+)\.(\d+)\.attention\.self\.key\.(\w+)$",
        _BLOCK + r".attention.key_value.\3#k",
    ),
    (
        r"^encoder\.block\.(\d+)\.(\d+)\.attention\.self\.value\.(\w+)$",
        _BLOCK + r".attention.key_value.\3#v",
    ),
    (r"^encoder\.block\.(\d+)\.(\d+)\.attention\.self\.sr\.", _BLOCK + ".attention.reduction."),
    (
        r"^encoder\.block\.(\d+)\.(\d+)\.attention\.self\.layer_norm\.",
        _BLOCK + ".attention.reduction_norm.",
    ),
    (r"^encoder\.block\.(\d+)\.(\d+)\.attention\.output\.dense\.", _BLOCK + ".attention.proj."),
    (r"^encoder\.block\.(\d+)\.(\d+)\.mlp\.dense1\.", _BLOCK + ".mix_ffn.fc1."),
    (r"^encoder\.block\.(\d+)\.(\d+)\.mlp\.dwconv\.dwconv\.", _BLOCK + ".mix_ffn.dwconv."),
    (r"^encoder\.block\.(\d+)\.(\d+)\.mlp\.dense2\.", _BLOCK + ".mix_ffn.fc2."),
    (r"^decode_head\.linear_c\.(\d+)\.proj\.", r"decode_head.projections.\1."),
    (r"^decode_head\.linear_fuse\.", "decode_head.fuse."),
    (r"^decode_head\.batch_norm\.", "decode_head.fuse_norm."),
]

_LIVE_BLOCK = r"encoder.stages.\1.blocks.\2"
HF_LIVE_RULES = [
    (r"^segformer\.", ""),
    (r"^stages\.(\d+)\.patch_embeddings\.layer_norm\.", r"encoder.stages.\1.patch_embed.norm."),
    (r"^stages\.(\d+)\.patch_embeddings\.proj\.", r"encoder.stages.\1.patch_embed.proj."),
    (r"^stages\.(\d+)\.layer_norm\.", r"encoder.stages.\1.norm."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.layernorm_before\.", _LIVE_BLOCK + ".norm1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.layernorm_after\.", _LIVE_BLOCK + ".norm2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.attention\.q_proj\.", _LIVE_BLOCK + ".attention.query."),
    (
        r"^stages\.(\d+)\.blocks\.(\d+)\.attention\.k_proj\.(\w+)$",
        _LIVE_BLOCK + r".attention.key_value.\3#k",
    ),
    (
        r"^stages\.(\d+)\.blocks\.(\d+)\.attention\.v_proj\.(\w+)$",
        _LIVE_BLOCK + r".attention.key_value.\3#v",
    ),
    (
        r"^stages\.(\d+)\.blocks\.(\d+)\.attention\.sequence_reduction\.sequence_reduction\.",
        _LIVE_BLOCK + ".attention.reduction.",
    ),
    (
        r"^stages\.(\d+)\.blocks\.(\d+)\.attention\.sequence_reduction\.layer_norm\.",
        _LIVE_BLOCK + ".attention.reduction_norm.",
    ),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.attention\.o_proj\.", _LIVE_BLOCK + ".attention.proj."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", _LIVE_BLOCK + ".mix_ffn.fc1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.dwconv\.dwconv\.", _LIVE_BLOCK + ".mix_ffn.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", _LIVE_BLOCK + ".mix_ffn.fc2."),
    (r"^decode_head\.linear_projections\.(\d+)\.proj\.", r"decode_head.projections.\1."),
    (r"^decode_head\.linear_fuse\.", "decode_head.fuse."),
    (r"^decode_head\.batch_norm\.", "decode_head.fuse_norm."),
]


def _stage(match: re.Match[str]) -> str:
    """NVlabs numbers stages from 1; we number them from 0."""
    return str(int(match.group(1)) - 1)


def _nv(pattern: str, template: str) -> tuple[str, Callable[[re.Match[str]], str]]:
    # template uses {s} for the 0-based stage and {rest} for the trailing groups
    def repl(m: re.Match[str]) -> str:
        groups = m.groups()
        return template.format(s=_stage(m), b=groups[1] if len(groups) > 1 else "", rest=groups[-1])

    return pattern, repl


NVLABS_RULES: list[tuple[str, Any]] = [
    (r"^module\.", ""),
    (r"^backbone\.", ""),
    _nv(r"^patch_embed(\d)\.norm\.(\w+)$", "encoder.stages.{s}.patch_embed.norm.{rest}"),
    _nv(r"^patch_embed(\d)\.proj\.(\w+)$", "encoder.stages.{s}.patch_embed.proj.{rest}"),
    _nv(r"^norm(\d)\.(\w+)$", "encoder.stages.{s}.norm.{rest}"),
    _nv(r"^block(\d)\.(\d+)\.norm1\.(\w+)$", "encoder.stages.{s}.blocks.{b}.norm1.{rest}"),
    _nv(r"^block(\d)\.(\d+)\.norm2\.(\w+)$", "encoder.stages.{s}.blocks.{b}.norm2.{rest}"),
    _nv(
        r"^block(\d)\.(\d+)\.attn\.q\.(\w+)$",
        "encoder.stages.{s}.blocks.{b}.attention.query.{rest}",
    ),
    _nv(
        r"^block(\d)\.(\d+)\.attn\.kv\.(\w+)$",
        "encoder.stages.{s}.blocks.{b}.attention.key_value.{rest}",
    ),
    _nv(
        r"^block(\d)\.(\d+)\.attn\.sr\.(\w+)$",
        "encoder.stages.{s}.blocks.{b}.attention.reduction.{rest}",
    ),
    _nv(
        r"^block(\d)\.(\d+)\.attn\.norm\.(\w+)$",
        "encoder.stages.{s}.blocks.{b}.attention.reduction_norm.{rest}",
    ),
    _nv(
        r"^block(\d)\.(\d+)\.attn\.proj\.(\w+)$",
        "encoder.stages.{s}.blocks.{b}.attention.proj.{rest}",
    ),
    _nv(r"^block(\d)\.(\d+)\.mlp\.fc1\.(\w+)$", "encoder.stages.{s}.blocks.{b}.mix_ffn.fc1.{rest}"),
    _nv(
        r"^block(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.(\w+)$",
        "encoder.stages.{s}.blocks.{b}.mix_ffn.dwconv.{rest}",
    ),
    _nv(r"^block(\d)\.(\d+)\.mlp\.fc2\.(\w+)$", "encoder.stages.{s}.blocks.{b}.mix_ffn.fc2.{rest}"),
    _nv(r"^decode_head\.linear_c(\d)\.proj\.(\w+)$", "decode_head.projections.{s}.{rest}"),
    (r"^decode_head\.linear_fuse\.conv\.", "decode_head.fuse."),
    (r"^decode_head\.linear_fuse\.bn\.", "decode_head.fuse_norm."),
    (r"^decode_head\.linear_pred\.", "decode_head.classifier."),
    (r"^head\.", "classifier."),
]

# Keys a format carries that no model uses: mmseg's unused auxiliary classifier.
_DROPPED = re.compile(r"^decode_head\.conv_seg\.")

_OURS_TO_HF = [
    (r"^encoder\.stages\.(\d+)\.patch_embed\.proj\.", r"encoder.patch_embeddings.\1.proj."),
    (r"^encoder\.stages\.(\d+)\.patch_embed\.norm\.", r"encoder.patch_embeddings.\1.layer_norm."),
    (r"^encoder\.stages\.(\d+)\.norm\.", r"encoder.layer_norm.\1."),
    (r"^encoder\.stages\.(\d+)\.blocks\.(\d+)\.norm1\.", r"encoder.block.\1.\2.layer_norm_1."),
    (r"^encoder\.stages\.(\d+)\.blocks\.(\d+)\.norm2\.", r"encoder.block.\1.\2.layer_norm_2."),
    (
        r"^encoder\.stages\.(\d+)\.blocks\.(\d+)\.attention\.query\.",
        r"encoder.block.\1.\2.attention.self.query.",
    ),
    (
        r"^encoder\.stages\.(\d+)\.blocks\.(\d+)\.attention\.reduction\.",
        r"encoder.block.\1.\2.attention.self.sr.",
    ),
    (
        r"^encoder\.stages\.(\d+)\.blocks\.(\d+)\.attention\.reduction_norm\.",
        r"encoder.block.\1.\2.attention.self.layer_norm.",
    ),
    (
        r"^encoder\.stages\.(\d+)\.blocks\.(\d+)\.attention\.proj\.",
        r"encoder.block.\1.\2.attention.output.dense.",
    ),
    (r"^encoder\.stages\.(\d+)\.blocks\.(\d+)\.mix_ffn\.fc1\.", r"encoder.block.\1.\2.mlp.dense1."),
    (
        r"^encoder\.stages\.(\d+)\.blocks\.(\d+)\.mix_ffn\.dwconv\.",
        r"encoder.block.\1.\2.mlp.dwconv.dwconv.",
    ),
    (r"^encoder\.stages\.(\d+)\.blocks\.(\d+)\.mix_ffn\.fc2\.", r"encoder.block.\1.\2.mlp.dense2."),
    (r"^encoder\.", "segformer.encoder."),
    (r"^decode_head\.projections\.(\d+)\.", r"decode_head.linear_c.\1.proj."),
    (r"^decode_head\.fuse\.", "decode_head.linear_fuse."),
    (r"^decode_head\.fuse_norm\.", "decode_head.batch_norm."),
]


def _apply_rules(key: str, rules: list[tuple[str, Any]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _merge_key_value(state: StateDict) -> StateDict:
    merged: StateDict = {}
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.endswith(("#k", "#v")):
            halves.setdefault(key[:-2], {})[key[-1]] = tensor
        else:
            merged[key] = tensor
    for key, pair in halves.items():
        if set(pair) != {"k", "v"}:
            missing = "value" if "k" in pair else "key"
            raise CheckpointError(
                f"checkpoint has an attention {'key' if missing == 'value' else 'value'} "
                f"without its {missing}: {key}"
            )
        merged[key] = torch.cat([pair["k"], pair["v"]], dim=0)
    return merged


def detect_format(state: StateDict) -> str:
    """Which naming scheme a state dict uses."""
    keys = list(state)
    if any(k.startswith(("encoder.stages.", "decode_head.projections.")) for k in keys):
        return "segformer"
    if any(".attention.self.query." in k or k.startswith("decode_head.linear_c.") for k in keys):
        return "hf"
    if any(
        ".attention.q_proj." in k or k.startswith("decode_head.linear_projections.") for k in keys
    ):
        return "hf-live"
    stripped = [re.sub(r"^module\.", "", k) for k in keys]
    if any(k.startswith("backbone.patch_embed") for k in stripped):
        return "nvlabs"
    if any(k.startswith("patch_embed1.") for k in stripped):
        return "mit"
    raise CheckpointError(
        "not a SegFormer checkpoint: none of its keys look like SegFormer weights "
        f"(first keys: {', '.join(keys[:3]) or 'none'})"
    )


def to_our_names(state: StateDict, fmt: str | None = None) -> StateDict:
    """Rename a foreign state dict's keys to ours (fusing key/value where stored apart)."""
    fmt = fmt or detect_format(state)
    rules = {
        "segformer": [],
        "hf": HF_RULES,
        "hf-live": HF_LIVE_RULES,
        "nvlabs": NVLABS_RULES,
        "mit": NVLABS_RULES,
    }[fmt]
    renamed = {_apply_rules(k, rules): v for k, v in state.items()}
    return _merge_key_value({k: v for k, v in renamed.items() if not _DROPPED.match(k)})


def to_hf_names(state: StateDict) -> StateDict:
    """Our names → the classic Hugging Face names that transformers' save_pretrained writes."""
    out: StateDict = {}
    for key, tensor in state.items():
        m = re.match(r"^encoder\.stages\.(\d+)\.blocks\.(\d+)\.attention\.key_value\.(\w+)$", key)
        if m:
            base = f"segformer.encoder.block.{m[1]}.{m[2]}.attention.self"
            k, v = tensor.chunk(2, dim=0)
            out[f"{base}.key.{m[3]}"] = k.contiguous()
            out[f"{base}.value.{m[3]}"] = v.contiguous()
        else:
            out[_apply_rules(key, _OURS_TO_HF)] = tensor.contiguous()
    return out


# ---------------------------------------------------------------------------------------
# Config inferred from tensor shapes (for files that carry no config.json)
# ---------------------------------------------------------------------------------------
def infer_config(state: StateDict, fmt: str) -> tuple[SegformerConfig, str]:
    """Config and task from our-named tensors' shapes. Heads and strides are not stored in
    weights; every published MiT uses heads [1, 2, 5, 8] and strides 4, 2, 2, 2."""
    stages = sorted({int(m[1]) for k in state if (m := re.match(r"^encoder\.stages\.(\d+)\.", k))})
    if not stages or stages != list(range(len(stages))):
        raise CheckpointError(
            "cannot infer the encoder layout: patch embeddings missing from the checkpoint"
        )
    hidden, depths, srs, patches, ratios = [], [], [], [], []
    for s in stages:
        proj = state.get(f"encoder.stages.{s}.patch_embed.proj.weight")
        if proj is None:
            raise CheckpointError(
                f"cannot infer the encoder layout: stage {s} has no patch embedding weight"
            )
        hidden.append(proj.shape[0])
        patches.append(proj.shape[-1])
        blocks = {
            int(m[1])
            for k in state
            if (m := re.match(rf"^encoder\.stages\.{s}\.blocks\.(\d+)\.", k))
        }
        depths.append(len(blocks))
        red = state.get(f"encoder.stages.{s}.blocks.0.attention.reduction.weight")
        srs.append(red.shape[-1] if red is not None else 1)
        fc1 = state.get(f"encoder.stages.{s}.blocks.0.mix_ffn.fc1.weight")
        ratios.append(fc1.shape[0] // proj.shape[0] if fc1 is not None else 4)
    standard = [1, 2, 5, 8] if len(stages) == 4 else [max(1, h // 64) for h in hidden]
    heads = [n if width % n == 0 else 1 for n, width in zip(standard, hidden, strict=True)]
    strides = [4 if p == 7 else 2 for p in patches]
    if "decode_head.classifier.weight" in state:
        task = SEGMENTATION
        num_labels = state["decode_head.classifier.weight"].shape[0]
        decoder = state["decode_head.projections.0.weight"].shape[0]
    elif "classifier.weight" in state:
        task = CLASSIFICATION
        num_labels = state["classifier.weight"].shape[0]
        decoder = 256 if hidden[0] == 32 or depths[:2] == [2, 2] else 768
    else:
        task = "encoder"
        num_labels = 0
        decoder = 256 if depths[:2] == [2, 2] else 768
    eps = NVLABS_LAYER_NORM_EPS if fmt in ("nvlabs", "mit") else 1e-5
    config = SegformerConfig(
        hidden_sizes=hidden,
        depths=depths,
        num_attention_heads=heads,
        sr_ratios=srs,
        patch_sizes=patches,
        strides=strides,
        mlp_ratios=ratios,
        decoder_hidden_size=decoder,
        id2label={i: f"class_{i}" for i in range(num_labels)},
        layer_norm_eps=eps,
    )
    return config, task


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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported object"
        raise CheckpointError(
            f"{path}: refused to load: the file holds Python objects other than tensors and plain "
            f"data, which could run code ({first})"
        ) from None
    except Exception as exc:  # torch.load fails on junk with many exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
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


def _resolve_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES)
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        reason = (
            "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
            if offline
            else (f"the hub could not be reached or has no such model ({type(exc).__name__})")
        )
        raise CheckpointError(f"{repo_id}: not a local file or folder, and {reason}") from None
    return Path(folder)


def resolve(name_or_path: str | os.PathLike[str], revision: str | None = None) -> Path:
    """Where a model lives on disk: built-in name → local file → local folder → HF cache / hub."""
    from segformer.weights.builtin import builtin_path

    name = str(name_or_path)
    builtin = builtin_path(name)
    if builtin is not None:
        return builtin
    path = Path(name).expanduser()
    if path.exists():
        return path
    looks_like_repo = re.fullmatch(r"[\w.\-]+/[\w.\-]+", name) is not None
    if not looks_like_repo:
        raise CheckpointError(
            f"{name}: no such file or folder (and not a hub id of the form org/name)"
        )
    return _resolve_hub(name, revision)


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
    extras = dict(config_data.get("segformer", {}))
    extras["architectures"] = config_data.get("architectures", [])
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
    fmt = detect_format(state)
    state = to_our_names(state, fmt)
    inferred, stored_task = infer_config(state, fmt)
    if config is None:
        config = inferred
        if meta.get("CLASSES") and len(meta["CLASSES"]) == config.num_labels:
            config = config.with_labels([str(c) for c in meta["CLASSES"]])
    else:
        for name in ("hidden_sizes", "depths", "mlp_ratios", "sr_ratios"):
            said, found = getattr(config, name), getattr(inferred, name)
            if said != found:
                raise CheckpointError(
                    f"{source}: config.json says {name} {said} but the weights have {found}: "
                    "the config and the weights do not belong together"
                )
        if config.num_labels == 0:
            config = replace(config, id2label=inferred.id2label)
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

    metadata: dict[str, Any] = {k: v for k, v in extras.items() if k != "architectures"}
    metadata.setdefault("source", source)
    metadata["format"] = fmt
    if (
        meta.get("PALETTE")
        and len(meta["PALETTE"]) == config.num_labels
        and "palette" not in metadata
    ):
        metadata["palette"] = [[int(c) for c in rgb] for rgb in meta["PALETTE"]]
    if skip:  # a new head: the stored palette and scores describe a model we no longer have
        metadata.pop("palette", None)
        metadata.pop("metrics", None)
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
    from segformer.weights.builtin import DEFAULT_MODEL, builtin_path

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
    meta = {
        k: v for k, v in model.metadata.items() if k not in ("preprocessing", "format", "source")
    }
    if meta:
        config.setdefault("segformer", {}).update(meta)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from segformer.inference.processing import (
        ImageProcessor,  # processing resolves names through this module
    )

    preprocessing = model.metadata.get("preprocessing") or ImageProcessor().to_dict()
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
