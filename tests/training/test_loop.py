"""The training recipe and the runs around it: hand-computed schedule and loss, parameter
groups, configuration files and overrides, bit-identical resume after SIGKILL, divergence
handling, and what a finished run leaves behind."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segformer
from segformer.errors import SegformerError, TrainingDiverged
from segformer.training.checkpointing import load_checkpoint
from segformer.training.config import TrainConfig
from segformer.training.loop import (
    WarmupPolySchedule,
    model_from_checkpoint,
    parameter_groups,
    train,
)
from segformer.training.loss import segmentation_loss
from tests.conftest import REPO
from tests.segdata import make_samples, write_folder


# ---------------------------------------------------------------------------------------
# Fixtures: a tiny data set and a tiny model to start from
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_folder(root, make_samples(8, seed=1), "train")
    write_folder(root, make_samples(4, seed=2), "val")
    return root


@pytest.fixture
def small_config():
    """A narrow model whose widths suit the published head counts [1, 2, 5, 8], so that files
    saved from it load through every path (some infer heads from weights)."""
    from segformer.models.config import SegformerConfig

    return SegformerConfig(
        hidden_sizes=[8, 16, 40, 64],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 2, 5, 8],
        decoder_hidden_size=16,
        id2label={0: "background", 1: "thing", 2: "stuff"},
    )


@pytest.fixture
def start_model(tmp_path, small_config) -> Path:
    from segformer.models.segformer import SegformerForSemanticSegmentation

    return segformer.save(SegformerForSemanticSegmentation(small_config), tmp_path / "start")


def tiny_run(dataset_root: Path, start_model: Path, out: Path, **changes) -> TrainConfig:
    settings = dict(
        data=str(dataset_root),
        format="folder",
        model=str(start_model),
        output_dir=str(out),
        crop_size=[32, 32],
        scale=[64, 48],
        batch_size=2,
        max_steps=8,
        warmup_steps=2,
        lr=1e-3,
        eval_interval=4,
        eval_scale=None,
        checkpoint_interval=2,
        keep_checkpoints=2,
        log_interval=2,
        num_workers=0,
        threads=1,
        deterministic=True,
    )
    settings.update(changes)
    return TrainConfig(**settings)


# ---------------------------------------------------------------------------------------
# Recipe pieces against hand-computed values
# ---------------------------------------------------------------------------------------
def test_warmup_poly_schedule_matches_hand_computed_values():
    schedule = WarmupPolySchedule(
        base_lr=6e-5, max_steps=100, warmup_steps=10, warmup_ratio=1e-6, power=1.0
    )
    # lr = base · (1 − s/100) · (1 − (1 − s/10)(1 − 1e-6)) while s < 10, then base · (1 − s/100)
    assert schedule(0) * 6e-5 == pytest.approx(6e-5 * 1e-6, rel=1e-9)
    assert schedule(5) * 6e-5 == pytest.approx(6e-5 * 0.95 * 0.5000005, rel=1e-9)
    assert schedule(10) * 6e-5 == pytest.approx(6e-5 * 0.9, rel=1e-12)
    assert schedule(50) * 6e-5 == pytest.approx(3e-5, rel=1e-12)
    assert schedule(100) == 0.0
    squared = WarmupPolySchedule(base_lr=1.0, max_steps=10, power=2.0, min_lr=0.1)
    assert squared(5) == pytest.approx(0.9 * 0.25 + 0.1)


def test_warm_restarts_decay_each_cycle_to_min_lr():
    # cycles [0, 40), [40, 70), [70, 100]; restarts jump to 0.5 × base
    schedule = WarmupPolySchedule(base_lr=2.0, max_steps=100, restarts=(40, 70), restart_lr=0.5)
    assert schedule(0) == 1.0
    assert schedule(20) == pytest.approx(0.5)  # half-way down the first cycle
    assert schedule(39) == pytest.approx(1 / 40)
    assert schedule(40) == pytest.approx(0.5)
    assert schedule(55) == pytest.approx(0.25)
    assert schedule(70) == pytest.approx(0.5)
    assert schedule(85) == pytest.approx(0.25)
    assert schedule(100) == 0.0 and schedule(130) == 0.0
    floor = WarmupPolySchedule(
        base_lr=1.0, max_steps=20, restarts=(10,), restart_lr=0.6, min_lr=0.1
    )
    assert floor(10) == pytest.approx(0.6) and floor(15) == pytest.approx(0.35)


def test_optimizer_groups_head_lr_and_no_decay_on_norms_and_biases(tiny_model):
    groups = {
        g["name"]: g
        for g in parameter_groups(tiny_model, lr=6e-5, weight_decay=0.01, head_lr_mult=10)
    }
    assert set(groups) == {"encoder", "encoder (no decay)", "head", "head (no decay)"}
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    for group in groups.values():
        members = [names[id(p)] for p in group["params"]]
        assert all(
            n.startswith("decode_head.") == group["name"].startswith("head") for n in members
        )
        if "no decay" in group["name"]:
            assert group["weight_decay"] == 0.0
            assert all(n.endswith(".bias") or "norm" in n for n in members)
        else:
            assert group["weight_decay"] == 0.01
            assert all(n.endswith(".weight") and "norm" not in n for n in members)
    assert groups["head"]["lr"] == pytest.approx(6e-4) and groups["encoder"]["lr"] == pytest.approx(
        6e-5
    )
    assert sum(len(g["params"]) for g in groups.values()) == len(list(tiny_model.parameters()))


def _float64_loss(logits, labels, weights):
    """The loss written out with PyTorch's own upsampling and cross-entropy, in float64."""
    up = F.interpolate(
        logits.double(), size=labels.shape[-2:], mode="bilinear", align_corners=False
    )
    total = F.cross_entropy(
        up,
        labels,
        weight=None if weights is None else weights.double(),
        ignore_index=255,
        reduction="sum",
    )
    return total / (labels != 255).sum().clamp(min=1)


