"""Kill a real `opd distill` process at random points, resume until done: same student.

A subprocess run on tiny saved models (8 steps, a checkpoint every step) is killed with
SIGKILL at random times (3 seeds; each resume may be killed again) and once interrupted with
SIGINT, then resumed to the end. The final `student/` weights must equal an uninterrupted
run's exactly, and metrics.jsonl must hold every step row and every eval row exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from opd.logs import read_metrics
from tests.helpers import save_tiny_models, small_cli_args, write_prompts

STEPS = 8


def _args(models, data, out):
    return small_cli_args(
        out.parent,
        models,
        data,
        "data.chat_template=false",
        f"train.steps={STEPS}",
        "train.checkpoint_every=1",
        "train.threads=1",
        f"output_dir={out}",  # later overrides win
    )


def _start(models, data, out):
    cmd = [sys.executable, "-m", "opd.cli", "distill", "--no-report"]
    cmd += ["--resume", str(out)] if (out / "config.yaml").is_file() else _args(models, data, out)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(models, data, out) -> float:
    t0 = time.perf_counter()
    proc = _start(models, data, out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return time.perf_counter() - t0


def _check_same(run, ref):
    a = load_file(str(run / "student" / "model.safetensors"))
    b = load_file(str(ref / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k
    rows = read_metrics(run / "metrics.jsonl")
    steps = [r["step"] for r in rows if "loss" in r]
    evals = [r["step"] for r in rows if r.get("event") == "eval"]
    assert steps == list(range(1, STEPS + 1)), steps
    assert evals == [0, STEPS], evals
    ref_losses = [r["loss"] for r in read_metrics(ref / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] for r in rows if "loss" in r] == ref_losses


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    models = save_tiny_models(root / "models")
    data = write_prompts(root / "p.jsonl", 12)
    seconds = _finish(models, data, root / "ref")
    return models, data, root / "ref", seconds


def _wait_for_steps(proc, out, n: int, timeout: float = 240) -> None:
    """Until `n` step rows are in metrics.jsonl (n = 0: until the run folder exists)."""
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if n == 0 and (out / "config.yaml").is_file():
            return
        if metrics.is_file() and metrics.read_text().count('"loss"') >= n > 0:
            return
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_points_then_resume(setup, tmp_path, seed):
    """Kill points: after a random number of logged steps plus a random fraction of a step
    (mid-step, mid-evaluation or mid-checkpoint), twice per seed, then resume to the end."""
    models, data, ref, _ = setup
    rng = random.Random(seed)
    out = tmp_path / "run"
    kills, done = 0, 0
    for _ in range(2):
        proc = _start(models, data, out)
        target = rng.randint(done, STEPS - 1)
        _wait_for_steps(proc, out, target)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=300)
        done = target
    _finish(models, data, out)
    assert kills >= 1
    _check_same(out, ref)


@pytest.mark.slow
def test_sigint_writes_a_checkpoint_then_resume(setup, tmp_path):
    models, data, ref, seconds = setup
    out = tmp_path / "run"
    proc = _start(models, data, out)
    _wait_for_steps(proc, out, 2)  # training has started: interrupt it
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    if proc.returncode != 0:  # interrupted mid-run (0: it had already finished)
        assert proc.returncode == 130, err
        assert "--resume" in err and "checkpoint written" in err, err
        assert (out / "checkpoints" / "latest").is_file()
        _finish(models, data, out)
    _check_same(out, ref)
    assert os.path.isdir(out / "student")
