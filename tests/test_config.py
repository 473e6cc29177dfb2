"""Config: defaults, YAML, overrides, and validation messages that name the field."""

from __future__ import annotations

import pytest

from opd.config import RunConfig, config_help, load_config, parse_override
from opd.errors import ConfigError


def test_defaults_and_overrides():
    cfg = load_config(
        None, ["train.lr=1e-4", "steps=7", "recipe=gkd", "method.args.beta=0.3", "args.lmbda=1"]
    )
    assert cfg.train.lr == 1e-4 and cfg.train.steps == 7
    assert cfg.method.recipe == "gkd" and cfg.method.args == {"beta": 0.3, "lmbda": 1}
    assert RunConfig().train.lr == 5e-5


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 12\n  lr: 0.001\nmethod:\n  recipe: gkd\n  args: {beta: 0.1}\n")
    cfg = load_config(f, ["train.steps=3"])
    assert cfg.train.steps == 3 and cfg.train.lr == 0.001 and cfg.method.args == {"beta": 0.1}


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.lr=-1", "train.lr: must be > 0"),
        ("train.steps=0", "train.steps: must be >= 1"),
        ("train.steps=abc", "train.steps: expected an integer"),
        ("sampling.top_p=1.5", "sampling.top_p: must be <= 1"),
        ("data.truncation=middle", "data.truncation: must be one of left, error"),
        ("train.nope=1", "valid keys in 'train'"),
        ("bogus=1", "unknown config key 'bogus'"),
        ("lr", "key=value"),
    ],
)
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  steps: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(f)
    f.write_text("train:\n  warmup_steps: -3\n")
    with pytest.raises(ConfigError, match="train.warmup_steps: must be >= 0"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_parse_override_types():
    assert parse_override("a=1e-4") == ("a", 1e-4)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=./x.jsonl") == ("a", "./x.jsonl")
    assert parse_override("a=task:arithmetic") == ("a", "task:arithmetic")


def test_every_field_is_documented():
    text = config_help()
    for key in (
        "train.lr",
        "model.teacher",
        "data.skip_bad_rows",
        "sampling.top_k",
        "method.recipe",
    ):
        assert key in text