@pytest.mark.parametrize("classes", [5, 40])  # planar and channels-last paths
@pytest.mark.parametrize(
    "shape",
    [((9, 12), (36, 48)), ((7, 10), (29, 41)), ((8, 8), (8, 8))],
    ids=["4x-bands", "uneven-scale", "same-size"],
)
@pytest.mark.parametrize("weighted", [False, True])
def test_banded_loss_and_gradient_equal_upsample_then_cross_entropy(
    classes, shape, weighted, monkeypatch
):
    from segformer.training import loss as training_loss

    monkeypatch.setattr(training_loss, "_LOSS_BAND_ELEMENTS", 2000)  # many small bands
    torch.manual_seed(classes)
    (h, w), (height, width) = shape
    logits = (torch.randn(3, classes, h, w) * 3).requires_grad_()
    labels = torch.randint(0, classes, (3, height, width))
    labels[0, :5] = 255
    labels[1] = 255  # an image with nothing labelled contributes nothing
    weights = torch.rand(classes) + 0.5 if weighted else None
    loss = segmentation_loss(logits, labels, weights)
    (gradient,) = torch.autograd.grad(loss * 3.0, logits)
    reference_logits = logits.detach().double().requires_grad_()
    reference = _float64_loss(reference_logits, labels, weights)
    (expected,) = torch.autograd.grad(reference * 3.0, reference_logits)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.allclose(gradient.double(), expected, rtol=1e-4, atol=1e-9)
    assert not gradient[1].any()


def test_loss_on_bf16_logits_returns_a_bf16_gradient():
    logits = torch.randn(2, 20, 8, 8).bfloat16().requires_grad_()
    labels = torch.randint(0, 20, (2, 32, 32))
    segmentation_loss(logits, labels).backward()
    assert logits.grad.dtype == torch.bfloat16
    reference_logits = logits.detach().double().requires_grad_()
    _float64_loss(reference_logits, labels, None).backward()
    error = (logits.grad.double() - reference_logits.grad).norm() / reference_logits.grad.norm()
    assert error < 1e-2  # bf16 rounding of the gradient only


def test_loss_is_cross_entropy_averaged_over_labelled_pixels():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1, 255, 2], [2, 255, 1, 0], [0, 0, 1, 1], [2, 2, 255, 0]]])
    up = F.interpolate(logits, size=(4, 4), mode="bilinear", align_corners=False)
    log_probs = up.log_softmax(1)[0]
    valid = [(y, x) for y in range(4) for x in range(4) if labels[0, y, x] != 255]
    expected = -sum(log_probs[labels[0, y, x], y, x] for y, x in valid) / len(valid)
    assert segmentation_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    weights = torch.tensor([1.0, 2.0, 0.5])
    weighted = -sum(
        weights[labels[0, y, x]] * log_probs[labels[0, y, x], y, x] for y, x in valid
    ) / len(valid)
    assert segmentation_loss(logits, labels, weights).item() == pytest.approx(
        weighted.item(), rel=1e-6
    )


