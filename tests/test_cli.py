"""The command line: recipes listing, a smoke run, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from opd.cli import main
from tests.helpers import save_tiny_models, small_cli_args, write_prompts


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
    data = write_prompts(tmp_path / "d.jsonl", n=8)
    t, s = model_dirs
    extra = [f"recipe={recipe}", "train.steps=1"]
    if recipe == "multi_teacher":
        extra.append(f"model.teacher={t},{s}")
    extra.append("--no-report")
    code, out, err = run_cli(["distill", *small_args(tmp_path, model_dirs, data), *extra], capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]
