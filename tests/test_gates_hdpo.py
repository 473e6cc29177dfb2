"""The recipes `gates` (consensus-gated reverse KL to the document-conditioned self) and
`hdpo` (GRPO plus JSD_β from the solution-conditioned self on cliff prompts) (issue 11,
item 4): losses and gradients against float64 hand computations, CLI runs on tiny saved
models, clear errors for rows missing the field."""

from __future__ import annotations

import math

import torch

from opd.context import StepContext
from opd.recipes import get_recipe
from opd.selfdistill.context import teacher_prompt_ids
from opd.step import micro_step
from tests.helpers import (
    assert_clean_error,
    run_opd,
    save_tiny_models,
    small_cli_args,
    write_privileged_prompts,
)
from tests.test_selfdistill import examples
from tests.test_selfdistill_more import completion_logits, f64_models, step_rows

# ---------------------------------------------------------------- gates


def test_consensus_majority_agreement_and_the_task_extractor():
    from opd.selfdistill.gates import answer_extractor, consensus, final_answer
    from opd.tasks import get_task

    assert consensus(["7", "7", "8", None]) == ("7", 0.5)
    assert consensus(["b", "a", "a", "b"]) == ("b", 0.5)  # a tie: the first sampled
    assert consensus([None, None]) == (None, 0.0)
    assert final_answer("  12 ") == "12" and final_answer(" ") is None
    task = get_task("arithmetic")
    extract = answer_extractor(task.verify)
    assert extract is not None and final_answer("so the answer is 12", extract) == "12"
    assert answer_extractor(lambda text, answer: True) is None


GATE_RECORDS = [
    {"prompt": "3+4=", "context": "3+4 is 7"},
    {"prompt": "1+1=", "context": "1+1 is 2"},
]
GATE_SAMPLES = ["7", "7", "7 ", "8", "2", "3", "4", "2"]  # prompt 1: 3/4 agree, prompt 2: 2/4


def gates_step(tok, models, threshold):
    method = get_recipe("gates").build(k=4, threshold=threshold)
    method.teacher.prepare(models)
    exs = examples(tok, GATE_RECORDS)
    comps = [tok(t, add_special_tokens=False).input_ids for t in GATE_SAMPLES]
    seen = []

    def generate(model, prompts):
        seen.append((model, [tok.decode(p) for p in prompts]))
        return comps

    ctx = StepContext(pad_id=0, tokenizer=tok, models=models)
    ctx.generate = generate
    rollout = method.prefixes.rollout(exs, ctx)
    loss, _, _ = micro_step(method, models, rollout, ctx, "cpu")
    return method, exs, comps, rollout, loss, seen


def test_gates_keeps_the_majority_samples_of_prompts_that_pass(tok):
    models = f64_models(tok)
    _, exs, comps, rollout, _, seen = gates_step(tok, models, threshold=0.75)
    (model, prompts) = seen[0]
    assert model is models.student  # the live self writes, shown the document
    assert prompts[:4] == ["3+4=\n\n3+4 is 7"] * 4 and prompts[4:] == ["1+1=\n\n1+1 is 2"] * 4
    kept = rollout.completion_mask_BT.sum(1).tolist()
    assert [n > 0 for n in kept] == [True, True, True, False] + [False] * 4
    assert rollout.info == {"gate_pass_rate": 0.5, "gate_agreement": 0.625, "gate_kept": 3 / 8}
    assert rollout.input_ids_BL[0, : rollout.prompt_len].tolist()[-4:] == list(exs[0].prompt_ids)
    _, _, _, none_kept, loss, _ = gates_step(tok, f64_models(tok), threshold=1.0)
    assert (
        none_kept.num_tokens == 0 and float(loss.detach()) == 0.0
    )  # nothing passes: loss 0, no NaN


