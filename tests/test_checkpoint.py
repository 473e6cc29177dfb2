"""Checkpoint policy and resume semantics: nothing lost, nothing logged twice."""

from __future__ import annotations

import os
import signal

import pytest

from opd.logs import read_metrics
from opd.train import RunInterrupted, distill
from tests.helpers import fresh_models, run_opd, save_tiny_models, small_cli_args, tiny_cfg

QUIET = dict(log=lambda *_: None)


def _rows(run):
    rows = read_metrics(run / "metrics.jsonl")
    return [r["step"] for r in rows if "loss" in r], [r["step"] for r in rows if "event" in r]


def test_checkpoint_every_defaults_to_an_interval():
    from opd.config import RunConfig

    tc = RunConfig().train
    assert tc.checkpoint_every == 50 and tc.checkpoint_minutes == 10.0


def test_checkpoint_minutes_saves_between_intervals(tmp_path, prompt_file, tok, monkeypatch):
    """A clock that advances 5 minutes per reading with checkpoint_minutes=10: every 2nd step."""
    import opd.train as train_mod

    t = [0.0]

    def clock():
        t[0] += 300.0  # read at the start, after each step and after each save
        return t[0]

    monkeypatch.setattr(train_mod, "_clock", clock)
    cfg = tiny_cfg(
        tmp_path,
        prompt_file,
        "train.steps=5",
        "train.checkpoint_every=0",
        "train.checkpoint_minutes=10",
        "train.keep_checkpoints=9",
    )
    distill(cfg, models=fresh_models(tok), evaluate=False, **QUIET)
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert saved == ["step_000002", "step_000004", "step_000005"], saved


def test_stop_after_writes_its_checkpoint(tmp_path, prompt_file, tok):
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=10", "train.checkpoint_every=0")
    distill(cfg, models=fresh_models(tok), stop_after=3, **QUIET)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert not (tmp_path / "run" / "student").exists()


def test_final_eval_row_once_when_resumed_after_the_last_checkpoint(
    tmp_path, prompt_file, tok, monkeypatch
):
    """Killed after the final checkpoint but before the student was saved: the resume saves
    the student and logs no second final evaluation."""
    import opd.train as train_mod

    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=3", "train.eval_every=1")

    def killed(*a, **k):
        raise SystemExit("killed")

    monkeypatch.setattr(train_mod, "save_student", killed)
    with pytest.raises(SystemExit):
        distill(cfg, models=fresh_models(tok), **QUIET)
    monkeypatch.undo()
    res = distill(
        tiny_cfg(tmp_path, prompt_file, "train.steps=3", "train.eval_every=1"),
        models=fresh_models(tok),
        resume=True,
        **QUIET,
    )
    assert (res.run_dir / "student").is_dir()
    assert _rows(res.run_dir) == ([1, 2, 3], [0, 1, 2, 3])


def test_resume_of_a_finished_run_changes_nothing(tmp_path, prompt_file, tok):
    t, s = save_tiny_models(tmp_path / "models")
    args = small_cli_args(tmp_path, (t, s), prompt_file)
    first = run_opd(["distill", *args, "--no-report"])
    assert first.code == 0
    assert first.out.splitlines()[:2] == [f"teacher: {t}", f"student: {s}"]
    run = tmp_path / "run"
    before = (run / "metrics.jsonl").read_text()
    res = run_opd(["distill", "--resume", str(run)])
    assert res.code == 0 and "already finished" in res.out
    assert (run / "metrics.jsonl").read_text() == before
    assert not (run / "report.md").exists()


def test_resume_without_checkpoint_starts_from_step_zero(tmp_path, prompt_file, tok):
    """A run killed before its first checkpoint: --resume restarts it with the saved config."""
    t, s = save_tiny_models(tmp_path / "models")
    run = tmp_path / "run"
    args = small_cli_args(tmp_path, (t, s), prompt_file, "train.steps=3")
    assert run_opd(["distill", *args, "--stop-after", "1", "--no-report"]).code == 0
    import shutil

    shutil.rmtree(run / "checkpoints")  # as if killed before the first checkpoint
    res = run_opd(["distill", "--resume", str(run), "--no-report"])
    assert res.code == 0, res.err + (res.traceback or "")
    assert "no checkpoint" in res.out and "starting from step 0 with the saved config" in res.out
    assert _rows(run) == ([1, 2, 3], [0, 3])


@pytest.fixture
def default_sigint():
    """SIGINT as an interactive Python has it: a shell starts background jobs (`cmd &`, so
    a suite run that way) with SIGINT ignored, which opd rightly leaves ignored."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_checkpoints_and_resumes(
    tmp_path, prompt_file, tok, signum, monkeypatch, default_sigint
):
    import opd.train as train_mod

    real = train_mod.train_step

    def step_then_signal(run, step):
        row = real(run, step)
        if step == 1:
            os.kill(os.getpid(), signum)
        return row

    monkeypatch.setattr(train_mod, "train_step", step_then_signal)
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=4", "train.checkpoint_every=0")
    with pytest.raises(RunInterrupted, match="stopped after step 2.*--resume") as err:
        distill(cfg, models=fresh_models(tok), **QUIET)
    assert err.value.exit_code == 128 + signum
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"
    monkeypatch.undo()
    distill(
        tiny_cfg(tmp_path, prompt_file, "train.steps=4"),
        models=fresh_models(tok),
        resume=True,
        **QUIET,
    )
    assert _rows(run) == ([1, 2, 3, 4], [0, 4])


def test_cli_sigterm_exit_code(tmp_path, prompt_file, monkeypatch):
    import opd.train as train_mod

    real = train_mod.train_step

    def step_then_signal(run, step):
        row = real(run, step)
        os.kill(os.getpid(), signal.SIGTERM)
        return row

    monkeypatch.setattr(train_mod, "train_step", step_then_signal)
    t, s = save_tiny_models(tmp_path / "models")
    res = run_opd(["distill", *small_cli_args(tmp_path, (t, s), prompt_file, "train.steps=3")])
    assert res.code == 143, res.err
    assert "SIGTERM" in res.err and "--resume" in res.err


def test_first_lines_name_the_sources(tmp_path, prompt_file, tok):
    from opd.config import load_config
    from opd.run_setup import source_lines

    lines = source_lines(load_config(None, []), models_given=False, data=None)
    assert lines[0] == "teacher: embedded SmolLM2-135M-Instruct (the default; set model.teacher)"
    assert lines[1] == "student: pruned from the teacher: 15 layers (model.student_layers)"
    logged = []
    distill(
        tiny_cfg(tmp_path, prompt_file, "train.steps=1"),
        models=fresh_models(tok),
        evaluate=False,
        log=logged.append,
    )
    assert logged[0].startswith("teacher: ") and logged[1].startswith("student: ")
    # the data lines come from the prompt sets actually built (PromptSets.describe)
    assert logged[2] == f"train: {prompt_file} (24 rows)"
    assert logged[3].startswith(f"eval: {prompt_file}"), logged[3]
