"""Every checkpoint format loads into the same model; our saves load in transformers; bad files
give clear errors. The reference for numbers is always transformers' own model."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

import segformer
from segformer.errors import CheckpointError
from segformer.models.config import NVLABS_LAYER_NORM_EPS
from segformer.weights.formats import detect_format
from tests.conftest import CITYSCAPES_B0, CITYSCAPES_SAMPLE, randomize, rel

LABELS = ["sky", "road", "car", "person", "tree"]


@pytest.fixture(scope="module")
def reference() -> transformers.SegformerForSemanticSegmentation:
    """A randomly initialised transformers B0 with five named labels."""
    torch.manual_seed(1)
    config = transformers.SegformerConfig(
        num_labels=5,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    model = transformers.SegformerForSemanticSegmentation(config).eval()
    randomize(model)
    return model


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    return torch.randn(1, 3, 96, 160)


@pytest.fixture(scope="module")
def expected(reference, pixel_values) -> torch.Tensor:
    with torch.no_grad():
        return reference(pixel_values).logits


def logits_of(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values)


def to_nvlabs(
    hf_state: dict[str, torch.Tensor], prefix: str = "backbone."
) -> dict[str, torch.Tensor]:
    """The NVlabs/mmseg key layout, written out by hand from its documentation: stages and
    blocks counted from 1 in the names, key and value stacked in one ``kv`` matrix (key first)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        parts = key.split(".")
        if key.startswith("segformer.encoder.patch_embeddings."):
            stage, kind, leaf = int(parts[3]) + 1, parts[4], parts[5]
            out[f"{prefix}patch_embed{stage}.{'proj' if kind == 'proj' else 'norm'}.{leaf}"] = (
                tensor
            )
        elif key.startswith("segformer.encoder.layer_norm."):
            out[f"{prefix}norm{int(parts[3]) + 1}.{parts[4]}"] = tensor
        elif key.startswith("segformer.encoder.block."):
            stage, block, rest = int(parts[3]) + 1, parts[4], ".".join(parts[5:])
            base = f"{prefix}block{stage}.{block}."
            table = {
                "layer_norm_1": "norm1",
                "layer_norm_2": "norm2",
                "attention.self.query": "attn.q",
                "attention.self.sr": "attn.sr",
                "attention.self.layer_norm": "attn.norm",
                "attention.output.dense": "attn.proj",
                "mlp.dense1": "mlp.fc1",
                "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
                "mlp.dense2": "mlp.fc2",
            }
            module, leaf = rest.rsplit(".", 1)
            if module == "attention.self.key":
                value = hf_state[key.replace("attention.self.key", "attention.self.value")]
                out[f"{base}attn.kv.{leaf}"] = torch.cat([tensor, value])
            elif module != "attention.self.value":
                out[f"{base}{table[module]}.{leaf}"] = tensor
        elif key.startswith("decode_head.linear_c."):
            out[f"decode_head.linear_c{int(parts[2]) + 1}.proj.{parts[4]}"] = tensor
        elif key.startswith("decode_head.linear_fuse."):
            out[f"decode_head.linear_fuse.conv.{parts[2]}"] = tensor
        elif key.startswith("decode_head.batch_norm."):
            out[f"decode_head.linear_fuse.bn.{parts[2]}"] = tensor
        elif key.startswith("decode_head.classifier."):
            out[f"decode_head.linear_pred.{parts[2]}"] = tensor
        elif key.startswith("classifier."):
            out[f"head.{parts[1]}"] = tensor
        else:
            raise AssertionError(f"unmapped key {key}")
    return out