def test_gates_loss_and_gradient_by_hand_float64(tok):
    """Token mean over the kept samples of KL(q(·|x, y<t) ‖ p(·|x, document, y<t)), the
    teacher the live student itself (no gradient through it)."""
    models = f64_models(tok)
    _, exs, comps, rollout, loss, _ = gates_step(tok, models, threshold=0.5)
    loss.backward()
    got = {n: p.grad.clone() for n, p in models.student.named_parameters()}
    models.student.zero_grad()

    kept = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 3)]  # prompt 2: "2" twice of 4 (= τ)
    per_token = []
    for b, j in kept:
        ex, y = exs[b], comps[b * 4 + j]
        t_ids = teacher_prompt_ids(ex, GATE_RECORDS[b]["context"], tok)
        with torch.no_grad():
            logp = torch.log_softmax(completion_logits(models.student, t_ids, y), -1)
        logq = torch.log_softmax(completion_logits(models.student, ex.prompt_ids, y), -1)
        per_token.append((logq.exp() * (logq - logp)).sum(-1))
    want = torch.cat(per_token).mean()
    want.backward()
    assert rollout.num_tokens == sum(len(comps[b * 4 + j]) for b, j in kept)
    assert float(want) > 1e-6 and abs(float(loss.detach()) - float(want)) < 1e-10
    for n, p in models.student.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-10), n


def test_gates_trains_from_the_cli_logging_the_pass_rate(tmp_path):
    dirs = save_tiny_models(tmp_path)
    data = write_privileged_prompts(tmp_path / "d.jsonl", n=6)
    args = small_cli_args(tmp_path, dirs, data, "recipe=gates", "method.args.threshold=0.25")
    res = run_opd(["distill", "--no-report", *args])
    assert res.code == 0, res.err
    steps = step_rows(tmp_path / "run")
    assert len(steps) == 2 and all(0.0 <= r["gate_pass_rate"] <= 1.0 for r in steps)
    assert all(r["loss"] == r["loss"] for r in steps)
    bare = write_privileged_prompts(tmp_path / "bare.jsonl", n=6, fields=("solution",))
    res = run_opd(["distill", *small_cli_args(tmp_path / "b", dirs, bare, "recipe=gates")])
    assert_clean_error(res, "bare.jsonl:1", "'context'", "recipe 'gates'")


# ---------------------------------------------------------------- hdpo

REWARD = "tests.test_grpo:digit_reward"  # 1.0 for a completion starting with '1'
HDPO_RECORDS = [{"prompt": "1+0=", "solution": "1"}, {"prompt": "5+5=", "solution": "10"}]
STUDENT_SAMPLES = ["1", "22", "33", "45"]  # group 1: rewards 1, 0; group 2: a cliff (0, 0)
PRIVILEGED_SAMPLES = ["17", "5"]  # the filter keeps "17" (reward 1) and drops "5"


def test_cliff_groups():
    from opd.selfdistill.hdpo import cliff_groups

    assert cliff_groups(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.2]), 2) == [False, True, True]


def hdpo_step(tok, models, coef=0.8, beta=0.3, filter=True):
    method = get_recipe("hdpo").build(
        group_size=2, coef=coef, beta=beta, reward=REWARD, filter=filter
    )
    method.teacher.prepare(models)
    exs = examples(tok, HDPO_RECORDS)
    replies = [STUDENT_SAMPLES, PRIVILEGED_SAMPLES]
    calls = []

    def generate(model, prompts):
        calls.append([tok.decode(p) for p in prompts])
        return [tok(t, add_special_tokens=False).input_ids for t in replies[len(calls) - 1]]

    ctx = StepContext(pad_id=0, tokenizer=tok, models=models, student=models.student)
    ctx.generate = generate
    rollout = method.prefixes.rollout(exs, ctx)
    loss, _, _ = micro_step(method, models, rollout, ctx, "cpu")
    return exs, rollout, loss, calls, ctx


