"""Bad-input corpus for configuration and the command line.

Each case runs `opd ...` in-process and must end with exit code 2, exactly one `opd: error:`
line naming the field / file / option, and no traceback. Cases that point at an existing run
folder also check that nothing in it changed. No case loads a model: every error is found
while reading the configuration, before anything is built or written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import assert_clean_error, run_opd, tree_digest

ALIAS_BOMB = """\
a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
method:
  args: {x: *e}
"""


def _yaml(tmp: Path, text: str | bytes, name: str = "cfg.yaml") -> Path:
    p = tmp / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def _fake_run(tmp: Path, config: str | bytes | None = "train:\n  steps: 4\n") -> Path:
    """A run folder as a crashed run leaves it: config, metrics, one checkpoint file."""
    run = tmp / "old_run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "checkpoints" / "step-2" / "state.pt").write_bytes(b"\x00checkpoint")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    if isinstance(config, bytes):
        (run / "config.yaml").write_bytes(config)
    elif config is not None:
        (run / "config.yaml").write_text(config)
    return run


def _config_file(text, *extra):
    return lambda tmp: ["distill", "--config", _yaml(tmp, text), *extra]


# (id, argv builder taking tmp_path, needles the error line must contain)
VALUE_CASES = [
    ("lr_nan", ["lr=.nan"], ["train.lr", "finite", "> 0"]),
    ("lr_overflow", ["lr=1e400"], ["train.lr", "finite"]),
    ("lr_inf", ["train.lr=.inf"], ["train.lr", "finite"]),
    ("lr_inf_word", ["lr=inf"], ["train.lr", "finite"]),
    ("temperature_nan_word", ["sampling.temperature=nan"], ["sampling.temperature", "finite"]),
    ("temperature_nan", ["sampling.temperature=.nan"], ["sampling.temperature", ">= 0"]),
    ("min_lr_ratio_nan", ["train.min_lr_ratio=.nan"], ["train.min_lr_ratio", "<= 1"]),
    ("top_p_nan", ["sampling.top_p=.nan"], ["sampling.top_p", "finite"]),
    ("epochs_nan", ["train.epochs=.nan"], ["train.epochs", "finite"]),
    ("steps_text", ["train.steps=abc"], ["train.steps", "integer"]),
    ("eval_count_negative", ["data.eval_count=-1"], ["data.eval_count", ">= 0"]),
    ("dtype_choice", ["model.dtype=float8"], ["model.dtype", "bfloat16"]),
    ("trl_learning_rate", ["learning_rate=1e-3"], ["learning_rate", "train.lr"]),
    ("trl_section_lr", ["train.learning_rate=1e-3"], ["train.learning_rate", "train.lr"]),
    ("trl_max_steps", ["max_steps=10"], ["max_steps", "train.steps"]),
    ("trl_batch", ["per_device_train_batch_size=4"], ["train.batch_size"]),
    ("trl_epochs", ["num_train_epochs=2"], ["train.epochs"]),
    ("trl_grad_accum", ["gradient_accumulation_steps=2"], ["train.grad_accum"]),
    ("misspelled_key", ["sampling.temprature=0.7"], ["sampling.temperature"]),
    ("wrong_section", ["data.max_new_tokens=8"], ["sampling.max_new_tokens"]),
    ("epochs_and_steps", ["epochs=1", "steps=5"], ["train.epochs", "train.steps"]),
    ("override_alias", ["method.args.beta=*x"], ["alias"]),
    ("override_no_equals", ["lr"], ["key=value"]),
    ("unknown_recipe", ["recipe=gkdd"], ["gkdd", "gkd"]),
]

FILE_CASES = [
    ("non_utf8", "distill", "train:\n  lr: 1e-3 \xe9\n".encode("latin-1"), ["cfg.yaml", "UTF-8"]),
    ("tabs", "distill", "train:\n\tsteps: 3\n", ["cfg.yaml", "tabs"]),
    ("alias_bomb", "distill", ALIAS_BOMB, ["cfg.yaml", "alias"]),
    ("anchor", "distill", "train: &t {steps: 3}\n", ["cfg.yaml", "anchor"]),
    ("top_level_list", "distill", "- train\n- steps\n", ["cfg.yaml", "mapping"]),
    ("top_level_scalar", "distill", "hello\n", ["cfg.yaml", "mapping"]),
    ("empty", "distill", "", ["cfg.yaml", "empty"]),
    ("unknown_key", "distill", "train:\n  learning_rate: 1e-3\n", ["cfg.yaml", "train.lr"]),
    ("trl_top_level", "distill", "max_steps: 100\n", ["cfg.yaml", "train.steps"]),
    ("wrong_type", "distill", "train:\n  steps: ten\n", ["cfg.yaml", "train.steps"]),
    ("nan_temperature", "distill", "sampling:\n  temperature: .nan\n", ["sampling.temperature"]),
    ("overflow_lr", "distill", "train:\n  lr: 1e400\n", ["cfg.yaml", "train.lr", "finite"]),
    ("section_scalar", "distill", "train: 5\n", ["cfg.yaml", "'train'"]),
    ("duplicate_key", "distill", "train:\n  lr: 1e-3\n  lr: 1e-4\n", ["cfg.yaml", "duplicate"]),
    ("bad_syntax", "distill", "train:\n  steps: [1,\n", ["cfg.yaml", "line"]),
    ("deep_nesting", "distill", "a: " + "[" * 1000 + "]" * 1000 + "\n", ["cfg.yaml", "deep"]),
    ("unknown_recipe_file", "distill", "method:\n  recipe: on_policy_rk\n", ["on_policy_rk"]),
    ("eval_non_utf8", "eval", b"\xff\xfe\x00data:\n", ["cfg.yaml", "UTF-8"]),
]


@pytest.mark.parametrize(
    "argv,needles", [c[1:] for c in VALUE_CASES], ids=[c[0] for c in VALUE_CASES]
)
def test_bad_value_override(tmp_path, argv, needles):
    out = tmp_path / "new_run"
    res = run_opd(["distill", *argv, f"output_dir={out}", "--no-report"])
    assert_clean_error(res, *needles)
    assert not out.exists()


@pytest.mark.parametrize(
    "command,text,needles", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES]
)
def test_bad_config_file(tmp_path, command, text, needles):
    cfg = _yaml(tmp_path, text)
    out = tmp_path / "new_run"
    extra = ["model.student=x"] if command == "eval" else []
    res = run_opd([command, "--config", cfg, f"output_dir={out}", *extra])
    assert_clean_error(res, *needles)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]  # nothing else written


def test_config_file_is_a_folder(tmp_path):
    assert_clean_error(run_opd(["distill", "--config", tmp_path]), str(tmp_path), "folder")


def test_config_file_missing(tmp_path):
    res = run_opd(["distill", "--config", tmp_path / "nope.yaml"])
    assert_clean_error(res, "nope.yaml", "does not exist")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_config_file_unreadable(tmp_path):
    cfg = _yaml(tmp_path, "train:\n  steps: 3\n")
    cfg.chmod(0)
    assert_clean_error(run_opd(["distill", "--config", cfg]), "cfg.yaml", "not readable")


USAGE_CASES = [
    ("stop_after_zero", ["distill", "--stop-after", "0"], ["--stop-after", ">= 1"]),
    ("stop_after_text", ["distill", "--stop-after", "two"], ["--stop-after"]),
    ("unknown_flag", ["distill", "lr=1e-3", "--bogus"], ["--bogus"]),
    ("unknown_command", ["distil"], ["distil"]),
    ("no_command", [], ["command"]),
    ("bench_which", ["bench", "nope"], ["nope"]),
    ("recipes_extra", ["recipes", "gkd", "extra"], ["extra"]),
]


@pytest.mark.parametrize(
    "argv,needles", [c[1:] for c in USAGE_CASES], ids=[c[0] for c in USAGE_CASES]
)
def test_bad_usage(argv, needles):
    assert_clean_error(run_opd(argv), *needles)


# Cases pointing at an existing run folder: the error names it and nothing in it changes.
RUN_CASES = [
    ("resume_no_config", None, ["distill", "--resume", "{run}"], ["config.yaml"]),
    ("resume_empty_config", "", ["distill", "--resume", "{run}"], ["config.yaml", "empty"]),
    ("resume_blank_config", "# nothing\n\n", ["distill", "--resume", "{run}"], ["config.yaml"]),
    ("resume_bad_yaml", "train: [\n", ["distill", "--resume", "{run}"], ["config.yaml"]),
    ("resume_list_config", "- a\n", ["distill", "--resume", "{run}"], ["config.yaml"]),
    ("resume_alias", ALIAS_BOMB, ["distill", "--resume", "{run}"], ["config.yaml", "alias"]),
    ("resume_non_utf8", b"train:\n  lr: \xff\n", ["distill", "--resume", "{run}"], ["UTF-8"]),
    (
        "resume_bad_override",
        "train:\n  steps: 4\n",
        ["distill", "--resume", "{run}", "lr=.nan"],
        ["train.lr"],
    ),
    (
        "resume_with_config",
        "train:\n  steps: 4\n",
        ["distill", "--resume", "{run}", "--config", "{run}/config.yaml"],
        ["--config"],
    ),
    (
        "restart_bad_value",
        "train:\n  steps: 4\n",
        ["distill", "output_dir={run}", "lr=1e400"],
        ["train.lr"],
    ),
    ("eval_no_student", "train:\n  steps: 4\n", ["eval", "{run}"], ["student"]),
    ("eval_empty_config", "", ["eval", "{run}"], ["config.yaml"]),
    (
        "eval_bad_override",
        "train:\n  steps: 4\n",
        ["eval", "{run}", "sampling.top_p=.nan"],
        ["sampling.top_p"],
    ),
]


@pytest.mark.parametrize(
    "config,argv,needles", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES]
)
def test_bad_input_leaves_run_folder_unchanged(tmp_path, config, argv, needles):
    run = _fake_run(tmp_path, config)
    before = tree_digest(run)
    res = run_opd([a.replace("{run}", str(run)) for a in argv])
    assert_clean_error(res, *needles)
    assert tree_digest(run) == before


def test_resume_missing_folder(tmp_path):
    res = run_opd(["distill", "--resume", tmp_path / "gone"])
    assert_clean_error(res, "gone", "does not exist")
    assert not (tmp_path / "gone").exists()


def test_eval_run_dir_is_a_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    assert_clean_error(run_opd(["eval", f]), "notes.txt")
    assert f.read_text() == "x"