# ---------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------
def test_run_leaves_checkpoints_reports_and_a_loadable_best_model(
    dataset_root, start_model, tmp_path
):
    result = train(tiny_run(dataset_root, start_model, tmp_path / "run", lr=2e-3))
    run = tmp_path / "run"
    assert result.steps == 8 and result.best_metrics is not None
    # last K checkpoints plus the best one
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*.pt"))
    assert kept[-2:] == ["step-0000006.pt", "step-0000008.pt"]
    assert f"step-{result.best_step:07d}.pt" in kept and len(kept) <= 3
    assert not list((run / "checkpoints").glob(".*tmp*"))
    saved = TrainConfig.from_file(run / "config.yaml")
    assert saved.max_steps == 8 and saved.crop_size == [32, 32]
    best = segformer.load(run / "best")
    assert best.labels == ["background", "thing", "stuff"]
    assert best.metadata.metrics["mIoU"] == pytest.approx(
        result.best_metrics.summary()["mIoU"], abs=1e-3
    )
    assert best.metadata.preprocessing["do_resize"] is False
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(100 * result.best_metrics.mean_iou, abs=1e-3)
    assert np.array_equal(np.array(metrics["confusion_matrix"]), result.best_metrics.confusion)
    for picture in ("training_curves", "validation", "per_class_iou", "confusion_matrix"):
        assert (run / "plots" / f"{picture}.png").stat().st_size > 1000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    history = json.loads((run / "history.json").read_text())
    assert [r["step"] for r in history["train"]] == [2, 4, 6, 8]
    assert [r["step"] for r in history["val"]] == [4, 8]
    assert all(math.isfinite(r["loss"]) for r in history["train"])
    with pytest.raises(SegformerError, match="already holds checkpoints"):
        train(tiny_run(dataset_root, start_model, run))


_KILLING_RUN = textwrap.dedent(
    """
    import os, signal, sys
    import segformer.training.checkpointing as checkpointing
    from segformer.inference.segmenter import write_atomic

    calls = 0
    die_at = int(os.environ["DIE_AT_SAVE"])
    original = checkpointing.save_checkpoint

    def half_then_die(file):
        file.write(b"half a checkpoint")
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def save_then_die(state, path):
        # Die in the middle of checkpoint write number DIE_AT_SAVE, inside the real atomic
        # write: its half-written temporary file is left behind, and every step after the
        # previous checkpoint is lost.
        global calls
        calls += 1
        if calls == die_at:
            write_atomic(path, half_then_die)
        original(state, path)

    checkpointing.save_checkpoint = save_then_die
    from segformer.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_checkpoint_gives_the_model_the_run_exports(dataset_root, start_model, tmp_path):
    """A run still going can be published from its newest checkpoint: the model rebuilt from
    the last step's checkpoint is the one the run exported (``last/``) — averaged weights, the
    trained model's BatchNorm statistics, preprocessing, palette, steps."""
    run = tmp_path / "run"
    train(tiny_run(dataset_root, start_model, run, max_steps=4, ema_decay=0.5, eval_interval=0))
    checkpoint = load_checkpoint(run / "checkpoints" / "step-0000004.pt")
    exported = segformer.load(run / "last")
    rebuilt = model_from_checkpoint(checkpoint)
    assert rebuilt.state_dict().keys() == exported.state_dict().keys()
    for name, weight in exported.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], weight), name
    assert any("running_mean" in name for name in exported.state_dict())
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(pixels), exported(pixels))
    assert rebuilt.metadata.preprocessing == exported.metadata.preprocessing
    assert rebuilt.metadata.palette == exported.metadata.palette
    assert rebuilt.metadata.training["steps"] == exported.metadata.training["steps"] == 4
    trained = model_from_checkpoint(checkpoint, averaged=False).state_dict()
    assert all(torch.equal(trained[k], v) for k, v in checkpoint["model"].items())
    assert not all(torch.equal(trained[k], v) for k, v in exported.state_dict().items())