def test_hdpo_rescues_cliff_prompts_with_filtered_privileged_rollouts(tok):
    exs, rollout, _, calls, ctx = hdpo_step(tok, f64_models(tok))
    assert calls[0] == ["1+0=", "1+0=", "5+5=", "5+5="]  # the student, plain prompts
    assert calls[1] == ["5+5=\n\n10"] * 2  # only the cliff prompt, shown its solution
    assert rollout.row_writers == ("student",) * 4 + ("privileged",)
    P = rollout.prompt_len
    last = rollout.input_ids_BL[4]
    assert last[:P][rollout.attention_mask_BL[4, :P].bool()].tolist() == list(exs[1].prompt_ids)
    assert tok.decode(rollout.completion_ids_BT[4][rollout.completion_mask_BT[4].bool()]) == "17"
    assert tok.decode(rollout.teacher_prompts[4]) == "5+5=\n\n10"
    assert rollout.info == {"hdpo_cliff_rate": 0.5, "hdpo_rescued": 0.5}
    assert ctx.metrics["reward_mean"] == 0.25  # the student's rows only


def test_hdpo_loss_and_gradient_by_hand_float64(tok):
    """Token mean of −A_i (student rows, ratio 1) and λ·JSD_β(p_T(·|x, solution), q_θ(·|x))
    on the kept privileged row; value and gradient in float64."""
    coef, beta = 0.8, 0.3
    models = f64_models(tok)
    exs, rollout, loss, _, _ = hdpo_step(tok, models, coef, beta)
    loss.backward()
    got = {n: p.grad.clone() for n, p in models.student.named_parameters()}
    models.student.zero_grad()
    from opd.rl.grpo import EPS

    adv = 0.5 / (math.sqrt(0.5) + EPS)
    rows = [(0, "1", -adv), (0, "22", adv), (1, "33", 0.0), (1, "45", 0.0)]  # loss −A·ρ
    terms = []
    for b, text, neg_adv in rows:
        y = tok(text, add_special_tokens=False).input_ids
        logq = torch.log_softmax(completion_logits(models.student, exs[b].prompt_ids, y), -1)
        lq = logq.gather(1, torch.tensor(y)[:, None])[:, 0]
        terms.append(neg_adv * torch.exp(lq - lq.detach()))
    y = tok("17", add_special_tokens=False).input_ids
    t_ids = teacher_prompt_ids(exs[1], "10", tok)
    with torch.no_grad():
        p = torch.softmax(completion_logits(models.student, t_ids, y), -1)
    q = torch.softmax(completion_logits(models.student, exs[1].prompt_ids, y), -1)
    m = beta * p + (1 - beta) * q
    jsd = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    terms.append(coef * jsd)
    want = torch.cat(terms).mean()
    want.backward()
    assert float(jsd.detach().sum()) > 1e-6
    assert abs(float(loss.detach()) - float(want.detach())) < 1e-10
    for n, p_ in models.student.named_parameters():
        assert torch.allclose(got[n], p_.grad, atol=1e-10), n


def test_hdpo_trains_from_the_cli_and_needs_the_solution(tmp_path):
    dirs = save_tiny_models(tmp_path)
    data = write_privileged_prompts(tmp_path / "d.jsonl", n=6)
    args = ("recipe=hdpo", "method.args.group_size=2", "method.args.filter=false")
    res = run_opd(["distill", "--no-report", *small_cli_args(tmp_path, dirs, data, *args)])
    assert res.code == 0, res.err
    steps = step_rows(tmp_path / "run")
    assert len(steps) == 2 and all("hdpo_cliff_rate" in r and "reward_mean" in r for r in steps)
    assert any(r["hdpo_rescued"] > 0 and r["loss"] > 0 for r in steps)  # unfiltered: distilled
    bare = write_privileged_prompts(tmp_path / "bare.jsonl", n=6, fields=("context",))
    res = run_opd(["distill", *small_cli_args(tmp_path / "b", dirs, bare, "recipe=hdpo")])
    assert_clean_error(res, "bare.jsonl:1", "'solution'", "recipe 'hdpo'")
