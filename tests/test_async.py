"""The asynchronous rollout pipeline (`train.async_rollouts=k`, opd.pipeline).

k = 0 is the synchronous loop bit for bit; with weights that do not move (lr ≈ 0) the queue
gives the synchronous losses bit for bit (same prompts, same random draws, same teacher
scores); with a real learning rate the rollouts are really k steps stale; resume refills the
queue from the checkpoint's state (exact with a real lr too: tests/test_async_resume.py); the
importance weights are 1 at lag 0 and clipped at c.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from opd.errors import ConfigError, TeacherUnreachable
from opd.run_setup import build_method
from opd.train import distill
from tests.helpers import fresh_models, tiny_cfg

TINY_LR = "train.lr=1e-30"  # AdamW moves no float32 weight: the policy never changes


def _run(tmp_path, prompt_file, tok, name, *extra, **kw):
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=4", *extra, name=name)
    res = distill(cfg, models=fresh_models(tok), evaluate=False, log=lambda *_: None, **kw)
    return res


def _weights(res):
    return {k: v.clone() for k, v in res.models.student.state_dict().items()}


def _rows(res, key):
    return [row.get(key) for row in res.metrics]


def _same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_k0_equals_the_synchronous_loop_bit_for_bit(tmp_path, prompt_file, tok):
    sync = _run(tmp_path, prompt_file, tok, "sync")
    k0 = _run(tmp_path, prompt_file, tok, "k0", "train.async_rollouts=0")
    assert sync.losses == k0.losses  # exact floats
    assert _same_weights(_weights(sync), _weights(k0))
    assert "policy_lag" not in k0.metrics[0]  # the synchronous rows are unchanged


@pytest.mark.parametrize("k", [1, 2])
def test_queue_gives_the_synchronous_numbers_when_weights_stay(tmp_path, prompt_file, tok, k):
    sync = _run(tmp_path, prompt_file, tok, "sync", TINY_LR)
    asyn = _run(tmp_path, prompt_file, tok, f"k{k}", TINY_LR, f"train.async_rollouts={k}")
    assert asyn.losses == sync.losses  # same prompts, same draws, same teacher scores
    assert _rows(asyn, "teacher_kl") == _rows(sync, "teacher_kl")
    assert _rows(asyn, "tokens") == _rows(sync, "tokens")
    assert _rows(asyn, "policy_lag") == [float(min(s, k)) for s in range(4)]


BIG_LR = "train.lr=5e-2"  # each row has its own sampling seed (opd.sampling.rows): only a
# weight change this large makes θ_{s-1} and θ_s sample different tokens from the same draws


def test_rollouts_are_really_stale_with_a_learning_rate(tmp_path, prompt_file, tok):
    sync = _run(tmp_path, prompt_file, tok, "sync", BIG_LR)
    asyn = _run(tmp_path, prompt_file, tok, "k1", BIG_LR, "train.async_rollouts=1")
    assert asyn.losses[0] == sync.losses[0]  # step 1: both written by θ_0
    assert asyn.losses[1:] != sync.losses[1:]  # then by θ_{s-1} instead of θ_s
    assert _rows(asyn, "policy_lag") == [0.0, 1.0, 1.0, 1.0]
    assert not _same_weights(_weights(sync), _weights(asyn))
    assert all(torch.isfinite(torch.tensor(asyn.losses)))


def test_checkpoint_holds_the_synchronous_state_and_resume_refills(tmp_path, prompt_file, tok):
    full = _run(tmp_path, prompt_file, tok, "full", TINY_LR, "train.async_rollouts=2")
    _run(tmp_path, prompt_file, tok, "sync", TINY_LR, "train.checkpoint_every=2")
    cfg = tiny_cfg(
        tmp_path,
        prompt_file,
        "train.steps=4",
        TINY_LR,
        "train.async_rollouts=2",
        "train.checkpoint_every=2",
        name="cut",
    )
    distill(cfg, models=fresh_models(tok), evaluate=False, stop_after=2, log=lambda *_: None)
    # the checkpoint of step 2 holds the data position the synchronous loop's holds
    state = json.loads((tmp_path / "cut/checkpoints/step_000002/state.json").read_text())
    sync_state = json.loads((tmp_path / "sync/checkpoints/step_000002/state.json").read_text())
    assert state["data"] == sync_state["data"]
    assert state["python_rng"] == sync_state["python_rng"]
    rng = load_file(str(tmp_path / "cut/checkpoints/step_000002/rng.safetensors"))
    sync_rng = load_file(str(tmp_path / "sync/checkpoints/step_000002/rng.safetensors"))
    assert torch.equal(rng["torch_cpu"], sync_rng["torch_cpu"])  # not the producer's state
    cfg = tiny_cfg(
        tmp_path,
        prompt_file,
        "train.steps=4",
        TINY_LR,
        "train.async_rollouts=2",
        "train.checkpoint_every=2",
        name="cut",
    )
    res = distill(cfg, models=fresh_models(tok), evaluate=False, resume=True, log=lambda *_: None)
    assert res.losses == full.losses  # the resumed run's prompts and draws are the same
    assert _rows(res, "policy_lag") == [2.0, 2.0]  # refilled by θ_0, θ_1: exact (opd.pipeline)


def test_importance_weights(tmp_path, prompt_file, tok):
    still = _run(
        tmp_path,
        prompt_file,
        tok,
        "still",
        TINY_LR,
        "train.async_rollouts=1",
        "train.async_correction=true",
    )
    plain = _run(tmp_path, prompt_file, tok, "plain", TINY_LR, "train.async_rollouts=1")
    assert _rows(still, "async_weight_mean") == [1.0] * 4  # π_θ = π_β: w = 1 exactly
    assert still.losses == plain.losses
    moving = _run(
        tmp_path,
        prompt_file,
        tok,
        "moving",
        "train.async_rollouts=1",
        "train.async_correction=true",
        "train.async_correction_clip=1.05",
        "train.lr=3e-2",
    )
    means, maxes = _rows(moving, "async_weight_mean"), _rows(moving, "async_weight_max")
    assert means[0] == 1.0 and maxes[0] == 1.0  # step 1: lag 0
    assert any(m != 1.0 for m in means[1:])  # stale: the weights move away from 1
    assert all(m <= 1.05 + 1e-6 for m in maxes)  # clipped at c


def test_refusals(tmp_path, prompt_file, tok):
    with pytest.raises(ConfigError, match="needs train.async_rollouts >= 1"):
        _run(tmp_path, prompt_file, tok, "a", "train.async_correction=true")
    with pytest.raises(ConfigError, match="keeps state across steps"):
        _run(tmp_path, prompt_file, tok, "b", "train.async_rollouts=1", "method.recipe=distillm")
    assert not (tmp_path / "b").exists()  # refused in setup_run, before the run folder


class _Flaky:
    """The recipe's teacher access, unreachable from its `fail_at`-th score on."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, teacher, rollout, vocab_size):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise TeacherUnreachable("teacher http://x unreachable after 1 tries")
        return self.inner.score(teacher, rollout, vocab_size)


def test_a_producer_error_stops_at_its_step_with_a_checkpoint(tmp_path, prompt_file, tok):
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=4", "train.async_rollouts=1", name="f")
    method = build_method(cfg)
    method = dataclasses.replace(method, teacher=_Flaky(method.teacher, fail_at=3))
    with pytest.raises(TeacherUnreachable, match="stopped at step 3 with a checkpoint of step 2"):
        distill(cfg, models=fresh_models(tok), method=method, evaluate=False, log=lambda *_: None)
    rows = (tmp_path / "f/metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2  # items 0 and 1 trained; item 2 (scored during step 2) failed
    sync = _run(tmp_path, prompt_file, tok, "sync", "train.checkpoint_every=2")
    state = json.loads((tmp_path / "f/checkpoints/step_000002/state.json").read_text())
    sync_state = json.loads((tmp_path / "sync/checkpoints/step_000002/state.json").read_text())
    assert state["data"] == sync_state["data"]  # rewound to just before item 2
    assert json.loads(rows[0])["loss"] == sync.losses[0]
