"""What a resume may and may not change, interruption at any moment, and run-time warnings."""

from __future__ import annotations

import json
import signal

import pytest

from opd.train import StopRequests
from tests.helpers import (
    assert_clean_error,
    run_opd,
    save_tiny_models,
    small_cli_args,
    tree_digest,
    write_prompts,
)


@pytest.fixture
def stopped_run(tmp_path, prompt_file):
    """A 4-step on_policy_rkl run stopped after step 2 (checkpoint written)."""
    models = save_tiny_models(tmp_path / "models")
    args = small_cli_args(
        tmp_path, models, prompt_file, "train.steps=4", "method.recipe=on_policy_rkl"
    )
    res = run_opd(["distill", *args, "--stop-after", "2", "--no-report"])
    assert res.code == 0, res.err
    return tmp_path / "run"


@pytest.mark.parametrize(
    "override,key",
    [
        ("recipe=gkd", "method.recipe"),
        ("method.args.beta=0.3", "method.args"),
        ("train.batch_size=3", "train.batch_size"),
        ("train.seed=7", "train.seed"),
        ("data.eval_count=2", "data.eval_count"),
    ],
)
def test_resume_refuses_a_change_of_method_data_or_batch_order(stopped_run, override, key):
    before = tree_digest(stopped_run)
    res = run_opd(["distill", "--resume", stopped_run, override])
    line = assert_clean_error(res, key, "was started with", "start a new run")
    assert "on_policy_rkl" in line or key != "method.recipe"
    assert tree_digest(stopped_run) == before


def test_resume_may_extend_the_run(stopped_run):
    res = run_opd(["distill", "--resume", stopped_run, "train.steps=5", "--no-report"])
    assert res.code == 0, res.err
    rows = [json.loads(x) for x in (stopped_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "event" not in r] == [1, 2, 3, 4, 5]


def test_resume_with_changed_training_prompts_names_data_train(stopped_run, prompt_file):
    write_prompts(prompt_file, n=24, seed=99)  # same file name, other prompts
    before = tree_digest(stopped_run)
    res = run_opd(["distill", "--resume", stopped_run])
    line = assert_clean_error(res, "data.train", "changed since the checkpoint")
    assert "PromptStream" not in line
    assert tree_digest(stopped_run) == before


def test_ctrl_c_while_libraries_import_is_an_interruption(monkeypatch):
    import opd.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(opd.cli, "_quiet_libraries", interrupted)
    res = run_opd(["recipes"])
    assert res.traceback is None and res.code == 130
    assert res.err.strip() == "opd: interrupted"


def test_an_ignored_sigint_stays_ignored_during_training():
    """A background job started by a script ignores SIGINT from the start; the loop must not
    start catching it halfway (it used to stop such a run only once training had begun)."""
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        with StopRequests():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (old_term, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) == old_term
    finally:
        signal.signal(signal.SIGINT, old_int)


def test_warnings_for_a_batch_larger_than_the_data_and_eval_on_train(tmp_path):
    data = write_prompts(tmp_path / "few.jsonl", n=6)
    models = save_tiny_models(tmp_path / "models")
    args = small_cli_args(tmp_path, models, data, "train.batch_size=8", "train.steps=1")
    res = run_opd(["distill", *args, "--no-report"])
    assert res.code == 0, res.err
    assert "warning: train.batch_size=8 is larger than the 6 training prompts" in res.out
    assert f"warning: data.eval is data.train ('{data}')" in res.out