def classic_state(model: torch.nn.Module, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The key names transformers writes to disk (its save_pretrained renames on the way out)."""
    model.save_pretrained(tmp_path / "classic")
    from safetensors.torch import load_file

    return load_file(str(tmp_path / "classic" / "model.safetensors"))


# -- Hugging Face layouts ------------------------------------------------------------------
def test_hf_folder_with_safetensors(reference, pixel_values, expected, tmp_path):
    reference.save_pretrained(tmp_path)
    model = segformer.load(tmp_path)
    assert model.metadata.format == "hf"
    assert model.labels == LABELS
    assert rel(logits_of(model, pixel_values), expected) <= 1e-5
    assert not model.training


def test_hf_folder_with_pytorch_model_bin(reference, pixel_values, expected, tmp_path):
    state = classic_state(reference, tmp_path)
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(reference.config.to_json_string())
    model = segformer.load(folder)
    assert rel(logits_of(model, pixel_values), expected) <= 1e-5


def test_live_transformers_state_dict(reference, pixel_values, expected, tmp_path):
    """transformers 5 names its live parameters differently from the files it writes."""
    state = reference.state_dict()
    assert any(".attention.q_proj." in k for k in state)
    torch.save(state, tmp_path / "finetuned.pth")
    model = segformer.load(tmp_path / "finetuned.pth")
    assert model.metadata.format == "hf-live"
    assert rel(logits_of(model, pixel_values), expected) <= 1e-5


def test_our_save_loads_in_transformers_unchanged(reference, pixel_values, expected, tmp_path):
    reference.save_pretrained(tmp_path / "hf")
    ours = segformer.load(tmp_path / "hf")
    segformer.save(ours, tmp_path / "ours")
    assert {p.name for p in (tmp_path / "ours").iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    }
    back, info = transformers.SegformerForSemanticSegmentation.from_pretrained(
        tmp_path / "ours", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert back.config.id2label == dict(enumerate(LABELS))
    with torch.no_grad():
        assert torch.equal(back.eval()(pixel_values).logits, expected)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "ours")
    assert processor.size == {"height": 512, "width": 512}


def test_save_and_load_round_trip_keeps_metadata(reference, pixel_values, tmp_path):
    reference.save_pretrained(tmp_path / "hf")
    model = segformer.load(tmp_path / "hf")
    model.metadata = model.metadata.replace(
        palette=[[1, 2, 3]] * 5, license="CC-BY-4.0", metrics={"mIoU": 50.0}
    )
    segformer.save(model, tmp_path / "ours")
    again = segformer.load(tmp_path / "ours")
    assert again.metadata.palette == [[1, 2, 3]] * 5
    assert again.metadata.license == "CC-BY-4.0"
    assert again.metadata.metrics == {"mIoU": 50.0}
    assert torch.equal(logits_of(again, pixel_values), logits_of(model, pixel_values))


def test_classification_checkpoint_round_trip(tmp_path):
    reference = transformers.SegformerForImageClassification(
        transformers.SegformerConfig(num_labels=4)
    ).eval()
    reference.save_pretrained(tmp_path / "hf")
    ours = segformer.load(tmp_path / "hf")
    segformer.save(ours, tmp_path / "ours")
    back, info = transformers.SegformerForImageClassification.from_pretrained(
        tmp_path / "ours", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel(back(x).logits, reference(x).logits) <= 1e-6


# -- NVlabs / mmsegmentation ---------------------------------------------------------------
def test_nvlabs_checkpoint(reference, pixel_values, expected, tmp_path):
    state = to_nvlabs(classic_state(reference, tmp_path))
    state["decode_head.conv_seg.weight"] = torch.randn(
        5, 256, 1, 1
    )  # present in mmseg files, unused
    state["decode_head.conv_seg.bias"] = torch.randn(5)
    palette = [[128, 128, 128], [128, 64, 128], [64, 0, 128], [64, 64, 0], [128, 128, 0]]
    checkpoint = {
        "meta": {"CLASSES": tuple(LABELS), "PALETTE": palette, "mmcv_version": "1.2.7"},
        "state_dict": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 6e-5}]},
    }
    torch.save(checkpoint, tmp_path / "iter_160000.pth")

    model = segformer.load(tmp_path / "iter_160000.pth")
    assert model.metadata.format == "nvlabs"
    assert model.labels == LABELS
    assert model.metadata.palette == palette
    assert model.config.variant == "b0"
    # NVlabs' code runs its block norms with eps 1e-6: loaded as such by default …
    assert model.encoder.stages[0].blocks[0].norm1.eps == NVLABS_LAYER_NORM_EPS
    assert rel(logits_of(model, pixel_values), expected) <= 1e-3
    # … and equal to transformers when asked to compute as transformers does.
    exact = segformer.load(tmp_path / "iter_160000.pth", layer_norm_eps=1e-5)
    assert rel(logits_of(exact, pixel_values), expected) <= 1e-5


def test_imagenet_encoder_checkpoint(tmp_path):
    reference = transformers.SegformerForImageClassification(
        transformers.SegformerConfig(num_labels=1000)
    ).eval()
    randomize(reference)
    state = to_nvlabs(classic_state(reference, tmp_path), prefix="")
    assert "head.weight" in state and "patch_embed1.proj.weight" in state
    torch.save(state, tmp_path / "mit_b0.pth")

    classifier = segformer.load(tmp_path / "mit_b0.pth", layer_norm_eps=1e-5)
    assert classifier.task == "image-classification"
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert rel(classifier(x), reference(x).logits) <= 1e-5

    # As the start of a fine-tuning run: the encoder carries over, the decoder is new.
    segmenter = segformer.load(tmp_path / "mit_b0.pth", task="semantic-segmentation", labels=LABELS)
    assert segmenter.task == "semantic-segmentation"
    assert segmenter.labels == LABELS
    ours = segmenter.encoder.state_dict()
    theirs = classifier.encoder.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_new_label_set_reinitialises_only_the_classifier(reference, tmp_path, caplog):
    reference.save_pretrained(tmp_path)
    original = segformer.load(tmp_path)
    with caplog.at_level(logging.WARNING, logger="segformer"):
        model = segformer.load(tmp_path, labels=["water", "land"])
    assert "classifier is newly initialised" in caplog.text
    assert model.labels == ["water", "land"]
    assert model.decode_head.classifier.weight.shape == (2, 256, 1, 1)
    before, after = original.state_dict(), model.state_dict()
    changed = {
        k
        for k in after
        if after[k].shape != before[k].shape or not torch.equal(after[k], before[k])
    }
    assert changed == {"decode_head.classifier.weight", "decode_head.classifier.bias"}


# -- hub ids -----------------------------------------------------------------------------
def populate_hub_cache(hf_home: Path, repo_id: str, files: Path) -> None:
    """A Hugging Face cache entry laid out as huggingface_hub lays it out."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for item in files.iterdir():
        (snapshot / item.name).write_bytes(item.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_hub_id_loads_from_the_cache_offline(reference, tmp_path):
    reference.save_pretrained(tmp_path / "files")
    populate_hub_cache(tmp_path / "hf", "acme/segformer-tiny", tmp_path / "files")
    result = run_python(
        "import segformer; m = segformer.load('acme/segformer-tiny'); print(m.labels)",
        {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(LABELS)


LOAD_AND_PRINT_ERROR = (
    "import segformer\n"
    "try:\n    segformer.load({name!r})\n"
    "except segformer.CheckpointError as e:\n    print(e)\n"
)


def test_hub_id_not_cached_offline_is_one_clear_line(tmp_path):
    result = run_python(
        LOAD_AND_PRINT_ERROR.format(name="acme/not-there"),
        {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("acme/not-there: ") and "HF_HUB_OFFLINE" in lines[0]


def test_unreachable_hub_is_one_clear_line(tmp_path):
    result = run_python(
        LOAD_AND_PRINT_ERROR.format(name="acme/nowhere"),
        # A closed local port: the same failure as no network, without waiting on DNS.
        {
            "HF_HOME": str(tmp_path / "hf"),
            "HF_ENDPOINT": "http://127.0.0.1:9",
            "HF_HUB_OFFLINE": "0",
        },
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("acme/nowhere: ") and "could not be reached" in lines[0]


# -- bad input ---------------------------------------------------------------------------
def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        segformer.load(tmp_path / "nope.pth")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pth").write_text("these are not weights")
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a readable PyTorch checkpoint"):
        segformer.load(tmp_path / "notes.pth")


def test_truncated_safetensors(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        segformer.load(tmp_path)


def test_checkpoint_of_another_model(tmp_path):
    save_file(
        {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)},
        tmp_path / "w.safetensors",
    )
    with pytest.raises(CheckpointError, match="not a SegFormer checkpoint") as info:
        segformer.load(tmp_path / "w.safetensors")
    # the message names the file: the tensors alone do not say where they came from
    assert str(info.value).startswith(f"{tmp_path / 'w.safetensors'}: not a SegFormer")


def test_unrelated_pickled_state_dict_names_its_path(tmp_path):
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as info:
        segformer.load(tmp_path / "other.pth")
    assert str(info.value).startswith(f"{tmp_path / 'other.pth'}: not a SegFormer checkpoint")


def test_weights_that_do_not_fit_the_config(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_sizes"] = [64, 128, 320, 512]  # says B1, holds B0 weights
    config["decoder_hidden_size"] = 256
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"says hidden_sizes \[64, .*\] but the weights have \[32, "
    ) as info:
        segformer.load(tmp_path)
    assert "\n" not in str(info.value)


def test_mis_shaped_tensors_are_listed(reference, tmp_path):
    state = dict(reference.state_dict())
    state["decode_head.linear_fuse.weight"] = torch.zeros(256, 512, 1, 1)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(
        CheckpointError, match=r"1 mis-shaped: decode_head.fuse.weight \(256, 512, 1, 1\) vs"
    ):
        segformer.load(tmp_path / "w.pth")


def test_missing_and_unexpected_keys_are_listed(reference, tmp_path):
    state = dict(reference.state_dict())
    state.pop("decode_head.linear_fuse.weight")
    state["decode_head.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as info:
        segformer.load(tmp_path / "w.pth")
    message = str(info.value)
    assert "1 missing: decode_head.fuse.weight" in message
    assert "1 unexpected: decode_head.extra.weight" in message


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_pickle_with_a_payload_is_refused_and_not_run(tmp_path):
    _Payload.marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": {"w": _Payload()}}, f)
    with pytest.raises(CheckpointError, match="refused to load") as info:
        segformer.load(tmp_path / "evil.pth")
    assert not _Payload.marker.exists()
    # (a protocol-4 pickle: torch stops at an opcode it does not read, before any name)
    assert_safe_refusal(str(info.value), None)


class _Plain:
    """A harmless class: still not rebuilt, since unpickling it means importing code."""


def assert_safe_refusal(message: str, refused: str | None) -> None:
    assert "\n" not in message
    assert "\x1b" not in message  # torch's message carries terminal colour codes
    # torch advises re-loading with weights_only=False, i.e. running the file's code: never
    # passed on. The safe way out is named instead.
    assert "weights_only" not in message and "trust" not in message
    if refused:
        assert f"a Python object ({refused})" in message
    assert "torch.save(model.state_dict(), path)" in message


@pytest.mark.parametrize(
    ("value", "refused"),
    [(_Plain(), f"{__name__}._Plain"), (np.zeros(3), "numpy._core.multiarray._reconstruct")],
)
def test_pickle_refusals_say_what_was_refused_and_never_advise_unsafe_loading(
    tmp_path, value, refused
):
    torch.save({"w": torch.zeros(1), "extra": value}, tmp_path / "objects.pth")
    with pytest.raises(CheckpointError) as info:
        segformer.load(tmp_path / "objects.pth")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'objects.pth'}: refused to load: ")
    assert_safe_refusal(message, refused)


def test_detect_format_names_each_scheme(reference, tmp_path):
    classic = classic_state(reference, tmp_path)
    assert detect_format(classic) == "hf"
    assert detect_format(reference.state_dict()) == "hf-live"
    assert detect_format(to_nvlabs(classic)) == "nvlabs"
    assert detect_format(segformer.load(tmp_path / "classic").state_dict()) == "segformer"


# -- the real Cityscapes B0 (../shared) ----------------------------------------------------
def normalised(image: Image.Image) -> torch.Tensor:
    processor = transformers.SegformerImageProcessor(do_resize=False)
    return processor(image, return_tensors="pt")["pixel_values"]


@pytest.mark.shared
def test_real_cityscapes_b0_labels_equal_transformers():
    photo = Image.open(CITYSCAPES_SAMPLE / "stuttgart_demo_1024x512.png").convert("RGB")
    pixel_values = normalised(photo)
    reference = transformers.SegformerForSemanticSegmentation.from_pretrained(CITYSCAPES_B0).eval()
    ours = segformer.load(CITYSCAPES_B0)
    with torch.no_grad():
        expected = reference(pixel_values).logits
        logits = ours(pixel_values)
    assert rel(logits, expected) <= 1e-5
    processor = transformers.SegformerImageProcessor()
    size = [(512, 1024)]
    theirs = processor.post_process_semantic_segmentation(
        transformers.modeling_outputs.SemanticSegmenterOutput(logits=expected), size
    )[0]
    mine = processor.post_process_semantic_segmentation(
        transformers.modeling_outputs.SemanticSegmenterOutput(logits=logits), size
    )[0]
    assert torch.equal(mine, theirs)


@pytest.mark.shared
def test_real_cityscapes_b0_is_accurate_on_the_labelled_sample():
    stem = "frankfurt_000000_000294"
    image = Image.open(
        CITYSCAPES_SAMPLE / f"leftImg8bit/val/frankfurt/{stem}_leftImg8bit.png"
    ).convert("RGB")
    truth = np.array(
        Image.open(CITYSCAPES_SAMPLE / f"gtFine/val/frankfurt/{stem}_gtFine_labelTrainIds.png")
    )
    model = segformer.load(CITYSCAPES_B0)
    # The sample is a 4× downscaled frame; the model sees it at half the Cityscapes resolution.
    pixel_values = normalised(image.resize((1024, 512), Image.BILINEAR))
    with torch.no_grad():
        logits = model(pixel_values)
    labels = (
        torch.nn.functional.interpolate(logits, size=truth.shape, mode="bilinear")
        .argmax(1)[0]
        .numpy()
    )
    valid = truth != 255
    accuracy = (labels[valid] == truth[valid]).mean()
    assert accuracy >= 0.90
