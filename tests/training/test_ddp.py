"""Distributed training under torchrun: two CPU processes (gloo) train on a tiny data set, and
their all-reduced validation equals, count for count, a single process evaluating the model
they saved."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import segformer
from segformer.models.segformer import SegformerForSemanticSegmentation
from segformer.training.checkpointing import load_checkpoint
from segformer.training.config import TrainConfig
from segformer.training.datasets import open_dataset
from segformer.training.metrics import evaluate_dataset
from tests.conftest import REPO
from tests.segdata import make_samples, write_folder


@pytest.mark.slow
def test_two_processes_validate_exactly_like_one(tmp_path):
    from segformer.models.config import SegformerConfig

    write_folder(tmp_path / "data", make_samples(8, seed=1), "train")
    write_folder(
        tmp_path / "data", make_samples(7, seed=2, size=(48, 72)), "val"
    )  # 7: uneven shards
    config = SegformerConfig(
        hidden_sizes=[8, 16, 40, 64],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 2, 5, 8],
        decoder_hidden_size=16,
        id2label={0: "a", 1: "b", 2: "c"},
    )
    start = segformer.save(SegformerForSemanticSegmentation(config), tmp_path / "start")
    recipe = TrainConfig(
        data=str(tmp_path / "data"),
        format="folder",
        model=str(start),
        output_dir=str(tmp_path / "run"),
        crop_size=[32, 32],
        scale=[64, 48],
        batch_size=2,
        max_steps=3,
        warmup_steps=1,
        lr=1e-3,
        eval_interval=0,
        eval_scale=None,
        checkpoint_interval=3,
        log_interval=1,
        num_workers=0,
    )
    recipe.save(tmp_path / "recipe.yaml")

    env = {**os.environ, "SEGFORMER_ALLOCATOR": "system", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "segformer.cli",
        "train",
        str(tmp_path / "recipe.yaml"),
    ]
    job = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = job.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # torchrun's workers too
        job.communicate()
        raise
    assert job.returncode == 0, stdout[-3000:] + stderr[-3000:]

    run = tmp_path / "run"
    distributed = np.array(json.loads((run / "metrics.json").read_text())["confusion_matrix"])
    assert distributed.sum() == sum(
        int((label != 255).sum()) for _, label in make_samples(7, seed=2, size=(48, 72))
    )
    # only rank 0 writes; its checkpoint carries both processes' random streams
    assert len(list((run / "tensorboard").glob("events.*"))) == 1
    checkpoint = load_checkpoint(run / "checkpoints" / "step-0000003.pt")
    assert len(checkpoint["rng"]) == 2  # 4 images per process = 2 batches per epoch:
    assert checkpoint["data"] == {"epoch": 1, "batches_done": 1}

    single = evaluate_dataset(
        segformer.load(run / "best"), open_dataset(tmp_path / "data", "folder", "val"), device="cpu"
    )
    assert np.array_equal(single.confusion, distributed)
