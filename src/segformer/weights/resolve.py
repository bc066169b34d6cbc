"""Where a model name points, decided in one place: built-in model → local file → local
folder → Hugging Face cache / hub (``HF_HUB_OFFLINE=1`` keeps to the cache)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import snapshot_download

from segformer.errors import CheckpointError
from segformer.weights.builtin import builtin_path

# What a hub download fetches: a model folder in Hugging Face layout, nothing else.
HUB_FILES = [
    "config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "preprocessor_config.json",
    "README.md",
]


def _resolve_hub(repo_id: str, revision: str | None) -> Path:
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
