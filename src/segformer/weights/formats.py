"""Checkpoint formats: each one is a key map onto our parameter names, nothing more.

- ``hf``: Hugging Face files as transformers' ``save_pretrained`` and the nvidia/* hub models
  write them (``segformer.encoder.block.0.0.attention.self.query.weight`` …).
- ``hf-live``: the names transformers 5.x uses inside a live model, which is what a user gets
  from ``torch.save(model.state_dict())`` (``segformer.stages.0.blocks.0.attention.q_proj`` …).
- ``nvlabs``: NVlabs SegFormer / mmsegmentation ``.pth`` files (``backbone.block1.0.attn.kv`` …).
- ``mit``: ImageNet-pretrained MiT encoders (the ``nvlabs`` backbone names without ``backbone.``,
  plus a ``head`` classifier).
- ``segformer``: our own names, as ``model.state_dict()`` gives them.

Files without a ``config.json`` get one inferred from their tensor shapes (``infer_config``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from segformer.errors import CheckpointError
from segformer.models.config import NVLABS_LAYER_NORM_EPS, SegformerConfig

StateDict = dict[str, torch.Tensor]

SEGMENTATION = "semantic-segmentation"
CLASSIFICATION = "image-classification"


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
