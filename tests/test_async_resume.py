"""Exact resume of the asynchronous pipeline (`opd.pipeline_state`, docs/scale.md).

A k = 1 and a k = 2 run of 4 steps with a learning rate large enough that θ_{s−1} and θ_s
sample different tokens, against the same run stopped after step 2 and resumed: the resumed
steps' losses, lags and the final weights are equal bit for bit (before, the queue was
refilled from θ_2 and they differed). A checkpoint with another k is refused (k' ≥ 1) or runs
synchronously (k' = 0); a damaged queue.safetensors makes the checkpoint damaged.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from opd.errors import ConfigError, TeacherUnreachable
from opd.run_setup import build_method
from opd.tiny import char_tokenizer
from opd.train import distill
from tests.helpers import fresh_models, tiny_cfg, tree_digest, write_prompts
from tests.test_async import _Flaky

LR = "train.lr=5e-2"  # large enough that a one-step-stale generator writes other tokens


def _cfg(tmp_path, prompt_file, name, k, *extra):
    return tiny_cfg(
        tmp_path,
        prompt_file,
        "train.steps=4",
        LR,
        f"train.async_rollouts={k}",
        "train.checkpoint_every=1",
        *extra,
        name=name,
    )


def _distill(cfg, tok, **kw):
    return distill(cfg, models=fresh_models(tok), evaluate=False, log=lambda *_: None, **kw)


def _weights(res):
    return {k: v.clone() for k, v in res.models.student.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """k → (folder, prompts, the uninterrupted 4-step run with that k), each made once."""
    made, tok = {}, char_tokenizer()

    def get(k):
        if k not in made:
            tmp = tmp_path_factory.mktemp(f"k{k}")
            prompt_file = write_prompts(tmp / "prompts.jsonl")
            made[k] = tmp, prompt_file, _distill(_cfg(tmp, prompt_file, "full", k), tok)
        return made[k]

    return get


@pytest.mark.parametrize("k", [1, 2])
def test_resume_equals_the_uninterrupted_run_bit_for_bit(uninterrupted, tok, k):
    tmp, prompt_file, full = uninterrupted(k)
    _distill(_cfg(tmp, prompt_file, "cut", k), tok, stop_after=2)
    ckpt = tmp / "cut/checkpoints/step_000002"
    state = json.loads((ckpt / "state.json").read_text())
    versions = list(range(2 - k, 2))  # items 2 .. 1+k were written by θ_{2−k} .. θ_1
    assert state["async"] == {"rollouts": k, "start": 0, "versions": versions}
    queue = load_file(str(ckpt / "queue.safetensors"))
    student = load_file(str(ckpt / "student.safetensors"))
    assert {key.split("/", 1)[0] for key in queue} == {str(v) for v in versions}
    assert len(queue) == len(versions) * len(student)  # every tensor of each version
    res = _distill(_cfg(tmp, prompt_file, "cut", k), tok, resume=True)
    assert res.losses == full.losses  # exact floats, the two restored ones and the two new
    assert [r["policy_lag"] for r in res.metrics] == [r["policy_lag"] for r in full.metrics[2:]]
    assert [r["teacher_kl"] for r in res.metrics] == [r["teacher_kl"] for r in full.metrics[2:]]
    mine, ref = _weights(res), _weights(full)
    assert all(torch.equal(mine[n], ref[n]) for n in ref)
    old = _refilled_from_theta_d(tmp, prompt_file, k, tok)
    assert full.losses[2:] != old.losses[2:]  # so the test can fail


def _refilled_from_theta_d(tmp, prompt_file, k, tok):
    """The old resume: the queue refilled from the checkpoint's θ_2 (no saved versions)."""
    cfg = _cfg(tmp, prompt_file, "old", k)
    _distill(cfg, tok, stop_after=2)
    ckpt = tmp / "old/checkpoints/step_000002"
    state = json.loads((ckpt / "state.json").read_text())
    del state["async"]  # as written before queues were saved
    (ckpt / "state.json").write_text(json.dumps(state))
    (ckpt / "queue.safetensors").unlink()
    return _distill(_cfg(tmp, prompt_file, "old", k), tok, resume=True)


def test_another_k_on_resume(uninterrupted, tok):
    tmp, prompt_file, _ = uninterrupted(1)
    before = tree_digest(tmp / "full")
    other = _cfg(tmp, prompt_file, "full", 2)
    with pytest.raises(ConfigError) as err:
        _distill(other, tok, resume=True)
    assert "train.async_rollouts=2" in str(err.value) and "train.async_rollouts=1" in str(err.value)
    assert tree_digest(tmp / "full") == before  # refused before anything was written
    lines = []
    sync = _cfg(tmp, prompt_file, "full", 0, "train.steps=5")
    res = distill(sync, models=fresh_models(tok), evaluate=False, resume=True, log=lines.append)
    assert len(res.losses) == 5 and "policy_lag" not in res.metrics[0]
    assert any("train.async_rollouts=1; resumed with 0" in line for line in lines)


def test_a_damaged_queue_file_falls_back_to_the_older_checkpoint(uninterrupted, tok):
    tmp, prompt_file, full = uninterrupted(2)
    cfg = _cfg(tmp, prompt_file, "damaged", 2)
    _distill(cfg, tok, stop_after=3)
    (tmp / "damaged/checkpoints/step_000003/queue.safetensors").write_bytes(b"not safetensors")
    lines = []
    res = distill(cfg, models=fresh_models(tok), evaluate=False, resume=True, log=lines.append)
    assert any("step_000003" in ln and "queue.safetensors is unreadable" in ln for ln in lines)
    assert res.losses == full.losses  # resumed exactly from step 2 instead


def test_resume_after_a_producer_error_equals_the_run_without_it(uninterrupted, tok):
    """The served teacher's "checkpoint and stop" at step 3 (item 2 failed in the producer):
    the checkpoint holds θ_1, the version item 2 was being written by, so resuming once the
    teacher answers gives the run in which it never failed."""
    tmp, prompt_file, full = uninterrupted(1)
    cfg = _cfg(tmp, prompt_file, "flaky", 1)
    method = build_method(cfg)
    method = dataclasses.replace(method, teacher=_Flaky(method.teacher, fail_at=3))
    with pytest.raises(TeacherUnreachable, match="checkpoint of step 2"):
        distill(cfg, models=fresh_models(tok), method=method, evaluate=False, log=lambda *_: None)
    state = json.loads((tmp / "flaky/checkpoints/step_000002/state.json").read_text())
    assert state["async"]["versions"] == [1]
    res = _distill(_cfg(tmp, prompt_file, "flaky", 1), tok, resume=True)
    assert res.losses == full.losses