def _segformer(
    args: list[str], script: str | None = None, die_at_save: int = 0
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "SEGFORMER_ALLOCATOR": "system",
        "OMP_NUM_THREADS": "1",
        "DIE_AT_SAVE": str(die_at_save),
    }
    command = (
        [sys.executable, "-c", script, *args]
        if script
        else [sys.executable, "-m", "segformer.cli", *args]
    )
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_resume_after_sigkill_is_bit_identical(dataset_root, start_model, tmp_path):
    base = tiny_run(dataset_root, start_model, tmp_path / "x", num_workers=1, photometric=True)
    recipe = tmp_path / "recipe.yaml"
    base.save(recipe)

    whole = _segformer(["train", str(recipe), "--output-dir", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr

    killed = _segformer(
        ["train", str(recipe), "--output-dir", str(tmp_path / "killed")],
        script=_KILLING_RUN,
        die_at_save=3,
    )
    assert killed.returncode == -9, killed.stderr
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*.pt")) == [
        "step-0000002.pt",
        "step-0000004.pt",
    ]
    assert list(checkpoints.glob(".*tmp*"))  # the interrupted write left only its temporary file

    resumed = _segformer(["train", "--resume", str(tmp_path / "killed")])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step-0000004.pt" in resumed.stderr
    assert not list(checkpoints.glob(".*tmp*"))  # cleaned up on resume

    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "step-0000008.pt")
    b = load_checkpoint(tmp_path / "killed" / "checkpoints" / "step-0000008.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for state_a, state_b in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_a[name], state_b[name])
    assert (
        a["data"] == b["data"] and a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 8
    )
    assert [r["loss"] for r in a["history"]["train"]] == [r["loss"] for r in b["history"]["train"]]
    assert a["best"] == b["best"]

    # Killed while writing its first checkpoint: nothing of the run can be kept, so --resume
    # starts it again from step 0 with its saved config, and ends where the whole run did.
    first = tmp_path / "killed-first"
    killed = _segformer(
        ["train", str(recipe), "--output-dir", str(first)], script=_KILLING_RUN, die_at_save=1
    )
    assert killed.returncode == -9, killed.stderr
    assert not list((first / "checkpoints").glob("step-*.pt"))
    assert list((first / "checkpoints").glob(".step-0000002.*.tmp.pt"))
    resumed = _segformer(["train", "--resume", str(first)])
    assert resumed.returncode == 0, resumed.stderr
    assert "no complete checkpoint yet: starting the run again from step 0" in resumed.stderr
    assert not list((first / "checkpoints").glob(".*tmp*"))
    c = load_checkpoint(first / "checkpoints" / "step-0000008.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], c["model"][key]), key
    assert (
        a["best"] == c["best"]
        and a["history"]["train"][0]["loss"] == c["history"]["train"][0]["loss"]
    )


def test_leftovers_of_interrupted_writes_are_removed_when_the_run_restarts(
    dataset_root, start_model, tmp_path
):
    # A finished run, then what kills at the worst moments leave behind: a half-written
    # checkpoint, the .saving-* folder of an export into best/ or last/, a plot and the
    # config being replaced. --resume must clean them up and finish the run again.
    run = tmp_path / "run"
    config = tiny_run(dataset_root, start_model, run, max_steps=2, eval_interval=0)
    train(config)
    leftovers = [
        run / "checkpoints" / ".step-0000004.pt.tmp",
        run / "checkpoints" / ".step-0000004.1a2b3c4d.tmp.pt",
        run / "best" / ".saving-k2j4h5" / "model.safetensors",
        run / "last" / ".saving-9x8y7z" / "config.json",
        run / "plots" / ".validation.0badf00d.tmp.png",
        run / ".config.yaml-x1y2z3.tmp",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    (run / "notes.txt").write_text("mine")
    result = train(config, resume=run)
    assert result.steps == 2
    for path in leftovers:
        assert not path.exists(), path
    assert not list(run.glob("*/.saving-*"))
    assert (run / "notes.txt").read_text() == "mine"
    assert segformer.load(run / "best").labels == ["background", "thing", "stuff"]


@pytest.fixture
def bad_label_data(tmp_path) -> tuple[Path, Path]:
    """A folder dataset whose fourth training mask holds label 7 (3 classes: 0..2)."""
    from PIL import Image

    root = write_folder(tmp_path / "bad", make_samples(8, seed=1), "train")
    write_folder(root, make_samples(4, seed=2), "val")
    mask = root / "masks" / "train" / "003.png"
    label = np.array(Image.open(mask))
    label[10:20, 10:20] = 7
    Image.fromarray(label).save(mask)
    return root, mask


@pytest.mark.parametrize("workers", [0, 1])
def test_out_of_range_labels_without_preflight_stop_in_one_line_and_leave_no_run(
    bad_label_data, start_model, tmp_path, capsys, workers
):
    from segformer.cli import main

    root, mask = bad_label_data
    recipe = tmp_path / "recipe.yaml"
    tiny_run(root, start_model, tmp_path / "unused", num_workers=workers).save(recipe)
    out = tmp_path / "run"
    args = ["train", str(recipe), "--set", "preflight=false", "--output-dir", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    # the same line the pre-flight scan gives, from the worker that read the mask
    assert err.endswith(f"\nerror: {mask}: label 7, but there are 3 classes (0..2, 255 = ignore)\n")
    assert "Traceback" not in err and err.count("error") == 1
    assert not out.exists()  # created by this run, nothing checkpointed: removed
    # a folder that was there before is the user's: kept
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(args) == 2
    assert (out / "notes.txt").is_file()
    capsys.readouterr()
    # with the pre-flight scan (the default) the same problem is found before training
    assert main(["train", str(recipe), "--output-dir", str(tmp_path / "checked")]) == 2
    assert f"error: labels outside the label set: {mask}: label 7" in capsys.readouterr().err
    assert not (tmp_path / "checked").exists()


def test_divergence_stops_and_keeps_the_last_good_checkpoint(
    dataset_root, start_model, tmp_path, monkeypatch
):
    import segformer.training.loop as training

    real_loss = training.segmentation_loss
    calls = {"n": 0}

    def loss_turning_nan(logits, labels, weights=None):
        calls["n"] += 1
        loss = real_loss(logits, labels, weights)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(training, "segmentation_loss", loss_turning_nan)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5.*step-0000004\.pt"):
        train(tiny_run(dataset_root, start_model, run, eval_interval=0))
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == [
        "step-0000002.pt",
        "step-0000004.pt",
    ]


def test_start_from_a_checkpoint_with_another_label_set_or_an_encoder(
    dataset_root, small_config, tmp_path
):
    from segformer.models.segformer import (
        SegformerForImageClassification,
        SegformerForSemanticSegmentation,
    )

    five = SegformerForSemanticSegmentation(small_config.with_labels([f"c{i}" for i in range(5)]))
    folder = segformer.save(five, tmp_path / "five")
    labels = tmp_path / "labels.json"
    labels.write_text(
        json.dumps(
            {"labels": ["sky", "road", "car"], "palette": [[0, 0, 255], [90, 90, 90], [255, 0, 0]]}
        )
    )
    result = train(
        tiny_run(
            dataset_root,
            folder,
            tmp_path / "relabelled",
            labels=str(labels),
            max_steps=2,
            eval_interval=0,
        )
    )
    model = segformer.load(result.run_dir / "best")
    assert model.labels == ["sky", "road", "car"] and model.metadata.palette[2] == [255, 0, 0]
    # the encoder carried over (it moved only by two small steps), the classifier is new
    start = five.state_dict()
    after = model.state_dict()
    assert (
        after["encoder.stages.0.patch_embed.proj.weight"]
        - start["encoder.stages.0.patch_embed.proj.weight"]
    ).abs().max() < 0.05
    assert after["decode_head.classifier.weight"].shape == (
        3,
        small_config.decoder_hidden_size,
        1,
        1,
    )

    imagenet = SegformerForImageClassification(
        small_config.with_labels([f"n{i}" for i in range(7)])
    )
    torch.save({"state_dict": imagenet.state_dict()}, tmp_path / "mit.pth")
    result = train(
        tiny_run(
            dataset_root,
            tmp_path / "mit.pth",
            tmp_path / "from_encoder",
            labels=str(labels),
            max_steps=2,
            eval_interval=0,
        )
    )
    assert segformer.load(result.run_dir / "best").labels == ["sky", "road", "car"]


def test_train_command_reports_bad_settings_in_one_line(tmp_path, capsys):
    from segformer.cli import main

    assert main(["train", "--max-steps", "3"]) == 2
    assert "error: no dataset: give --data DIR" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--set", "max_step=3"]) == 2
    assert "unknown setting 'max_step' (did you mean max_steps?)" in capsys.readouterr().err
    assert (
        main(["train", "--data", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "run")])
        == 2
    )
    assert "no such dataset folder" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_accumulation_clipping_bf16_class_weights_and_balanced_sampling_run(
    dataset_root, start_model, tmp_path
):
    config = tiny_run(
        dataset_root,
        start_model,
        tmp_path / "run",
        max_steps=2,
        grad_accum_steps=2,
        clip_grad_norm=0.5,
        precision="bf16",
        class_weights="median-frequency",
        sampling="class-balanced",
        eval_interval=0,
        checkpoint_interval=2,
    )
    result = train(config)
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000002.pt")
    # 8 images, batch 2: 4 batches per epoch, two per optimizer step
    assert checkpoint["data"] == {"epoch": 0, "batches_done": 4}
    # the file format runs started with earlier versions wrote, and resume from
    assert set(checkpoint) == {
        "format",
        "version",
        "step",
        "model",
        "model_config",
        "labels",
        "palette",
        "train_config",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "data",
        "best",
        "history",
    }
    assert all(math.isfinite(r["loss"]) for r in result.history["train"])
