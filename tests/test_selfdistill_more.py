"""The `adapter_off` self-teacher and the recipe `spin` (issue 11, items 1 and 4): losses
against float64 hand computations, CLI runs on tiny saved models, exact resume, clear errors
(`gates` and `hdpo`: tests/test_gates_hdpo.py)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from opd.context import StepContext
from opd.errors import ConfigError
from opd.models.lora import apply_lora
from opd.recipes import get_recipe
from opd.sampling import GenerationParams
from opd.selfdistill import SelfTeacher
from opd.step import micro_step
from opd.tiny import tiny_llama
from opd.train import distill
from tests.helpers import (
    assert_clean_error,
    fresh_models,
    run_opd,
    save_tiny_models,
    small_cli_args,
    tiny_cfg,
    write_privileged_prompts,
    write_prompts,
)
from tests.test_selfdistill import Fixed, examples

QUIET = dict(evaluate=False, log=lambda *_: None)
F64 = torch.float64
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def f64_models(tok, seed=5, student=None):
    student = student if student is not None else tiny_llama(len(tok), 24, 2, seed=seed).double()
    return type(
        "M", (), {"student": student, "teacher": None, "pad_id": 0, "vocab_size": len(tok)}
    )()


def step_rows(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def completion_logits(model, prompt_ids, y):
    """(T, V) logits that predict the tokens y after prompt_ids (no grad unless enabled)."""
    P, T = len(prompt_ids), len(y)
    return model(torch.tensor([list(prompt_ids) + list(y)])).logits[0, P - 1 : P - 1 + T]


# ---------------------------------------------------------------- adapter_off


def lora_models(tok):
    base = tiny_llama(len(tok), 24, 2, seed=7).double()
    student = apply_lora(copy.deepcopy(base), 4, 8.0, TARGETS, 0.0)
    with torch.no_grad():  # adapters that change the output (B starts at zero)
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return base, f64_models(tok, student=student)


def test_adapter_off_scores_are_the_base_models_and_nothing_is_copied(tok):
    base, models = lora_models(tok)
    before = sum(p.numel() for p in models.student.parameters())
    teacher = SelfTeacher("adapter_off")
    teacher.prepare(models)
    assert teacher.model is models.student
    assert sum(p.numel() for p in models.student.parameters()) == before
    (ex,) = examples(tok, [{"prompt": "2+3="}])
    y = tok("5x", add_special_tokens=False).input_ids
    rollout = Fixed([y]).rollout([ex], StepContext(pad_id=0))
    scores = teacher.rows(rollout, len(tok))
    got = scores.hidden_ND @ scores.head_VD.T
    with torch.no_grad():
        want = completion_logits(base, ex.prompt_ids, y)
        with_adapters = completion_logits(models.student, ex.prompt_ids, y)
    assert torch.allclose(got, want, atol=1e-10)
    assert (with_adapters - want).abs().max() > 1e-4  # the adapters are on again afterwards
    logp = teacher.logprobs(rollout, 0, 1.0, len(tok)).token_logprobs_N
    want_logp = torch.log_softmax(want, -1).gather(1, torch.tensor(y)[:, None])[:, 0]
    assert torch.allclose(logp.double(), want_logp, atol=1e-6)


def test_adapter_off_without_adapters_is_a_config_error(tok):
    with pytest.raises(ConfigError, match="'adapter_off' needs a LoRA student.*model.lora_r"):
        SelfTeacher("adapter_off").prepare(f64_models(tok))


def test_adapter_off_trains_from_the_cli_and_refuses_a_plain_student(tmp_path):
    dirs = save_tiny_models(tmp_path)
    data = write_privileged_prompts(tmp_path / "d.jsonl", n=6)
    args = small_cli_args(tmp_path, dirs, data, "recipe=opcd", "method.args.teacher=adapter_off")
    res = run_opd(["distill", *args])
    assert_clean_error(res, "adapter_off", "model.lora_r")
    res = run_opd(["distill", "--no-report", *args, "model.lora_r=4"])
    assert res.code == 0, res.err
    steps = step_rows(tmp_path / "run")
    assert len(steps) == 2 and all(r["loss"] > 0 for r in steps)


# ---------------------------------------------------------------- spin


def test_spin_loss_and_gradient_by_hand_float64(tok):
    """L = mean_b −log σ(λ·(r(y_w) − r(y_l))) with r = Σ log q_θ − Σ log p_t, the opponent p_t
    a different model than the student; value and gradient against autograd in float64."""
    lam = 0.7
    models = f64_models(tok)
    method = get_recipe("spin").build(lam=lam, iteration_steps=3)
    method.teacher.prepare(models)
    opponent = tiny_llama(len(tok), 24, 2, seed=9).double()
    method.teacher.model.load_state_dict(opponent.state_dict())
    recs = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "4+4=", "completion": "8!"}]
    exs = examples(tok, recs)
    rejected = [tok(t, add_special_tokens=False).input_ids for t in ("12", "7")]
    ctx = StepContext(pad_id=0, tokenizer=tok, models=models, params=GenerationParams(8))
    ctx.generate = lambda model, prompts: rejected  # the opponent's samples, fixed
    rollout = method.prefixes.rollout(exs, ctx)
    assert rollout.row_writers == ("dataset", "dataset", "opponent", "opponent")
    loss, _, _ = micro_step(method, models, rollout, ctx, "cpu")
    loss.backward()
    got_grad = {n: p.grad.clone() for n, p in models.student.named_parameters()}
    models.student.zero_grad()

    def seq_logp(model, ex, y):
        logits = completion_logits(model, ex.prompt_ids, y)
        return torch.log_softmax(logits, -1).gather(1, torch.tensor(y)[:, None]).sum()

    chosen = [list(ex.completion_ids) for ex in exs]  # the completion and its end token
    want = 0.0
    for ex, yw, yl in zip(exs, chosen, rejected):
        with torch.no_grad():
            ref_w, ref_l = seq_logp(opponent, ex, yw), seq_logp(opponent, ex, yl)
        r_w = seq_logp(models.student, ex, yw) - ref_w
        r_l = seq_logp(models.student, ex, yl) - ref_l
        want = want - F.logsigmoid(lam * (r_w - r_l)) / len(exs)
    want.backward()
    assert abs(float(loss.detach()) - float(want.detach())) < 1e-10
    assert abs(float(want.detach()) - math.log(2)) > 1e-3
    for n, p in models.student.named_parameters():
        assert torch.allclose(got_grad[n], p.grad, atol=1e-10), n


def test_spin_at_an_iteration_start_is_log_2_and_the_opponent_refreshes(tok):
    models = f64_models(tok)
    method = get_recipe("spin").build(iteration_steps=2)
    opp = method.teacher
    opp.prepare(models)
    exs = examples(tok, [{"prompt": "1+2=", "completion": "3"}])
    ctx = StepContext(pad_id=0, tokenizer=tok, models=models, params=GenerationParams(8))
    ctx.generate = lambda model, prompts: [[5, 6]]
    loss, _, _ = micro_step(method, models, method.prefixes.rollout(exs, ctx), ctx, "cpu")
    assert abs(float(loss.detach()) - math.log(2)) < 1e-12
    first = {n: p.clone() for n, p in opp.model.named_parameters()}
    with torch.no_grad():
        for p in models.student.parameters():
            p.add_(0.5)
    opp.after_optimizer_step()  # step 1: same iteration, the opponent stays
    assert opp.iteration == 0
    assert all(torch.equal(p, first[n]) for n, p in opp.model.named_parameters())
    opp.after_optimizer_step()  # step 2: p_1 ← q_θ
    student = dict(models.student.named_parameters())
    assert opp.iteration == 1 and opp.steps == 2
    assert all(torch.equal(p, student[n]) for n, p in opp.model.named_parameters())
    assert all(not p.requires_grad for p in opp.model.parameters())


def test_spin_opponent_of_a_lora_student_keeps_only_the_adapters(tok):
    _, models = lora_models(tok)
    opp = get_recipe("spin").build(iteration_steps=1).teacher
    opp.prepare(models)
    weights = opp.state_dict()["weights"]
    assert weights and all(".lora_A." in n or ".lora_B." in n for n in weights)
    with torch.no_grad():
        for p in models.student.parameters():
            if p.requires_grad:
                p.add_(1.0)
    opp.after_optimizer_step()
    student = dict(models.student.named_parameters())
    assert all(torch.equal(p, student[n]) for n, p in opp.model.named_parameters())


def test_spin_resume_with_its_opponent_matches_the_uninterrupted_run(tmp_path, tok):
    data = write_prompts(tmp_path / "p.jsonl", n=12)
    args = ("recipe=spin", "method.args.iteration_steps=2", "method.args.lam=0.5", "train.steps=5")
    full = distill(tiny_cfg(tmp_path, data, *args, name="full"), models=fresh_models(tok), **QUIET)
    cfg = tiny_cfg(tmp_path, data, *args, name="cut")
    distill(cfg, models=fresh_models(tok), stop_after=3, **QUIET)  # mid-iteration 2
    ckpt = tmp_path / "cut" / "checkpoints" / "step_000003"
    state = json.loads((ckpt / "state.json").read_text())["components"]["teacher"]
    assert (state["steps"], state["iteration"]) == (3, 1)
    resumed = distill(
        tiny_cfg(tmp_path, data, *args, name="cut"), models=fresh_models(tok), resume=True, **QUIET
    )
    assert resumed.losses == full.losses and len(set(full.losses)) > 1
    assert [r["spin_iteration"] for r in step_rows(tmp_path / "full")] == [0, 0, 1, 1, 2]
    opp_full = dict(full.method.teacher.model.named_parameters())
    for n, p in resumed.method.teacher.model.named_parameters():
        assert torch.equal(p, opp_full[n]), n


def test_spin_trains_from_the_cli_and_needs_completions(tmp_path):
    dirs = save_tiny_models(tmp_path)
    data = write_prompts(tmp_path / "d.jsonl", n=6)
    args = small_cli_args(tmp_path, dirs, data, "recipe=spin", "method.args.iteration_steps=1")
    res = run_opd(["distill", "--no-report", *args])
    assert res.code == 0, res.err
    steps = step_rows(tmp_path / "run")
    assert len(steps) == 2 and all("spin_margin" in r for r in steps)
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-5  # p_0 = q_θ
    bare = write_prompts(tmp_path / "bare.jsonl", n=6, completions=False)
    res = run_opd(["distill", *small_cli_args(tmp_path / "b", dirs, bare, "recipe=spin")])
    assert_clean_error(res, "bare.jsonl:1", "completion")
