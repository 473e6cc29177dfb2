"""Self-teachers (frozen / live / ema), the privileged teacher prompt, and the opsd / opcd
recipes (issue 11, items 1, 2 and 4)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from opd.context import StepContext
from opd.data.encode import encode_rows
from opd.data.rows import parse_row
from opd.errors import DataError
from opd.recipes import get_recipe
from opd.sampling.sources import make_rollout
from opd.selfdistill import PrivilegedPrompts, SelfAccess, SelfTeacher, teacher_view
from opd.selfdistill.context import teacher_prompt_ids
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

QUIET = dict(evaluate=False, log=lambda *_: None)


def examples(tok, records, chat=False):
    rows = [parse_row(r, f"mem:{i + 1}") for i, r in enumerate(records)]
    return encode_rows(rows, tok, use_chat_template=chat).examples


class Fixed:
    """A prefix source that returns the given completions (no sampling)."""

    needs_completions = needs_teacher_model = False

    def __init__(self, completions):
        self.completions = completions

    def rollout(self, exs, ctx):
        prompts = [e.prompt_ids for e in exs]
        return make_rollout(prompts, self.completions, ctx.pad_id, "student")

    def describe(self):
        return "fixed"


# ---------------------------------------------------------------- the teacher's prompt


def test_teacher_prompt_adds_the_field_by_the_template(tok):
    (ex,) = examples(tok, [{"prompt": "3+4=", "solution": "7"}])
    assert ex.privileged == {"solution": "7"}
    ids = teacher_prompt_ids(ex, "7", tok)
    assert ids == tuple(tok("3+4=\n\n7", add_special_tokens=True).input_ids)
    assert tok.decode(teacher_prompt_ids(ex, "7", tok, "{context} {prompt}")).endswith("7 3+4=")
    assert teacher_prompt_ids(ex, "", tok) == ex.prompt_ids  # empty context: the same prompt


def test_teacher_prompt_is_chat_aware(tok):
    record = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "1+1="},
        ],
        "solution": "2",
    }
    (ex,) = examples(tok, [record], chat=True)
    text = tok.decode(teacher_prompt_ids(ex, "2", tok))
    want = tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1=\n\n2"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == want  # inside the last user turn, before the generation prompt


def test_missing_field_is_a_data_error_naming_row_and_field(tok):
    exs = examples(tok, [{"prompt": "1+1=", "solution": "2"}, {"prompt": "2+2="}])
    source = PrivilegedPrompts(Fixed([[1], [1]]), field="solution", who="recipe 'opsd'")
    with pytest.raises(DataError, match=r"mem:2: row has no field 'solution'.*recipe 'opsd'"):
        source.check_data(exs)


def test_bad_privileged_field_type_is_a_data_error():
    with pytest.raises(DataError, match="mem:1: field 'context' must be a string"):
        parse_row({"prompt": "x", "context": ["a"]}, "mem:1")


def test_teacher_view_aligns_completions_and_counts_the_same_tokens(tok):
    recs = [{"prompt": "1+1=", "solution": "2"}, {"prompt": "12+13=", "solution": "twenty-five"}]
    exs = examples(tok, recs)
    comps = [
        tok("2x", add_special_tokens=False).input_ids,
        tok("25", add_special_tokens=False).input_ids[:1],
    ]
    ctx = StepContext(pad_id=0, tokenizer=tok)
    rollout = PrivilegedPrompts(Fixed(comps), field="solution").rollout(exs, ctx)
    view = teacher_view(rollout, pad_id=0)
    assert view.prompt_len > rollout.prompt_len
    assert torch.equal(view.completion_ids_BT, rollout.completion_ids_BT)
    assert torch.equal(view.completion_mask_BT, rollout.completion_mask_BT)
    # each row's teacher prompt, unpadded, followed by the same completion
    for b, ex in enumerate(exs):
        row = view.input_ids_BL[b][view.attention_mask_BL[b].bool()].tolist()
        assert row == list(teacher_prompt_ids(ex, recs[b]["solution"], tok)) + comps[b]


# ---------------------------------------------------------------- self-teachers


def _models(tok):
    return fresh_models(tok)


def test_live_teacher_with_empty_context_gives_zero_loss_and_gradient(tok):
    models = _models(tok)
    exs = examples(tok, [{"prompt": "1+2=", "solution": ""}, {"prompt": "3+3=", "solution": ""}])
    method = get_recipe("opsd").build(teacher="live")
    method = dataclasses.replace(
        method, prefixes=PrivilegedPrompts(Fixed([[5, 6, 7], [8]]), field="solution")
    )
    method.teacher.prepare(models)
    ctx = StepContext(pad_id=models.pad_id, tokenizer=tok, models=models)
    rollout = method.prefixes.rollout(exs, ctx)
    loss, _kl, _ = micro_step(method, models, rollout, ctx, torch.device("cpu"))
    loss.backward()
    assert float(loss.detach()) == 0.0
    grads = [p.grad for p in models.student.parameters() if p.grad is not None]
    assert grads and all(float(g.abs().max()) == 0.0 for g in grads)


def test_live_teacher_with_a_solution_gives_a_positive_loss(tok):
    models = _models(tok)
    exs = examples(tok, [{"prompt": "1+2=", "solution": "3"}])
    method = get_recipe("opsd").build(teacher="live")
    method = dataclasses.replace(
        method, prefixes=PrivilegedPrompts(Fixed([[5, 6]]), field="solution")
    )
    method.teacher.prepare(models)
    ctx = StepContext(pad_id=models.pad_id, tokenizer=tok, models=models)
    loss, _, _ = micro_step(method, models, method.prefixes.rollout(exs, ctx), ctx, "cpu")
    assert float(loss.detach()) > 1e-6


def test_ema_update_arithmetic_float64(tok):
    student = tiny_llama(len(tok), hidden=16, layers=1, seed=3).double()
    models = type("M", (), {"student": student, "pad_id": 0})()
    teacher = SelfTeacher("ema", decay=0.75)
    teacher.prepare(models)
    start = {n: p.detach().clone() for n, p in teacher.model.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.after_optimizer_step()
    for n, p in teacher.model.named_parameters():
        assert torch.equal(p, 0.75 * start[n] + 0.25 * (start[n] + 1.0)), n  # = θ0 + 0.25
    teacher.after_optimizer_step()
    for n, p in teacher.model.named_parameters():
        want = 0.75 * (start[n] + 0.25) + 0.25 * (start[n] + 1.0)
        assert torch.allclose(p, want, rtol=0, atol=1e-15), n
    assert teacher.updates == 2
    assert all(not p.requires_grad for p in teacher.model.parameters())


def test_frozen_teacher_keeps_the_initial_student_and_live_follows(tok):
    models = _models(tok)
    frozen, live = SelfTeacher("frozen"), SelfTeacher("live")
    frozen.prepare(models), live.prepare(models)
    first = copy.deepcopy(dict(frozen.model.named_parameters()))
    with torch.no_grad():
        for p in models.student.parameters():
            p.mul_(2.0)
    frozen.after_optimizer_step()
    assert all(torch.equal(p, first[n]) for n, p in frozen.model.named_parameters())
    assert live.model is models.student
    assert SelfAccess("live").needs == frozenset()  # the external teacher is never asked


def test_resume_with_an_ema_teacher_matches_the_uninterrupted_run(tmp_path, tok):
    data = write_privileged_prompts(tmp_path / "p.jsonl", n=12)
    args = ("recipe=opsd", "method.args.teacher=ema", "method.args.ema_decay=0.5", "train.steps=4")
    full = distill(tiny_cfg(tmp_path, data, *args, name="full"), models=fresh_models(tok), **QUIET)
    cfg = tiny_cfg(tmp_path, data, *args, name="cut")
    distill(cfg, models=fresh_models(tok), stop_after=2, **QUIET)
    ckpt = tmp_path / "cut" / "checkpoints" / "step_000002"
    assert (ckpt / "components.safetensors").is_file()
    state = json.loads((ckpt / "state.json").read_text())
    assert state["components"]["teacher"]["updates"] == 2
    cfg = tiny_cfg(tmp_path, data, *args, name="cut")
    resumed = distill(cfg, models=fresh_models(tok), resume=True, **QUIET)
    assert resumed.losses == full.losses
    assert len(set(full.losses)) > 1 and all(x > 0 for x in full.losses)
    ema_full = dict(full.method.teacher.teacher.model.named_parameters())
    for n, p in resumed.method.teacher.teacher.model.named_parameters():
        assert torch.equal(p, ema_full[n]), n


# ---------------------------------------------------------------- recipes from the CLI


@pytest.mark.parametrize("recipe", ["opsd", "opcd", "opsdc"])
def test_recipe_runs_from_the_cli(tmp_path, recipe):
    dirs = save_tiny_models(tmp_path)
    data = write_privileged_prompts(tmp_path / "d.jsonl", n=8)
    res = run_opd(
        ["distill", "--no-report", *small_cli_args(tmp_path, dirs, data, f"recipe={recipe}")]
    )
    assert res.code == 0, res.err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert (tmp_path / "run" / "student").is_dir()


def test_cli_missing_solution_field_is_one_clear_error(tmp_path):
    dirs = save_tiny_models(tmp_path)
    data = write_prompts(tmp_path / "d.jsonl", n=8)
    res = run_opd(["distill", *small_cli_args(tmp_path, dirs, data, "recipe=opsd")])
    assert_clean_error(res, "d.jsonl:1", "'solution'", "recipe 'opsd'")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_opcd_topk_and_clipped_opsd_build():
    m = get_recipe("opcd").build(k=4)
    assert "top-4" in m.describe() and "self-teacher" in m.describe()
    m = get_recipe("opsd").build(clip=0.1)
    assert "min(generalized_jsd(beta=0.5), 0.1)" in m.describe()


def _hand_loss(name, q_TV, p_TV, beta=0.5, clip=0.0):
    """Token mean of the divergence between q (student) and p (teacher), by formula."""
    if name == "reverse_kl":
        per_T = (q_TV * (q_TV.log() - p_TV.log())).sum(-1)
    else:  # generalized JSD: β·KL(p ‖ m) + (1 − β)·KL(q ‖ m), m = β·p + (1 − β)·q
        m_TV = beta * p_TV + (1 - beta) * q_TV
        kl_pm = (p_TV * (p_TV.log() - m_TV.log())).sum(-1)
        kl_qm = (q_TV * (q_TV.log() - m_TV.log())).sum(-1)
        per_T = beta * kl_pm + (1 - beta) * kl_qm
    return (per_T.clamp(max=clip) if clip else per_T).mean()


@pytest.mark.parametrize(
    "recipe,args,record,divergence",
    [
        ("opsd", {"beta": 0.3}, {"prompt": "2+5=", "solution": "7"}, "jsd"),
        ("opsd", {"clip": 0.002}, {"prompt": "2+5=", "solution": "7"}, "jsd"),
        ("opcd", {}, {"prompt": "2+5=", "context": "add"}, "reverse_kl"),
        ("opsdc", {"instruction": "short"}, {"prompt": "2+5="}, "reverse_kl"),
    ],
)
def test_self_distillation_loss_by_hand_float64(tok, recipe, args, record, divergence):
    """One row (no padding): the loop's loss equals the divergence computed by hand between
    the initial student on (prompt + y) and on (teacher prompt + y)."""
    student = tiny_llama(len(tok), hidden=24, layers=2, seed=5).double()
    models = type(
        "M", (), {"student": student, "teacher": None, "pad_id": 0, "vocab_size": len(tok)}
    )()
    (ex,) = examples(tok, [record])
    y = tok("7x", add_special_tokens=False).input_ids
    method = get_recipe(recipe).build(**args)
    inner = method.prefixes
    method = dataclasses.replace(method, prefixes=dataclasses.replace(inner, inner=Fixed([y])))
    method.teacher.prepare(models)
    ctx = StepContext(pad_id=0, tokenizer=tok, models=models)
    loss, _, _ = micro_step(method, models, method.prefixes.rollout([ex], ctx), ctx, "cpu")
    text = record.get("solution") or record.get("context") or args["instruction"]
    t_ids = list(teacher_prompt_ids(ex, text, tok))
    assert len(t_ids) > len(ex.prompt_ids)
    with torch.no_grad():
        s_logits = student(torch.tensor([list(ex.prompt_ids) + y])).logits[0]
        t_logits = student(torch.tensor([t_ids + y])).logits[0]
    P, Pt, T = len(ex.prompt_ids), len(t_ids), len(y)
    q_TV = torch.softmax(s_logits[P - 1 : P - 1 + T], -1)
    p_TV = torch.softmax(t_logits[Pt - 1 : Pt - 1 + T], -1)
    want = _hand_loss(divergence, q_TV, p_TV, args.get("beta", 0.5), args.get("clip", 0.0))
    assert float(want) > 1e-6
    assert abs(float(loss.detach()) - float(want)) < 1e-10


@pytest.mark.slow
def test_opsd_on_the_embedded_pair_resumes_exactly(tmp_path):
    """A few steps of `opsd` (EMA self-teacher) on a 4-layer copy of the embedded SmolLM2, from
    the CLI; stopped after step 1 and resumed, it logs the uninterrupted run's losses."""
    from opd.tasks.shipped import load_shipped

    data = tmp_path / "arith.jsonl"
    with open(data, "w") as fh:
        for row in load_shipped("arithmetic", "train")[:8]:
            fh.write(json.dumps({**row, "solution": row["completion"]}) + "\n")
    common = [
        "recipe=opsd",
        "method.args.teacher=ema",
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

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if '"loss"' in x]

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_opd(["distill", *common, f"output_dir={full}"]).code == 0
    res = run_opd(["distill", *common, f"output_dir={cut}", "--stop-after", "1"])
    assert res.code == 0, res.err
    assert (cut / "checkpoints" / "step_000001" / "components.safetensors").is_file()
    res = run_opd(["distill", "--resume", str(cut), "--no-report"])
    assert res.code == 0, res.err
    assert losses(cut) == losses(full) and len(losses(full)) == 2
    assert all(x > 0 for x in losses(full))


