"""`opd distill` against a real `opd serve-teacher` process: same losses as the local teacher,
and the faults a served teacher brings (killed server, slow answers, 500s, bad JSON, another
tokenizer), each against a real server process on 127.0.0.1 stopped by PID."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opd.config import load_config
from opd.errors import ConfigError, TeacherUnreachable
from opd.train import distill
from tests.helpers import (
    assert_clean_error,
    run_opd,
    save_tiny_models,
    tree_digest,
    write_prompts,
)

ROOT = Path(__file__).resolve().parents[1]


def start(tmp: Path, model: Path | str, *extra, script: str | None = None, name="srv"):
    """A server process on a free loopback port: (Popen, url)."""
    port_file = tmp / f"{name}.port"
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "opd", "serve-teacher"] if script is None else [
        sys.executable,
        str(ROOT / script),
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [*cmd, str(model), "--port", "0", "--port-file", str(port_file), "--threads", "1", *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}"


def stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served")
    t, s = save_tiny_models(tmp)
    prompts = write_prompts(tmp / "prompts.jsonl", n=16)
    return tmp, t, s, prompts


@pytest.fixture(scope="module")
def server(pair):
    tmp, t, _, _ = pair
    proc, url = start(tmp, t, name="main")
    yield url
    stop(proc)


def cfg(tmp, name, teacher, student, prompts, *extra):
    return load_config(
        None,
        [
            f"output_dir={tmp / name}",
            f"model.teacher={teacher}",
            f"model.student={student}",
            f"data.train={prompts}",
            f"data.eval={prompts}",
            "data.eval_count=4",
            "data.chat_template=false",
            "sampling.max_new_tokens=5",
            "train.batch_size=4",
            "train.progress=false",
            "train.lr=3e-3",
            "model.teacher_retries=1",
            "model.teacher_timeout=20",
            *extra,
        ],
    )


def steps(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.mark.parametrize(
    "recipe", ["sampled_rkl", "topk_rkl", "g_opd"], ids=["sampled", "topk", "g_opd"]
)
def test_five_steps_with_the_served_teacher_equal_the_local_teacher(pair, server, recipe):
    tmp, t, s, prompts = pair
    extra = (f"recipe={recipe}", "train.steps=5", "method.args.k=8") if recipe == "topk_rkl" else (
        f"recipe={recipe}",
        "train.steps=5",
    )
    local = distill(cfg(tmp, f"local-{recipe}", t, s, prompts, *extra), evaluate=False)
    served = distill(cfg(tmp, f"served-{recipe}", server, s, prompts, *extra), evaluate=False)
    assert len(served.losses) == 5
    assert served.losses == pytest.approx(local.losses, rel=1e-4, abs=1e-5)
    rows = steps(tmp / f"served-{recipe}")
    assert all(r["teacher_requests"] >= 1 and r["teacher_retries"] == 0 for r in rows)


@pytest.mark.slow  # starts its own server processes (~15 s each on 2 cores)
def test_killed_server_checkpoints_exit_2_and_resume_matches(pair, server):
    tmp, t, s, prompts = pair
    extra = ("recipe=sampled_rkl", "train.steps=5", "train.checkpoint_every=1")
    full = distill(cfg(tmp, "full", server, s, prompts, *extra), evaluate=False)
    # each step sends one request (4 short rows < one batch): the 4th request kills it
    proc, url = start(tmp, t, "--exit-at", "4", script="tests/fault_server.py", name="dying")
    try:
        argv = ["distill", *[a for a in _argv(tmp, "cut", url, s, prompts, *extra)]]
        res = run_opd(argv)
    finally:
        stop(proc)
    line = assert_clean_error(res, url, "unreachable", "--resume", "checkpoint of step 3")
    assert "step 4" in line
    ckpts = sorted(p.name for p in (tmp / "cut" / "checkpoints").glob("step_*"))
    assert ckpts[-1].endswith("3"), ckpts
    proc, url2 = start(tmp, t, name="back")
    try:
        res = run_opd(["distill", "--resume", str(tmp / "cut"), f"model.teacher={url2}"])
    finally:
        stop(proc)
    assert res.code == 0, res.err
    losses = [r["loss"] for r in steps(tmp / "cut")]
    assert losses == pytest.approx(full.losses, rel=1e-4, abs=1e-5)


def _argv(tmp, name, teacher, student, prompts, *extra):
    return [
        f"output_dir={tmp / name}",
        f"model.teacher={teacher}",
        f"model.student={student}",
        f"data.train={prompts}",
        "data.eval_count=0",
        "data.chat_template=false",
        "sampling.max_new_tokens=5",
        "train.batch_size=4",
        "train.progress=false",
        "train.lr=3e-3",
        "model.teacher_retries=1",
        "model.teacher_timeout=20",
        *extra,
    ]


@pytest.mark.slow  # starts its own server processes (~15 s each on 2 cores)
def test_slow_answers_time_out_are_retried_and_counted(pair):
    tmp, t, s, prompts = pair
    proc, url = start(
        tmp, t, "--delay-first", "1", "--delay", "3", script="tests/fault_server.py", name="slow"
    )
    try:
        c = cfg(tmp, "slow", url, s, prompts, "recipe=sampled_rkl", "train.steps=2",
                "model.teacher_timeout=1", "model.teacher_retries=2")
        res = distill(c, evaluate=False)
    finally:
        stop(proc)
    assert len(res.losses) == 2
    rows = steps(tmp / "slow")
    assert rows[0]["teacher_timeouts"] >= 1 and rows[0]["teacher_retries"] >= 1
    assert rows[1]["teacher_timeouts"] == 0


@pytest.mark.slow  # starts its own server processes (~15 s each on 2 cores)
def test_500_and_malformed_json_are_retried_then_a_clear_error(pair):
    tmp, t, s, prompts = pair
    proc, url = start(
        tmp, t, "--fail-first", "1", "--malformed-first", "1", script="tests/fault_server.py",
        name="flaky",
    )
    try:
        c = cfg(tmp, "flaky", url, s, prompts, "recipe=sampled_rkl", "train.steps=2",
                "model.teacher_retries=2")
        distill(c, evaluate=False)
    finally:
        stop(proc)
    rows = steps(tmp / "flaky")
    assert rows[0]["teacher_retries"] == 2 and rows[0]["teacher_errors"] == 2
    proc, url = start(tmp, t, "--fail-first", "50", script="tests/fault_server.py", name="down")
    try:
        c = cfg(tmp, "down", url, s, prompts, "recipe=sampled_rkl", "train.steps=2",
                "model.teacher_retries=1")
        with pytest.raises(TeacherUnreachable, match=r"500"):
            distill(c, evaluate=False)
    finally:
        stop(proc)


@pytest.mark.slow  # starts its own server processes (~15 s each on 2 cores)
def test_a_server_with_another_tokenizer_is_refused_before_training(pair, tmp_path):
    from opd.tiny import tiny_llama

    tmp, _, s, prompts = pair
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(s)
    other.add_tokens(["<extra-a>", "<extra-b>"])  # ids past the student's vocabulary
    m = tiny_llama(len(other), hidden=32, layers=1, seed=3)
    m.save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    proc, url = start(tmp_path, tmp_path / "other", name="other")
    try:
        before = tree_digest(tmp_path)
        res = run_opd(["distill", *_argv(tmp_path, "run", url, s, prompts, "recipe=sampled_rkl")])
    finally:
        stop(proc)
    assert_clean_error(res, url, "tokenizer")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert {k for k in tree_digest(tmp_path) if k.startswith("run")} <= set(before)


def test_a_full_logit_recipe_with_a_served_teacher_is_refused_naming_both(pair, server):
    tmp, _, s, prompts = pair
    with pytest.raises(ConfigError, match=r"full_logits.*served"):
        distill(cfg(tmp, "refused", server, s, prompts, "recipe=on_policy_rkl"), evaluate=False)


@pytest.mark.slow
def test_serve_embedded_and_distill_against_it_lowers_heldout_kl(tmp_path):
    proc, url = start(tmp_path, "embedded", name="embedded")
    try:
        res = run_opd(
            [
                "distill",
                f"model.teacher={url}",
                "model.student=embedded",
                "model.student_prune_to=15",
                "recipe=topk_rkl",
                "data.train=task:arithmetic",
                "data.eval=task:arithmetic:test",
                "data.eval_count=4",
                "train.steps=4",
                "train.batch_size=8",
                "train.lr=5e-5",
                "sampling.max_new_tokens=16",
                "train.progress=false",
                f"output_dir={tmp_path / 'run'}",
            ]
        )
    finally:
        stop(proc)
    assert res.code == 0, res.err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("event") == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 4
    assert all(r["heldout_kl"] is None for r in evals)  # served: no full distribution
    assert evals[-1]["heldout_teacher_nll"] < evals[0]["heldout_teacher_nll"]
    # the full-vocabulary KL, measured with a local copy of the teacher, fell too
    from opd.build import build_data, build_models
    from opd.evaluate import heldout_kl
    from opd.models import load_model

    c = load_config(
        None,
        ["model.student_prune_to=15", "model.student=embedded", "data.train=task:arithmetic",
         "data.eval=task:arithmetic:test", "data.eval_count=4", "sampling.max_new_tokens=16"],
    )
    m = build_models(c)
    data = build_data(c, m.tokenizer)
    after, _ = load_model(tmp_path / "run" / "student")

    def kl(student):
        return heldout_kl(student, m.teacher, data.eval, pad_id=m.pad_id, stop_ids=m.stop_ids,
                          vocab_size=m.vocab_size, max_new_tokens=16)["kl"]

    before_kl, after_kl = kl(m.student), kl(after)
    assert after_kl < 0.8 * before_kl, (before_kl, after_kl)
