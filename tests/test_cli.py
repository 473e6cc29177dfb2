"""The command line: recipes listing, a smoke run, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

import pytest

from opd.cli import main, parse_args
from tests.helpers import (
    assert_clean_error,
    run_opd,
    save_tiny_models,
    small_cli_args,
    tree_digest,
    write_privileged_prompts,
    write_prompts,
)


@pytest.fixture
def model_dirs(tmp_path):
    return save_tiny_models(tmp_path)


small_args = small_cli_args


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_recipes_list_and_show(capsys):
    code, out, _ = run_cli(["recipes"], capsys)
    assert code == 0
    for name in ("gkd", "seqkd", "supervised_kd", "on_policy_rkl"):
        assert name in out
    code, out, _ = run_cli(["recipes", "gkd"], capsys)
    assert (
        code == 0 and "Agarwal" in out and "generalized_jsd(beta=0.5)" in out and "lmbda=0.5" in out
    )


def test_distill_smoke_writes_report(tmp_path, model_dirs, capsys):
    data = write_prompts(tmp_path / "d.jsonl", n=8)
    code, out, err = run_cli(
        ["distill", *small_args(tmp_path, model_dirs, data, "recipe=gkd")], capsys
    )
    assert code == 0, err
    assert "KL(q_student ‖ p_teacher)" in out and "student after" in out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["kl_before"] > 0 and report["kl_after"] > 0
    assert (tmp_path / "run" / "student" / "config.json").is_file()


def test_resume_from_cli(tmp_path, model_dirs, capsys):
    data = write_prompts(tmp_path / "d.jsonl", n=8)
    args = small_args(tmp_path, model_dirs, data, "train.steps=4")
    assert run_cli(["distill", *args, "--stop-after", "2", "--no-report"], capsys)[0] == 0
    code, out, err = run_cli(["distill", "--resume", str(tmp_path / "run"), "--no-report"], capsys)
    assert code == 0, err
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == [1, 2, 3, 4]


def test_bad_data_row_one_line_exit_2(tmp_path, model_dirs, capsys):
    data = write_prompts(tmp_path / "d.jsonl", n=4)
    with open(data, "a") as fh:
        fh.write(json.dumps({"prompt": 17}) + "\n")
    code, out, err = run_cli(["distill", *small_args(tmp_path, model_dirs, data)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "d.jsonl:5" in lines[0] and "prompt" in lines[0]
    assert "Traceback" not in err
    # --skip-bad-rows counts it and carries on
    code, out, err = run_cli(
        [
            "distill",
            *small_args(tmp_path, model_dirs, data, "output_dir=" + str(tmp_path / "r2")),
            "--skip-bad-rows",
            "--no-report",
        ],
        capsys,
    )
    assert code == 0, err


def test_bad_config_value_one_line_exit_2(capsys):
    code, _, err = run_cli(["distill", "train.lr=-3"], capsys)
    assert code == 2 and err.strip().startswith("opd: error: train.lr: must be > 0")
    assert len(err.strip().splitlines()) == 1


def test_missing_model_path_one_line_exit_2(tmp_path, capsys):
    code, _, err = run_cli(
        ["distill", f"model.teacher={tmp_path / 'nope'}", f"output_dir={tmp_path / 'r'}"], capsys
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "does not exist" in err and "nope" in err


def test_console_script_exit_code_and_debug(tmp_path):
    cmd = [sys.executable, "-m", "opd.cli", "distill", "train.steps=0"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "train.steps" in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "opd.cli", "--debug", "distill", "train.steps=0"],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_eval_command(tmp_path, model_dirs, capsys):
    data = write_prompts(tmp_path / "d.jsonl", n=4)
    t, s = model_dirs
    code, out, err = run_cli(
        [
            "eval",
            f"model.teacher={t}",
            f"model.student={s}",
            f"data.eval={data}",
            "data.eval_count=4",
            "sampling.max_new_tokens=4",
        ],
        capsys,
    )
    assert code == 0, err
    assert "teacher" in out and "student" in out and "KL(q_student ‖ p_teacher)" in out


def _all_recipes():
    from opd.recipes import RECIPES

    return sorted(RECIPES)


@pytest.mark.parametrize("recipe", _all_recipes())
def test_every_recipe_runs_from_the_command_line(tmp_path, model_dirs, capsys, recipe):
    data = write_privileged_prompts(tmp_path / "d.jsonl", n=8)  # self-teachers read a field
    t, s = model_dirs
    extra = [f"recipe={recipe}", "train.steps=1"]
    if recipe == "multi_teacher":
        extra.append(f"model.teacher={t},{s}")
    if recipe in ("sdft", "sdpo"):  # their fields (demonstration, feedback) are not in `data`
        extra.append("method.args.field=solution")
    extra.append("--no-report")
    code, out, err = run_cli(["distill", *small_args(tmp_path, model_dirs, data), *extra], capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]


# ---------------------------------------------------------------- issue 8: command line


def test_parse_args_keeps_override_order_around_flags():
    args = parse_args(["distill", "a=1", "--no-report", "b=2", "--stop-after", "3", "c=3", "a=4"])
    assert args.overrides == ["a=1", "b=2", "c=3", "a=4"]
    assert args.no_report and args.stop_after == 3
    args = parse_args(["eval", "RUN", "--config", "c.yaml", "x=1"])
    assert args.overrides == ["RUN", "x=1"] and args.config == "c.yaml"


def test_overrides_after_flags_run(tmp_path, model_dirs):
    data = write_prompts(tmp_path / "d.jsonl", n=8)
    args = small_args(tmp_path, model_dirs, data, "train.steps=3")
    out = tmp_path / "later"
    res = run_opd(["distill", "--no-report", *args, "--stop-after", "1", f"output_dir={out}"])
    assert res.code == 0, res.err
    assert not (tmp_path / "run").exists()  # the later output_dir won
    assert "steps: 3" in (out / "config.yaml").read_text()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]


def test_version_bench_help_and_help_config():
    res = run_opd(["--version"])
    assert res.code == 0 and res.out.strip() == f"opd {version('opd')}"
    res = run_opd(["bench", "--help"])
    assert res.code == 0 and "usage: opd bench" in res.out and "quality" in res.out
    res = run_opd(["distill", "--help-config"])
    assert res.code == 0 and "output_dir = ''" in res.out
    for short in ("recipe=", "lr=", "steps=", "epochs="):
        assert f"short form: {short}" in res.out


def test_usage_errors_use_the_opd_error_line():
    res = run_opd(["distill", "--stop-after", "-1"])
    line = assert_clean_error(res, "--stop-after", ">= 1")
    assert line.startswith("opd: error: distill: argument --stop-after")
    assert line.endswith("(see `opd distill --help`)") and res.err.count("\n") == 1


def test_eval_run_dir_writes_table_into_the_run(tmp_path, model_dirs):
    data = write_prompts(tmp_path / "d.jsonl", n=8)
    res = run_opd(["distill", *small_args(tmp_path, model_dirs, data), "--no-report"])
    assert res.code == 0, res.err
    run = tmp_path / "run"
    before = tree_digest(run)
    res = run_opd(["eval", run, "sampling.max_new_tokens=3"])
    assert res.code == 0, res.err
    assert "student" in res.out and "KL(q_student ‖ p_teacher)" in res.out
    summary = json.loads((run / "eval.json").read_text())
    assert summary["student"] == str(run / "student")
    assert summary["teacher"] == str(model_dirs[0]) and summary["eval_prompts"] == 4
    assert summary["kl"] > 0 and 0.0 <= summary["student_accuracy"] <= 1.0
    md = (run / "eval.md").read_text()
    assert "| student |" in md and f"{summary['kl']:.4f}" in md
    after = tree_digest(run)
    assert {k: v for k, v in after.items() if not k.startswith("eval.")} == before


def test_docs_cli_lists_commands_flags_and_trl_names():
    from pathlib import Path

    from opd.cli import _parser
    from opd.config_names import TRL_NAMES

    doc = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    commands = _parser().parse_args(["recipes"])._commands
    for name, sub in commands.items():
        assert f"`opd {name}" in doc, name
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in doc, (name, flag)
    for name, (target, _) in TRL_NAMES.items():
        assert f"`{name}`" in doc and target.split("=")[0] in doc, name


def test_empty_data_eval_holds_out_rows_of_data_train(tmp_path, model_dirs):
    # once an error suggesting the unknown keys 'eval_count'/'eval_fraction'; now data.eval=""
    # means "hold out rows of data.train", capped so that training keeps most rows
    data = write_prompts(tmp_path / "d.jsonl", n=6)
    args = small_args(tmp_path, model_dirs, data, "data.eval=", "data.eval_count=6")
    res = run_opd(["distill", *args])
    assert res.code == 0, res.err
    assert "eval_fraction" not in res.out + res.err
    assert "train: " + str(data) + " (5 of 6 rows)" in res.out
    assert "eval: held out from " + str(data) + " (1 rows" in res.out
