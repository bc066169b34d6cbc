"""A config.json is user input: every bad field gets one line naming it (a ``CheckpointError``
from the library, ``error: …`` and exit 2 from the command line), never a TypeError or
ZeroDivisionError from inside the model's constructor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import segformer
from segformer.cli import main
from segformer.errors import CheckpointError
from segformer.models.config import SegformerConfig
from segformer.models.segformer import SegformerForSemanticSegmentation
from segformer.weights.checkpoints import save


@pytest.fixture
def saved(tmp_path, tiny_config) -> Path:
    return save(SegformerForSemanticSegmentation(tiny_config), tmp_path / "model")


def with_field(folder: Path, key: str, value: object) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


BAD_FIELDS = [
    ("num_attention_heads", None, "num_attention_heads must be a list"),
    ("num_attention_heads", [1, 2, 0, 4], r"num_attention_heads\[2\] must be at least 1, got 0"),
    ("num_attention_heads", [1, -2, 3, 4], r"num_attention_heads\[1\] must be at least 1"),
    ("num_attention_heads", [1, 2, 3, "4"], r"num_attention_heads\[3\] must be a whole number"),
    ("hidden_sizes", [8, 16, 24.5, 32], r"hidden_sizes\[2\] must be a whole number, got 24.5"),
    ("hidden_sizes", "8,16,24,32", "hidden_sizes must be a list"),
    ("depths", [1, 1, 0, 1], r"depths\[2\] must be at least 1"),
    ("depths", [], "depths must be a list"),
    ("sr_ratios", [8, 4, 2, 0], r"sr_ratios\[3\] must be at least 1"),
    ("patch_sizes", [7, 3, True, 3], r"patch_sizes\[2\] must be a whole number, got True"),
    ("strides", [4, 2, 2, -2], r"strides\[3\] must be at least 1"),
    ("mlp_ratios", [4, 4, 4, None], r"mlp_ratios\[3\] must be a whole number"),
    ("mlp_ratios", [4, 4, 4], "must all have one entry per stage"),
    ("num_channels", 0, "num_channels must be at least 1"),
    ("decoder_hidden_size", "16", "decoder_hidden_size must be a whole number"),
    ("drop_path_rate", 1.5, r"drop_path_rate must be in \[0, 1\)"),
    ("hidden_dropout_prob", None, "hidden_dropout_prob must be a number"),
    ("id2label", ["a", "b"], "id2label must map class ids to names"),
    ("id2label", {"x": "a"}, "id2label keys must be class ids"),
    ("num_attention_heads", [3, 2, 3, 4], "hidden size 8 is not divisible by 3 heads"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_FIELDS)
def test_bad_config_fields_are_one_line_errors(saved, key, value, message):
    with pytest.raises(CheckpointError, match=message) as info:
        segformer.load(with_field(saved, key, value))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [BAD_FIELDS[0], BAD_FIELDS[1], BAD_FIELDS[2], BAD_FIELDS[4]],
)
def test_bad_config_fields_exit_2_from_the_command_line(saved, capsys, key, value, message):
    code = main(["info", str(with_field(saved, key, value))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: config: ")
    assert "Traceback" not in err[0]


def test_valid_json_numbers_are_accepted(saved):
    # JSON writers may write 2.0 for 2: the same config, not an error.
    model = segformer.load(with_field(saved, "mlp_ratios", [4.0, 4.0, 4.0, 4.0]))
    assert model.config.mlp_ratios == [4, 4, 4, 4]
    assert all(isinstance(r, int) for r in model.config.mlp_ratios)


def test_in_code_configs_are_checked_too(tiny_config):
    with pytest.raises(CheckpointError, match=r"num_attention_heads\[0\] must be at least 1"):
        SegformerConfig(**{**tiny_config.__dict__, "num_attention_heads": [0, 2, 3, 4]})
