"""Recipes `sdft` (top-k JSD_β to the demonstration-conditioned self) and `sdpo` (GRPO plus
λ·KL(q_student ‖ p_EMA-self(·|feedback)), optionally a successful sibling) (issue 11, item 4)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from opd.context import StepContext
from opd.recipes import get_recipe
from opd.rl.parts import Grouped
from opd.selfdistill.context import teacher_prompt_ids
from opd.selfdistill.siblings import SIBLING_HEADER, SiblingPrompts, sibling_index
from opd.step import micro_step
from opd.tiny import tiny_llama
from tests.helpers import (
    assert_clean_error,
    run_opd,
    save_tiny_models,
    small_cli_args,
    write_prompts,
)
from tests.test_selfdistill import Fixed, examples  # shared test doubles

F64 = torch.float64
REWARD = "tests.test_grpo:digit_reward"  # 1.0 for a completion starting with '1'


def f64_models(tok, seed=5):
    student = tiny_llama(len(tok), hidden=24, layers=2, seed=seed).double()
    return type(
        "M", (), {"student": student, "teacher": None, "pad_id": 0, "vocab_size": len(tok)}
    )()


def with_source(method, source):
    """`method` with the innermost prefix source (under the wrappers) replaced by `source`."""

    def swap(part):
        if hasattr(part, "inner"):
            return dataclasses.replace(part, inner=swap(part.inner))
        return source

    return dataclasses.replace(method, prefixes=swap(method.prefixes))


def loss_of(method, models, exs, tok):
    if hasattr(method.teacher, "prepare"):
        method.teacher.prepare(models)
    if hasattr(method.signal, "prepare"):
        method.signal.prepare(models)
    ctx = StepContext(pad_id=0, tokenizer=tok, models=models)
    rollout = method.prefixes.rollout(exs, ctx)
    loss, _, _ = micro_step(method, models, rollout, ctx, "cpu")
    return loss, rollout


def write_rows(path, n=8, fields=("demonstration", "feedback")):
    """`write_prompts` rows with a `demonstration` (the answer) and a `feedback` hint."""
    write_prompts(path, n)
    rows = [json.loads(x) for x in Path(path).read_text().splitlines()]

    def extra(r):
        return {"demonstration": f"={r['answer']}", "feedback": "check the sum"}

    Path(path).write_text(
        "".join(json.dumps({**r, **{k: extra(r)[k] for k in fields}}) + "\n" for r in rows)
    )
    return path


# ---------------------------------------------------------------- sdft


def test_sdft_with_empty_demonstration_is_exactly_zero(tok):
    """An empty demonstration leaves the teacher's prompt unchanged; the frozen (= initial)
    and EMA (before any update) views are the student itself: zero loss and gradient."""
    for view in ("frozen", "ema"):
        models = f64_models(tok)
        recs = [{"prompt": "1+2=", "demonstration": ""}, {"prompt": "3+3=", "demonstration": ""}]
        method = with_source(get_recipe("sdft").build(k=4, teacher=view), Fixed([[5, 6, 7], [8]]))
        loss, _ = loss_of(method, models, examples(tok, recs), tok)
        loss.backward()
        assert abs(float(loss.detach())) < 1e-12, view
        grads = [p.grad for p in models.student.parameters() if p.grad is not None]
        assert grads and max(float(g.abs().max()) for g in grads) < 1e-12


def test_sdft_loss_by_hand_float64(tok):
    """Top-k + tail JSD_β between the student on (x + y) and itself on (teacher prompt + y)."""
    k, beta = 3, 0.3
    models = f64_models(tok)
    (ex,) = examples(tok, [{"prompt": "2+5=", "demonstration": "=7"}])
    y = tok("7x", add_special_tokens=False).input_ids
    method = with_source(get_recipe("sdft").build(k=k, beta=beta, teacher="frozen"), Fixed([y]))
    loss, _ = loss_of(method, models, [ex], tok)
    t_ids = list(teacher_prompt_ids(ex, "=7", tok, method.prefixes.template))
    assert "An example of a good response" in tok.decode(t_ids)
    with torch.no_grad():
        s_logits = models.student(torch.tensor([list(ex.prompt_ids) + y])).logits[0]
        t_logits = models.student(torch.tensor([t_ids + y])).logits[0]
    P, Pt, T = len(ex.prompt_ids), len(t_ids), len(y)
    q_TV = torch.softmax(s_logits[P - 1 : P - 1 + T], -1)
    p_TV = torch.softmax(t_logits[Pt - 1 : Pt - 1 + T], -1)
    ids_TK = p_TV.topk(k, dim=-1).indices
    p_hat = torch.cat([p_TV.gather(1, ids_TK), 1 - p_TV.gather(1, ids_TK).sum(-1, True)], -1)
    q_hat = torch.cat([q_TV.gather(1, ids_TK), 1 - q_TV.gather(1, ids_TK).sum(-1, True)], -1)
    m = beta * p_hat + (1 - beta) * q_hat
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    want = (beta * kl(p_hat, m) + (1 - beta) * kl(q_hat, m)).mean()
    assert float(want) > 1e-6
    assert abs(float(loss.detach()) - float(want)) < 1e-10


# ---------------------------------------------------------------- sdpo

G = 2
COMPLETIONS = ("1", "22", "13", "456")  # rewards 1, 0 | 1, 0 under digit_reward
RECORDS = [{"prompt": "1+1=", "feedback": "think"}, {"prompt": "2+2=", "feedback": "no"}]


def _sdpo_vs_grpo(tok, coef):
    models = f64_models(tok)
    exs = examples(tok, RECORDS)
    comps = [tok(c, add_special_tokens=False).input_ids for c in COMPLETIONS]
    sdpo = get_recipe("sdpo").build(group_size=G, coef=coef, reward=REWARD)
    sdpo = with_source(sdpo, Fixed(comps))
    loss_sdpo, rollout = loss_of(sdpo, models, exs, tok)
    grpo = get_recipe("grpo").build(group_size=G, reward=REWARD)
    ctx = StepContext(pad_id=0, tokenizer=tok, models=models)
    loss_grpo, _, _ = micro_step(grpo, models, rollout, ctx, "cpu")
    return models, exs, comps, loss_sdpo, loss_grpo


def test_sdpo_with_coefficient_zero_is_exactly_grpo(tok):
    _, _, _, loss_sdpo, loss_grpo = _sdpo_vs_grpo(tok, 0.0)
    assert float(loss_grpo.detach()) != 0.0
    assert torch.equal(loss_sdpo, loss_grpo)


def test_sdpo_adds_coef_times_the_reverse_kl_by_hand(tok):
    coef = 0.7
    models, exs, comps, loss_sdpo, loss_grpo = _sdpo_vs_grpo(tok, coef)
    per_token = []
    with torch.no_grad():
        for b, y in enumerate(comps):
            ex = exs[b // G]
            t_ids = list(teacher_prompt_ids(ex, ex.privileged["feedback"], tok))
            s_logits = models.student(torch.tensor([list(ex.prompt_ids) + y])).logits[0]
            t_logits = models.student(torch.tensor([t_ids + y])).logits[0]
            P, Pt, T = len(ex.prompt_ids), len(t_ids), len(y)
            logq = torch.log_softmax(s_logits[P - 1 : P - 1 + T], -1)
            logp = torch.log_softmax(t_logits[Pt - 1 : Pt - 1 + T], -1)
            per_token.append((logq.exp() * (logq - logp)).sum(-1))
    kl = torch.cat(per_token).mean()  # token mean over the 6 completion tokens
    assert float(kl) > 1e-6
    assert abs(float((loss_sdpo - loss_grpo).detach()) - coef * float(kl)) < 1e-10


def test_sibling_index_and_teacher_prompts(tok):
    assert sibling_index([1.0, 0.0, 0.0, 0.0, 1.0, 1.0], 3) == [None, 0, 0, 4, 5, 4]
    exs = examples(tok, RECORDS)
    comps = [tok(c, add_special_tokens=False).input_ids for c in COMPLETIONS]
    source = SiblingPrompts(Grouped(Fixed(comps), G), G, field="feedback", reward=REWARD)
    rollout = source.rollout(exs, StepContext(pad_id=0, tokenizer=tok))
    got = [tok.decode(ids) for ids in rollout.teacher_prompts]
    # group 1: "1" (reward 1) and "22" (0); group 2: "13" (1) and "456" (0)
    assert SIBLING_HEADER + "1" not in got[0] and got[0].endswith("think")
    assert got[1].endswith("think\n\n" + SIBLING_HEADER + "1")
    assert got[3].endswith("no\n\n" + SIBLING_HEADER + "13")
    assert [list(ids) for ids in rollout.teacher_prompts][1] == list(
        teacher_prompt_ids(exs[0], "think\n\n" + SIBLING_HEADER + "1", tok)
    )


def test_sibling_needs_a_group():
    from opd.errors import ConfigError

    with pytest.raises(ConfigError, match="group_size >= 2"):
        get_recipe("sdpo").build(sibling=True, group_size=1)


# ---------------------------------------------------------------- from the CLI


@pytest.mark.parametrize(
    "args",
    [
        ("recipe=sdft", "method.args.k=4"),
        (
            "recipe=sdpo",
            "method.args.group_size=2",
            "method.args.coef=0.5",
            "method.args.kl_coef=0.1",
        ),
        ("recipe=sdpo", "method.args.group_size=2", "method.args.sibling=true"),
    ],
)
def test_recipe_runs_from_the_cli(tmp_path, args):
    dirs = save_tiny_models(tmp_path)
    data = write_rows(tmp_path / "d.jsonl")
    res = run_opd(["distill", "--no-report", *small_cli_args(tmp_path, dirs, data, *args)])
    assert res.code == 0, res.err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["loss"] == r["loss"] for r in steps)  # finite, not NaN
    if "recipe=sdpo" in args:
        assert all("reward_mean" in r for r in steps)
    assert (tmp_path / "run" / "student").is_dir()


@pytest.mark.parametrize(
    "recipe,missing,present",
    [("sdft", "demonstration", "feedback"), ("sdpo", "feedback", "demonstration")],
)
def test_cli_row_missing_the_field_is_one_clear_error(tmp_path, recipe, missing, present):
    dirs = save_tiny_models(tmp_path)
    data = write_rows(tmp_path / "d.jsonl", fields=(present,))
    res = run_opd(["distill", *small_cli_args(tmp_path, dirs, data, f"recipe={recipe}")])
    assert_clean_error(res, "d.jsonl:1", f"'{missing}'", f"recipe '{recipe}'")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sdpo_resume_with_its_ema_teacher_matches_the_uninterrupted_run(tmp_path, tok):
    from opd.train import distill
    from tests.helpers import fresh_models, tiny_cfg

    quiet = dict(evaluate=False, log=lambda *_: None)
    data = write_rows(tmp_path / "p.jsonl", n=12)
    args = (
        "recipe=sdpo",
        "method.args.group_size=2",
        "method.args.ema_decay=0.5",
        "method.args.sibling=true",
        "train.steps=4",
    )
    full = distill(tiny_cfg(tmp_path, data, *args, name="full"), models=fresh_models(tok), **quiet)
    distill(
        tiny_cfg(tmp_path, data, *args, name="cut"), models=fresh_models(tok), stop_after=2, **quiet
    )
    cfg = tiny_cfg(tmp_path, data, *args, name="cut")
    resumed = distill(cfg, models=fresh_models(tok), resume=True, **quiet)
    assert resumed.losses == full.losses and len(set(full.losses)) > 1
    assert resumed.method.teacher.teacher.updates == full.method.teacher.teacher.updates == 4
    ema_full = dict(full.method.teacher.teacher.model.named_parameters())
    for n, p in resumed.method.teacher.teacher.model.named_parameters():
        assert torch.equal(p, ema_full[n]), n


@pytest.mark.slow
def test_sdpo_on_the_embedded_pair_resumes_exactly(tmp_path):
    """A few steps of `sdpo` (EMA self-teacher shown feedback and a successful sibling) on the
    embedded SmolLM2 student from the CLI; stopped after step 1 and resumed, it logs the
    uninterrupted run's losses."""
    from opd.tasks.shipped import load_shipped

    data = tmp_path / "arith.jsonl"
    with open(data, "w") as fh:
        for row in load_shipped("arithmetic", "train")[:8]:
            fh.write(json.dumps({**row, "feedback": "Check the arithmetic."}) + "\n")
    common = [
        "recipe=sdpo",
        "method.args.group_size=2",
        "method.args.sibling=true",
        "method.args.coef=0.5",
        "model.teacher=self",
        "model.student=embedded",
        "model.student_prune_to=4",  # a quicker 4-layer copy: the test is about resume
        f"data.train={data}",
        f"data.eval={data}",
        "data.eval_count=2",
        "train.steps=2",
        "train.batch_size=2",
        "sampling.max_new_tokens=6",
        "train.progress=false",
        "--no-report",
    ]

    def rows(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if '"loss"' in x]

    full, cut = tmp_path / "full", tmp_path / "cut"
    res = run_opd(["distill", *common, f"output_dir={full}"])
    assert res.code == 0, res.err
    res = run_opd(["distill", *common, f"output_dir={cut}", "--stop-after", "1"])
    assert res.code == 0, res.err
    assert (cut / "checkpoints" / "step_000001" / "components.safetensors").is_file()
    res = run_opd(["distill", "--resume", str(cut), "--no-report"])
    assert res.code == 0, res.err
    assert [r["loss"] for r in rows(cut)] == [r["loss"] for r in rows(full)]
    assert len(rows(full)) == 2 and all("reward_mean" in r for r in rows(full))
