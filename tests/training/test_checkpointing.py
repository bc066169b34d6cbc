"""Checkpoint files: which ones are kept, which are found to resume from, what an interrupted
write leaves and how it is cleaned up, RNG states, and the run state a checkpoint carries."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from segformer.errors import SegformerError
from segformer.training.checkpointing import (
    CHECKPOINT_FORMAT,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_interrupted_writes,
    restore_rng,
    rng_state,
    save_and_prune,
    set_rng_state,
)
from segformer.training.distributed import Distributed
from segformer.training.loop import RunState
from segformer.training.metrics import SegmentationMetrics


def _state(step: int) -> dict:
    return {"format": CHECKPOINT_FORMAT, "version": 1, "step": step, "weights": torch.ones(2)}


def test_saving_keeps_the_newest_k_and_the_best(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8, 10):
        save_and_prune(_state(step), folder, keep=2, best_step=4)
    assert [s for s, _ in list_checkpoints(folder)] == [4, 8, 10]
    save_and_prune(_state(12), folder, keep=2, best_step=12)
    assert [s for s, _ in list_checkpoints(folder)] == [10, 12]
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000010.pt", "step-0000012.pt"]
    assert load_checkpoint(folder / "step-0000012.pt")["step"] == 12


def test_only_complete_checkpoints_are_listed_and_resumed_from(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for name in ("step-0000002.pt", "step-0000010.pt", ".step-0000012.pt.tmp", "notes.pt"):
        (folder / name).write_bytes(b"x")
    assert [s for s, _ in list_checkpoints(folder)] == [2, 10]
    assert find_resume_checkpoint(tmp_path / "run") == folder / "step-0000010.pt"
    assert find_resume_checkpoint(folder) == folder / "step-0000010.pt"
    assert find_resume_checkpoint(folder / "step-0000002.pt") == folder / "step-0000002.pt"
    with pytest.raises(SegformerError, match="no checkpoint to resume from"):
        find_resume_checkpoint(tmp_path / "elsewhere")


def test_foreign_damaged_and_newer_files_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    (tmp_path / "damaged.pt").write_bytes(b"half a checkpoint")
    torch.save({**_state(1), "version": 99}, tmp_path / "newer.pt")
    with pytest.raises(SegformerError, match="not a segformer training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(SegformerError, match="not a readable training checkpoint"):
        load_checkpoint(tmp_path / "damaged.pt")
    with pytest.raises(SegformerError, match="newer segformer"):
        load_checkpoint(tmp_path / "newer.pt")


def test_interrupted_writes_are_removed_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    leftovers = [
        run / "checkpoints" / ".step-0000004.pt.tmp",  # the old naming
        run / "checkpoints" / ".step-0000004.0a1b2c3d.tmp.pt",  # write_atomic's
        run / ".config.yaml-abc123.tmp",  # TrainConfig.save's
        run / ".history.12345678.tmp.json",
        run / "plots" / ".training_curves.deadbeef.tmp.png",
    ]
    folders = [run / "best" / ".saving-abc", run / "last" / ".saving-def"]
    kept = [
        run / "checkpoints" / "step-0000002.pt",
        run / "config.yaml",
        run / "best" / "model.safetensors",
        run / "tensorboard" / ".events.tmp",  # not a folder we write into
        run / "notes.tmp",  # not hidden: not one of ours
    ]
    for path in [*leftovers, *kept, *(f / "model.safetensors" for f in folders)]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    removed = remove_interrupted_writes(run)
    assert sorted(removed) == sorted([*leftovers, *folders])
    assert not any(p.exists() for p in [*leftovers, *folders])
    assert all(p.exists() for p in kept)
    assert remove_interrupted_writes(tmp_path / "absent") == []


def test_rng_states_round_trip_and_restart_when_the_process_count_changes():
    set_rng_state(rng_state())  # the plain-typed form loads back
    saved = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng([saved], Distributed(), seed=0, step=0)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    # saved by 2 processes, resumed by 1: re-seeded from seed + step + rank
    assert not restore_rng([saved, saved], Distributed(), seed=5, step=10)
    after_restart = torch.rand(1)
    torch.manual_seed(15)
    assert torch.equal(after_restart, torch.rand(1))


def test_run_state_round_trips_through_the_checkpoint_entries():
    state = RunState()
    assert state.to_checkpoint() == {
        "step": 0,
        "data": {"epoch": 0, "batches_done": 0},
        "best": {"mIoU": None, "step": None, "confusion": None},
        "history": {"train": [], "val": []},
    }
    state.step, state.epoch, state.batches_done = 6, 1, 2
    state.record_training(0.5, 1e-3, 10.0)
    good = SegmentationMetrics(["a", "b"], np.array([[3, 1], [0, 4]]))  # IoU 3/4, 4/5
    worse = SegmentationMetrics(["a", "b"], np.array([[2, 2], [0, 4]]))  # IoU 2/4, 4/6
    assert state.record_validation(good)
    state.step = 8
    assert not state.record_validation(worse)
    assert state.best["step"] == 6 and state.best["mIoU"] == pytest.approx(100 * (0.75 + 0.8) / 2)
    assert [r["step"] for r in state.history["val"]] == [6, 8]
    again = RunState.from_checkpoint(state.to_checkpoint())
    assert (again.step, again.epoch, again.batches_done, again.saved_step) == (8, 1, 2, 8)
    assert again.best == state.best and again.history == state.history
    assert np.array_equal(again.best_metrics(["a", "b"]).confusion, good.confusion)