def test_model_teacher_self_loads_no_teacher_and_refuses_other_recipes(tmp_path):
    dirs = save_tiny_models(tmp_path)
    data = write_privileged_prompts(tmp_path / "d.jsonl", n=8)
    args = small_cli_args(
        tmp_path, dirs, data, "recipe=opsd", "model.teacher=self", "train.sample_every=1"
    )
    res = run_opd(["distill", *args])
    assert res.code == 0, res.err
    assert "teacher: self" in res.out
    samples = [
        json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().split("\n") if x
    ]
    assert samples and all(r["teacher"] is None for r in samples)  # no stale "teacher" column
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["kl_before"] == 0.0  # the teacher is the student
    other = small_cli_args(tmp_path, dirs, data, "recipe=gkd", "model.teacher=self")
    other.append(f"output_dir={tmp_path / 'gkd'}")
    assert_clean_error(run_opd(["distill", *other]), "model.teacher=self", "'gkd'", "opsd")
    assert not (tmp_path / "gkd").exists()
    alone = [a for a in other if not a.startswith("model.student=")] + ["recipe=opsd"]
    assert_clean_error(run_opd(["distill", *alone]), "model.teacher=self", "model.student")


def test_a_checkpoint_missing_its_ema_tensors_is_skipped_for_the_older_one(tmp_path, tok):
    data = write_privileged_prompts(tmp_path / "p.jsonl", n=8)
    args = ("recipe=opsd", "method.args.teacher=ema", "train.steps=3", "train.checkpoint_every=1")
    cfg = tiny_cfg(tmp_path, data, *args, name="r")
    distill(cfg, models=fresh_models(tok), stop_after=2, **QUIET)
    (tmp_path / "r" / "checkpoints" / "step_000002" / "components.safetensors").unlink()
    said = []
    cfg = tiny_cfg(tmp_path, data, *args, name="r")
    res = distill(cfg, models=fresh_models(tok), resume=True, evaluate=False, log=said.append)
    assert any("step_000002" in s and "components.safetensors lacks" in s for s in said), said
    assert any("resumed from" in s and "step_000001" in s for s in said)
    assert res.method.teacher.teacher.updates == 3  # step 1's EMA state, then steps 2 and 3


def test_privileged_prompts_follow_grouped_rows(tok):
    from opd.rl.parts import Grouped

    class Echo(Fixed):
        def rollout(self, exs, ctx):
            return make_rollout([e.prompt_ids for e in exs], [[5]] * len(exs), 0, "student")

    exs = examples(tok, [{"prompt": "1+1=", "solution": "2"}, {"prompt": "3+3=", "solution": "6"}])
    source = PrivilegedPrompts(Grouped(Echo([]), 3), field="solution")
    rollout = source.rollout(exs, StepContext(pad_id=0, tokenizer=tok))
    assert rollout.input_ids_BL.shape[0] == 6
    want = [teacher_prompt_ids(exs[b // 3], "26"[b // 3], tok) for b in range(6)]
    assert list(rollout.teacher_prompts) == want
