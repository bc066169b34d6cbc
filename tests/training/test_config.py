"""TrainConfig: its settings from YAML/TOML files, --set and --<key> options, how values are
coerced to each setting's type, and the up-front refusal of values that would make a run
meaningless (a negative or NaN learning rate, betas outside [0, 1) …) with one line, exit 2."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml

from segformer.errors import SegformerError
from segformer.training.config import HELP, TrainConfig, coerce, read_config_file


# ---------------------------------------------------------------------------------------
# Files and overrides
# ---------------------------------------------------------------------------------------
def test_every_setting_is_documented():
    assert set(HELP) == set(TrainConfig.__dataclass_fields__)


def test_config_from_yaml_and_toml_with_overrides(tmp_path):
    (tmp_path / "recipe.yaml").write_text(
        "format: camvid\ncrop_size: [360, 480]\nmax-steps: 2000\nscale: null\n"
    )
    (tmp_path / "recipe.toml").write_text(
        'format = "camvid"\ncrop_size = [360, 480]\nmax_steps = 2000\n'
    )
    from_yaml = TrainConfig.from_file(tmp_path / "recipe.yaml")
    from_toml = TrainConfig.from_file(tmp_path / "recipe.toml")
    assert (from_yaml.format, from_yaml.crop_size, from_yaml.max_steps, from_yaml.scale) == (
        "camvid",
        [360, 480],
        2000,
        None,
    )
    assert (from_toml.crop_size, from_toml.max_steps) == ([360, 480], 2000)
    changed = TrainConfig.from_dict(
        {"lr": "1e-4", "crop_size": "256,256", "class_weights": "1,2,3", "val_split": "none"},
        base=from_yaml,
    )
    assert (
        changed.lr == 1e-4
        and changed.crop_size == [256, 256]
        and changed.class_weights == [1.0, 2.0, 3.0]
    )
    assert changed.val_split is None and changed.format == "camvid"
    with pytest.raises(SegformerError, match="did you mean max_steps"):
        TrainConfig.from_dict({"max_step": 5})
    with pytest.raises(SegformerError, match="batch_size must be int"):
        TrainConfig.from_dict({"batch_size": "eight"})
    with pytest.raises(SegformerError, match="precision"):
        TrainConfig(precision="fp8")
    (tmp_path / "broken.yaml").write_text("crop_size: [1, 2\n")
    with pytest.raises(SegformerError, match="not valid YAML"):
        read_config_file(tmp_path / "broken.yaml")


@pytest.mark.parametrize(
    "restarts, restart_lr", [([0], 0.5), ([50, 50], 0.5), ([100], 0.5), ([30, 20], 0.5), ([50], 0)]
)
def test_bad_restarts_are_refused(restarts, restart_lr):
    with pytest.raises(SegformerError, match="restart"):
        TrainConfig(max_steps=100, restarts=restarts, restart_lr=restart_lr)


def test_defaults_are_the_papers_ade20k_recipe():
    config = TrainConfig()
    assert (config.lr, config.weight_decay, config.betas) == (6e-5, 0.01, [0.9, 0.999])
    assert (config.max_steps, config.batch_size, config.warmup_steps) == (160_000, 8, 1500)
    assert (config.crop_size, config.scale, config.ratio_range) == (
        [512, 512],
        [2048, 512],
        [0.5, 2.0],
    )
    assert config.head_lr_mult == 10.0 and config.poly_power == 1.0 and config.min_lr == 0.0


def test_empty_file_gives_defaults_and_a_list_is_refused(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert TrainConfig.from_file(tmp_path / "empty.yaml") == TrainConfig()
    (tmp_path / "list.yaml").write_text("- lr: 1\n")
    with pytest.raises(SegformerError, match="must be a mapping of setting: value"):
        read_config_file(tmp_path / "list.yaml")
    (tmp_path / "broken.toml").write_text("lr = \n")
    with pytest.raises(SegformerError, match="not valid TOML"):
        read_config_file(tmp_path / "broken.toml")
    with pytest.raises(SegformerError, match="cannot read config"):
        read_config_file(tmp_path / "absent.yaml")


def test_saved_config_loads_back_equal_and_leaves_no_temporary_file(tmp_path):
    config = TrainConfig(
        data="d",
        format="camvid",
        crop_size=[360, 480],
        val_split=None,
        class_weights=[1.0, 0.5],
        restarts=[100],
        max_steps=200,
        ema_decay=0.999,
        train_exclude=["0006R0_*"],
    )
    config.save(tmp_path / "run" / "config.yaml")
    assert TrainConfig.from_file(tmp_path / "run" / "config.yaml") == config
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]
    # plain YAML a person can read and edit
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["crop_size"] == [360, 480] and saved["val_split"] is None


def test_from_dict_applies_values_over_a_base_and_keeps_the_rest():
    base = TrainConfig(format="camvid", max_steps=500, lr=1e-3)
    changed = TrainConfig.from_dict({"max-steps": "800", "flip_prob": 0}, base=base)
    assert (changed.format, changed.lr, changed.max_steps, changed.flip_prob) == (
        "camvid",
        1e-3,
        800,
        0.0,
    )
    assert base.max_steps == 500  # the base is not modified


def test_command_line_settings_override_the_file_in_order(tmp_path):
    from segformer.cli import build_parser
    from segformer.cli.train import collect_settings

    recipe = tmp_path / "recipe.toml"
    recipe.write_text('data = "d"\nlr = 0.001\nmax_steps = 100\nbatch_size = 4\n')
    args = build_parser().parse_args(
        ["train", str(recipe), "--set", "max_steps=200", "--set", "lr=2e-3", "--max-steps", "300"]
    )
    config = TrainConfig.from_dict(collect_settings(args))
    # file < --set < --<key>
    assert (config.data, config.batch_size, config.lr, config.max_steps) == ("d", 4, 2e-3, 300)


# ---------------------------------------------------------------------------------------
# Coercion of values to each setting's type
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, given, expected",
    [
        ("max_steps", "1e4", 10_000),
        ("max_steps", "2_000", 2000),
        ("max_steps", 3.0, 3),
        ("lr", "6e-5", 6e-5),
        ("lr", 1, 1.0),
        ("photometric", "no", False),
        ("photometric", "On", True),
        ("deterministic", "1", True),
        ("crop_size", "360,480", [360, 480]),
        ("crop_size", "[360, 480]", [360, 480]),
        ("crop_size", 512, [512]),
        ("ratio_range", "0.5, 2", [0.5, 2.0]),
        ("scale", "none", None),
        ("val_split", "null", None),
        ("val_split", "train+val", "train+val"),
        ("class_weights", "enet", "enet"),
        ("class_weights", "1,2.5", [1.0, 2.5]),
        ("class_weights", [1, 2], [1.0, 2.0]),
        ("train_exclude", "0006R0_*", ["0006R0_*"]),
        ("drop_path_rate", "", None),
        ("data", "123", "123"),  # a plain string setting is never parsed
    ],
)
def test_values_are_coerced_to_the_settings_type(name, given, expected):
    value = coerce(name, given)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "name, given, message",
    [
        ("max_steps", "2.5", "max_steps must be int, not '2.5'"),
        ("max_steps", True, "max_steps must be int, not True"),
        ("batch_size", "eight", "batch_size must be int"),
        ("lr", "fast", "lr must be float"),
        ("photometric", "maybe", "photometric must be bool"),
        ("crop_size", "a,b", "crop_size must be list[int]"),
        ("max_steps", None, "max_steps cannot be empty"),
    ],
)
def test_values_of_the_wrong_type_are_refused(name, given, message):
    with pytest.raises(SegformerError, match=message.replace("[", r"\[").replace("]", r"\]")):
        coerce(name, given)


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, message",
    [
        ({"lr": -1.0}, "lr must be a positive number, not -1.0"),
        ({"lr": math.nan}, "lr must be a positive number, not nan"),
        ({"lr": math.inf}, "lr must be a positive number, not inf"),
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"weight_decay": -0.01}, "weight_decay must be 0 or a positive number"),
        ({"weight_decay": math.nan}, "weight_decay must be 0 or a positive number"),
        ({"head_lr_mult": -10.0}, "head_lr_mult must be a positive number"),
        ({"betas": [0.9, 1.0]}, r"betas must be two numbers in \[0, 1\)"),
        ({"betas": [-0.1, 0.999]}, "betas must be two numbers"),
        ({"betas": [0.9, math.nan]}, "betas must be two numbers"),
        ({"betas": [0.9]}, "betas must be two numbers"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm must be a positive number"),
        ({"clip_grad_norm": math.inf}, "clip_grad_norm must be a positive number"),
        ({"drop_path_rate": 1.0}, r"drop_path_rate must be in \[0, 1\)"),
        ({"drop_path_rate": -0.1}, "drop_path_rate must be in"),
        ({"ema_decay": 1.0}, "ema_decay must be between 0 and 1"),
        ({"ema_decay": math.nan}, "ema_decay must be between 0 and 1"),
        ({"warmup_steps": -1}, "bad warm-up settings"),
        ({"warmup_ratio": 1.5}, "bad warm-up settings"),
        ({"warmup_ratio": math.nan}, "bad warm-up settings"),
        ({"poly_power": -1.0}, "poly_power must be 0 or a positive number"),
        ({"min_lr": -1e-6}, "min_lr must be between 0 and lr"),
        ({"min_lr": 1.0, "lr": 0.5}, "min_lr must be between 0 and lr"),
        ({"cat_max_ratio": 0.0}, r"cat_max_ratio must be in \(0, 1\]"),
        ({"flip_prob": 1.5}, r"flip_prob must be in \[0, 1\]"),
        ({"ratio_range": [0.5, math.inf]}, "bad ratio_range"),
        ({"ratio_range": [2.0, 0.5]}, "bad ratio_range"),
        ({"class_weights": [1.0, -1.0]}, "class_weights must be numbers ≥ 0, not all 0"),
        ({"class_weights": [0.0, 0.0]}, "class_weights must be numbers ≥ 0, not all 0"),
        ({"class_weights": "inverse"}, "class_weights must be a list or one of"),
        ({"sampling": "balanced"}, "sampling must be one of uniform, class-balanced"),
        ({"sampling_temperature": 0.0}, "sampling_temperature must be a positive number"),
        ({"sampling_temperature": math.nan}, "sampling_temperature must be a positive number"),
        (
            {"sampling": "class-balanced", "preflight": False},
            "sampling: class-balanced needs the pre-flight scan",
        ),
        ({"max_steps": 0}, "steps and sizes must be > 0"),
        ({"batch_size": -2}, "steps and sizes must be > 0"),
        ({"crop_size": [512, 0]}, "crop_size must be two positive integers"),
        ({"eval_stride": [1, 2, 3]}, "eval_stride must be two positive integers"),
        ({"num_workers": -1}, "num_workers must be 0 or more"),
        ({"threads": 0}, "threads must be > 0"),
        ({"checkpoint_interval": 0}, "intervals must be > 0"),
        ({"keep_checkpoints": 0}, "bad eval_interval or keep_checkpoints"),
        ({"format": "yolo"}, "format must be one of folder, binary"),
        ({"eval_mode": "tiles"}, "eval_mode must be whole or slide"),
    ],
)
def test_meaningless_values_are_refused_up_front(settings, message):
    with pytest.raises(SegformerError, match=f"^config: {message}"):
        TrainConfig(**settings)


def test_edge_values_that_make_sense_are_accepted():
    config = TrainConfig(
        weight_decay=0.0,
        betas=[0.0, 0.0],
        warmup_steps=0,
        poly_power=0.0,  # a constant rate after warm-up
        min_lr=6e-5,  # = lr
        flip_prob=0.0,
        cat_max_ratio=1.0,
        drop_path_rate=0.0,
        class_weights=[0.0, 1.0],
        eval_interval=0,
        num_workers=0,
    )
    assert dataclasses.asdict(config)["betas"] == [0.0, 0.0]


@pytest.mark.parametrize(
    "option, message",
    [
        (["--set", "lr=-1"], "error: config: lr must be a positive number, not -1.0"),
        (["--set", "lr=nan"], "error: config: lr must be a positive number, not nan"),
        (["--weight-decay", "-0.5"], "error: config: weight_decay must be 0 or a positive number"),
        (["--set", "betas=0.9,1.5"], "error: config: betas must be two numbers in [0, 1)"),
    ],
)
def test_train_command_refuses_bad_numbers_in_one_line_before_reading_data(
    tmp_path, capsys, option, message
):
    from segformer.cli import main

    out = tmp_path / "run"
    assert (
        main(["train", "--data", str(tmp_path / "nowhere"), "--output-dir", str(out), *option]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_a_bad_number_in_a_recipe_file_is_refused_too(tmp_path, capsys):
    from segformer.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: somewhere\nlr: -0.001\n")
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err == "error: config: lr must be a positive number, not -0.001\n"
