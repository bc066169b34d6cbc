"""Training checkpoints: one file per saved step holding everything needed to continue exactly
(weights, optimiser, scheduler, scaler, every RNG state, the data position, the best result and
the history), written atomically, listed, pruned and found again to resume from.

A file is ``checkpoints/step-NNNNNNN.pt``, a dict loadable with ``weights_only=True``:
format, version, step, model, ema (with weight averaging), model_config, labels, palette,
train_config, optimizer, scheduler, scaler, rng (one entry per process), data {epoch,
batches_done}, best, history.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segformer.errors import SegformerError
from segformer.inference.segmenter import write_atomic
from segformer.training.distributed import Distributed, gather_objects

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "find_resume_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "remove_interrupted_writes",
    "save_and_prune",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "segformer-train-checkpoint"
CHECKPOINT_VERSION = 1

_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------
def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:07d}.pt"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write the checkpoint through a temporary file beside ``path`` that is renamed into
    place: a kill at any moment leaves either the complete new file or none."""

    write_atomic(path, lambda file: torch.save(state, file))


def save_and_prune(state: dict[str, Any], folder: Path, keep: int, best_step: int | None) -> Path:
    """Save ``state`` as its step's checkpoint, then delete all but the newest ``keep`` and
    the best one (so the best weights can always be resumed from)."""
    path = checkpoint_path(folder, state["step"])
    save_checkpoint(state, path)
    kept = {p for _, p in list_checkpoints(folder)[-keep:]}
    if best_step is not None:
        kept.add(checkpoint_path(folder, best_step))
    for _, old in list_checkpoints(folder):
        if old not in kept:
            old.unlink(missing_ok=True)
    return path


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


# The folders of a run that writes go to; leftovers are looked for only there, never in the
# user's files elsewhere.
_RUN_SUBFOLDERS = ("", "checkpoints", "plots", "best", "last")


def remove_interrupted_writes(run_dir: Path) -> list[Path]:
    """Delete what writes interrupted by a kill left in a run folder: temporary files of
    atomic writes (``.NAME.tmp``, ``.NAME.<hex>.tmp.EXT``) and the ``.saving-*`` folders of
    model exports. Every write goes through one of these, so the files they were meant to
    replace are whole (old or new) and nothing else needs repair. Returns what was removed."""
    removed = []
    for sub in _RUN_SUBFOLDERS:
        folder = run_dir / sub
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(".saving-") and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith(".") and ".tmp" in path.name and path.is_file():
                path.unlink(missing_ok=True)
            else:
                continue
            removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------------------
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


def all_rng_states(process: Distributed) -> list[dict[str, Any]]:
    """Every process's RNG states, in rank order (a collective under torchrun)."""
    return gather_objects(rng_state(), process)


def restore_rng(states: list[dict[str, Any]], process: Distributed, seed: int, step: int) -> bool:
    """Continue each process's random streams where the checkpoint left them; when the number
    of processes changed that is impossible, so they are re-seeded from (seed, step, rank).
    Returns whether the streams continue exactly."""
    if len(states) == process.world_size:
        set_rng_state(states[process.rank])
        return True
    seed_everything(seed + step + process.rank)
    return False
