"""Models that ship inside the package, usable offline by name."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent

# name → folder (Hugging Face layout) inside this package
BUILTIN_MODELS: dict[str, str] = {
    "camvid-b0": "camvid-b0",
}
DEFAULT_MODEL = "camvid-b0"


def builtin_path(name: str) -> Path | None:
    """The folder of a built-in model, or None if ``name`` is not one (or is not installed)."""
    folder = BUILTIN_MODELS.get(name)
    if folder is None:
        return None
    path = _HERE / folder
    return path if (path / "model.safetensors").is_file() else None
