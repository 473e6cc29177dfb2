"""Config: defaults, YAML, overrides, and validation messages that name the field."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from opd.config import (
    RunConfig,
    config_help,
    load_config,
    load_run_config,
    parse_override,
    resolve_output_dir,
    resolve_steps,
    save_config,
)
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


# ---------------------------------------------------------------- issue 8 hardening


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("1E-5", 1e-5), ("5e+2", 500.0)])
def test_yaml_scientific_notation_is_a_float(tmp_path, text, value):
    f = tmp_path / "c.yaml"
    f.write_text(f"train:\n  lr: {text}\n  weight_decay: {text}\n")
    cfg = load_config(f)
    assert cfg.train.lr == value and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == value


def test_yaml_scientific_notation_inside_recipe_args(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method:\n  args: {beta: 1e-2, name: 1e3x}\n")
    assert load_config(f).method.args == {"beta": 0.01, "name": "1e3x"}


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("train.lr", ".nan", "train.lr: must be a finite number > 0"),
        ("train.lr", "1e400", "train.lr: must be a finite number > 0"),
        ("train.lr", "-.inf", "train.lr: must be a finite number > 0"),
        ("sampling.temperature", ".nan", "sampling.temperature: must be a finite number >= 0"),
        ("train.min_lr_ratio", ".nan", "train.min_lr_ratio: must be a finite number >= 0.0 and"),
        ("sampling.top_p", ".nan", "sampling.top_p: must be a finite number > 0.0 and <= 1.0"),
        ("train.max_grad_norm", ".inf", "train.max_grad_norm: must be a finite number"),
        ("train.weight_decay", ".nan", "train.weight_decay: must be a finite number"),
    ],
)
def test_non_finite_values_are_refused(tmp_path, key, value, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(None, [f"{key}={value}"])
    section, name = key.split(".")
    f = tmp_path / "c.yaml"
    f.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError, match=re.escape(needle)) as err:
        load_config(f)
    assert "c.yaml" in str(err.value)


def test_yaml_aliases_are_refused(tmp_path):
    f = tmp_path / "bomb.yaml"
    f.write_text("x: &a [1, 2]\nmethod:\n  args: {y: *a}\n")
    with pytest.raises(ConfigError, match=r"bomb\.yaml: line 1: YAML aliases and anchors"):
        load_config(f)
    with pytest.raises(ConfigError, match="aliases"):
        load_config(None, ["method.args.y=*a"])


def test_duplicate_yaml_keys_are_refused(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("train:\n  steps: 3\n  steps: 4\n")
    with pytest.raises(ConfigError, match=r"d\.yaml: line 3: duplicate key 'steps'"):
        load_config(f)


def test_config_read_errors_name_the_file(tmp_path):
    f = tmp_path / "latin.yaml"
    f.write_bytes("train:\n  lr: 1e-3  # é\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin\.yaml' is not UTF-8 text \(byte 0xe9"):
        load_config(f)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"empty\.yaml' is empty"):
        load_config(tmp_path / "empty.yaml")
    (tmp_path / "big.yaml").write_text("# x\n" * 300_000)
    with pytest.raises(ConfigError, match=r"big\.yaml' is \d+ bytes"):
        load_config(tmp_path / "big.yaml")


@pytest.mark.parametrize(
    "key,target",
    [
        ("learning_rate", "train.lr"),
        ("train.learning_rate", "train.lr"),
        ("max_steps", "train.steps"),
        ("per_device_train_batch_size", "train.batch_size"),
        ("num_train_epochs", "train.epochs"),
        ("gradient_accumulation_steps", "train.grad_accum"),
        ("warmup_ratio", "train.warmup_steps"),
        ("train.output_dir", "output_dir"),
        ("outdir", "output_dir"),
        ("output-dir", "output_dir"),
        ("max_completion_length", "sampling.max_new_tokens"),
        ("data.max_new_tokens", "sampling.max_new_tokens"),
        ("sampling.seed", "train.seed"),
        ("logging_steps", "train.eval_every"),
        ("save_steps", "train.checkpoint_every"),
        ("eval_steps", "train.eval_every"),
        ("train.temperature", "sampling.temperature"),
        ("model_name_or_path", "model.student"),
        ("bf16", "model.dtype=bfloat16"),
        ("dataset_name", "data.train"),
        ("sampling.temprature", "sampling.temperature"),
        ("trian.lr", "train.lr"),
        ("lerning_rate", "train.lr"),
    ],
)
def test_did_you_mean(key, target):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}=1"])
    assert f"did you mean {target}?" in str(err.value)


def test_trl_names_that_are_also_opd_keys_work():
    cfg = load_config(None, ["warmup_steps=3", "max_grad_norm=0.5", "seed=7", "temperature=0.5"])
    assert cfg.train.warmup_steps == 3 and cfg.train.max_grad_norm == 0.5
    assert cfg.train.seed == 7 and cfg.sampling.temperature == 0.5
    with pytest.raises(ConfigError) as err:
        load_config(None, ["qwertyuiop=1"])
    assert "did you mean" not in str(err.value) and "--help-config" in str(err.value)


@pytest.mark.parametrize(
    "epochs,n,batch,accum,steps",
    [
        (1.0, 24, 4, 1, 6),
        (2.0, 25, 4, 1, 13),
        (0.1, 30, 3, 1, 1),
        (1.0, 24, 4, 2, 3),
        (0.5, 7, 8, 1, 1),
        (3.0, 0, 4, 1, 1),
        (1.5, 10, 2, 2, 4),
    ],
)
def test_resolve_steps_from_epochs(epochs, n, batch, accum, steps):
    cfg = load_config(
        None, [f"train.epochs={epochs}", f"batch_size={batch}", f"grad_accum={accum}"]
    )
    assert resolve_steps(cfg, n) == steps and cfg.train.steps == steps


def test_epochs_zero_keeps_steps_and_both_set_is_an_error(tmp_path):
    cfg = load_config(None, ["steps=9"])
    assert resolve_steps(cfg, 1000) == 9
    with pytest.raises(ConfigError, match="train.epochs=1.0 and train.steps=5 are both set"):
        load_config(None, ["epochs=1", "train.steps=5"])
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 5\n  epochs: 2\n")
    with pytest.raises(ConfigError, match="both set"):
        load_config(f)


def test_save_config_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(load_config(None, ["steps=3"]), path)
    before = path.read_bytes()
    assert load_run_config(tmp_path).train.steps == 3

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_config(load_config(None, ["steps=4"]), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no temp file left


def test_load_run_config_never_falls_back_to_defaults(tmp_path):
    with pytest.raises(ConfigError, match="config.yaml' does not exist"):
        load_run_config(tmp_path)
    (tmp_path / "config.yaml").write_text("")
    with pytest.raises(ConfigError, match="config.yaml' is empty"):
        load_run_config(tmp_path)
    (tmp_path / "config.yaml").write_text("train: [\n")
    with pytest.raises(ConfigError, match="config.yaml: not valid YAML"):
        load_run_config(tmp_path)
    (tmp_path / "config.yaml").write_text("train:\n  steps: 4\n  epochs: 2.0\n")
    cfg = load_run_config(tmp_path, ["lr=1e-3"])  # a saved run holds both: not an error
    assert cfg.train.steps == 4 and cfg.output_dir == str(tmp_path) and cfg.train.lr == 1e-3


def test_default_run_folders_are_unique_within_a_second(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")
    cfg = RunConfig()
    dirs = [resolve_output_dir(cfg) for _ in range(3)]
    assert [d.name for d in dirs] == [
        "on_policy_rkl-20260101-000000",
        "on_policy_rkl-20260101-000000-2",
        "on_policy_rkl-20260101-000000-3",
    ]
    assert all(d.is_dir() for d in dirs)
    assert resolve_output_dir(load_config(None, ["output_dir=mine"])) == Path("mine")


def test_help_config_shows_output_dir_short_forms_and_ranges():
    text = config_help()
    assert "output_dir = ''" in text
    for short in ("recipe=", "lr=", "steps=", "epochs=", "temperature=", "args.NAME="):
        assert f"short form: {short}" in text, short
    assert "train.seed = 0   (short form: seed=)" in text
    assert "data.eval_count = 32" in text and "[>= 1]" in text
    assert "[> 0.0]" in text and "one of left, error" in text


def test_eval_count_help_and_validation_agree():
    # help says >= 0 and what 0 means; 0 is accepted when read (and evaluates nothing, see
    # tests/test_data_sources.py), a negative count is refused when read, not later
    line = next(ln for ln in config_help().splitlines() if "held-out prompts used" in ln)
    assert "[>= 0]" in line and "0 = no evaluation" in line
    assert load_config(None, ["data.eval_count=0"]).data.eval_count == 0
    with pytest.raises(ConfigError, match="data.eval_count: must be >= 0, got -1"):
        load_config(None, ["data.eval_count=-1"])


@pytest.mark.parametrize(
    "exc,needle",
    [
        (PermissionError(13, "Permission denied"), "is not readable (permission denied)"),
        (OSError(5, "Input/output error"), "cannot be read (Input/output error)"),
    ],
)
def test_os_errors_while_reading_become_one_line_config_errors(tmp_path, monkeypatch, exc, needle):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 3\n")

    def fail(self):
        raise exc

    monkeypatch.setattr(Path, "read_bytes", fail)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert str(err.value) == f"config file '{f}' {needle}"
