"""Black-box recipes (issue 11 item 5, in part): `orpo_distill` and `ovd`.

The teacher only writes text (or grades with a verbal score); a test teacher whose log-prob
and full-logit calls raise runs both to completion, the held-out evaluation included.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from opd.blackbox import ORPO, OVD, log_odds, orpo_pair_loss, parse_score
from opd.build import Models
from opd.context import StepContext
from opd.errors import ConfigError
from opd.recipes import get_recipe
from opd.sampling import make_rollout
from opd.teachers.base import check_teacher_serves
from opd.train import distill
from opd.types import StudentRows
from tests.helpers import fresh_models, tiny_cfg

F64 = torch.float64


class TextOnlyTeacher:
    """A black-box teacher: it writes (its local model's `generate`), nothing else."""

    provides = frozenset({"text"})

    def __init__(self, model):
        self.model = model

    def logprobs(self, *args, **kwargs):
        raise AssertionError("a black-box teacher was asked for log-probs")

    def rows(self, *args, **kwargs):
        raise AssertionError("a black-box teacher was asked for full logits")

    def describe(self):
        return "text-only test teacher"


def patch_text_only_teacher(monkeypatch) -> None:
    """Make every run built from the CLI wrap its teacher in `TextOnlyTeacher`."""
    import opd.run_setup

    real = opd.run_setup.build_models

    def text_only(cfg):
        m = real(cfg)
        m.teacher = TextOnlyTeacher(m.teacher)
        return m

    monkeypatch.setattr(opd.run_setup, "build_models", text_only)


@pytest.mark.parametrize(
    "recipe, extra, logged",
    [
        ("orpo_distill", (), "orpo_l_or"),
        ("ovd", ("method.args.group_size=2",), "ovd_bad_parses"),
    ],
)
def test_black_box_recipes_never_ask_the_teacher_for_log_probs(
    tmp_path, tok, prompt_file, recipe, extra, logged
):
    m = fresh_models(tok)
    models = Models(TextOnlyTeacher(m.teacher), m.student, tok, m.vocab_size)
    before = [p.detach().clone() for p in m.student.parameters()]
    cfg = tiny_cfg(tmp_path, prompt_file, f"recipe={recipe}", "train.steps=2", *extra)
    res = distill(cfg, models=models)
    assert len(res.losses) == 2 and all(math.isfinite(x) for x in res.losses)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(logged in r for r in steps)
    evals = [r for r in rows if r.get("event") == "eval"]
    assert evals and all(r["heldout_kl"] is None and "heldout_teacher_nll" not in r for r in evals)
    assert all(r["heldout_accuracy"] is not None for r in evals)
    if recipe == "orpo_distill":  # ovd's rewards may tie within a group (zero advantage)
        assert any(not torch.equal(a, b) for a, b in zip(before, m.student.parameters()))


@pytest.mark.parametrize("recipe", ["orpo_distill", "ovd"])
def test_black_box_recipes_refuse_a_teacher_that_cannot_write(tiny_models, recipe):
    class LogprobsOnly:
        provides = frozenset({"token_logprobs", "topk_logprobs"})

        def describe(self):
            return "served test teacher"

    with pytest.raises(ConfigError, match="needs text.*served test teacher"):
        check_teacher_serves(get_recipe(recipe).build(), LogprobsOnly())
    check_teacher_serves(get_recipe(recipe).build(), TextOnlyTeacher(tiny_models[0]))


# ---------------------------------------------------------------- ORPO by hand


def test_orpo_pair_loss_matches_the_formula():
    # P_w = 0.4, P_l = 0.2: log odds ratio = log(0.4/0.6) − log(0.2/0.8) = 0.98083
    lw, ll = torch.tensor([math.log(0.4)], dtype=F64), torch.tensor([math.log(0.2)], dtype=F64)
    loss, l_or = orpo_pair_loss(lw, ll, lam=0.5)
    ratio = math.log(0.4 / 0.6) - math.log(0.2 / 0.8)
    assert ratio == pytest.approx(0.98083, abs=1e-5)
    assert float(l_or) == pytest.approx(math.log1p(math.exp(-ratio)), rel=1e-12)
    assert float(l_or) == pytest.approx(0.3185, abs=1e-4)
    assert float(loss.detach()) == pytest.approx(-math.log(0.4) + 0.5 * float(l_or), rel=1e-12)
    assert float(log_odds(torch.tensor([0.0], dtype=F64))) < 20  # P = 1 clamped: finite


def _orpo_case(tok):
    torch.manual_seed(0)
    prompts = [tok("1+2=").input_ids, tok("3+4=").input_ids] * 2
    comps = [tok(c, add_special_tokens=False).input_ids for c in ("3", "7", "12", "9x")]
    ro = make_rollout(prompts, comps, 0, "paired")
    from dataclasses import replace

    ro = replace(ro, row_writers=("teacher", "teacher", "student", "student"))
    mask_BT = ro.completion_mask_BT.bool()
    V, D = len(tok), 6
    hidden = torch.randn(int(mask_BT.sum()), D, dtype=F64, requires_grad=True)
    head = torch.randn(V, D, dtype=F64)
    rows = StudentRows(hidden, head, ro.completion_ids_BT[mask_BT], mask_BT.nonzero()[:, 0])
    return ro, rows, hidden, head


def test_orpo_signal_values_and_gradient_against_a_float64_hand_computation(tok):
    ro, rows, hidden, head = _orpo_case(tok)
    lam = 0.3
    ctx = StepContext(rollout=ro, chunk_size=2)
    values = ORPO(lam)(rows, None, ctx)
    # by hand: per-token log q, row means, the pair losses
    logp = torch.log_softmax(hidden.detach() @ head.T, -1)
    logq = [float(logp[n, rows.target_ids_N[n]]) for n in range(len(rows.target_ids_N))]
    row_of = rows.row_index_N.tolist()
    mean = [sum(q for q, r in zip(logq, row_of) if r == b) / row_of.count(b) for b in range(4)]

    def odds(lp):
        return lp - math.log(1 - math.exp(lp))

    pair_loss, dmean = [], [0.0] * 4
    for w, lo in ((0, 2), (1, 3)):  # (chosen row, rejected row)
        r = odds(mean[w]) - odds(mean[lo])
        sig_neg = 1 / (1 + math.exp(r))  # σ(−r)
        pair_loss.append(-mean[w] + lam * math.log1p(math.exp(-r)))
        # d/dm_w: −1 − λ·σ(−r)/(1 − P_w);  d/dm_l: +λ·σ(−r)/(1 − P_l)
        dmean[w] = -1 - lam * sig_neg / (1 - math.exp(mean[w]))
        dmean[lo] = lam * sig_neg / (1 - math.exp(mean[lo]))
    pair_of_row = [0, 1, 0, 1]
    want = torch.tensor([pair_loss[pair_of_row[r]] for r in row_of], dtype=F64)
    assert torch.allclose(values, want, rtol=0, atol=1e-12)
    assert ctx.metrics["orpo_nll_chosen"] == pytest.approx(-(mean[0] + mean[1]) / 2, rel=1e-9)
    # the loop's sequence_mean: each row's token mean, averaged over the 4 rows = mean pair loss
    from opd.losses.reduce import reduce

    mask_BT = ro.completion_mask_BT.bool()
    values_BT = torch.zeros(mask_BT.shape, dtype=F64)
    values_BT = values_BT.index_put((mask_BT.nonzero(as_tuple=True)), values)
    loss = reduce("sequence_mean", values_BT, mask_BT.to(F64))
    assert float(loss.detach()) == pytest.approx(sum(pair_loss) / 2, rel=1e-12)
    loss.backward()
    # d loss / d h_n = ½ · dL/dm_row · (1/|y_row|) · (W[y_n] − Σ_v q_v W[v])
    probs = torch.softmax(hidden.detach() @ head.T, -1)
    scale = torch.tensor([0.5 * dmean[r] / row_of.count(r) for r in row_of], dtype=F64)
    grad = scale[:, None] * (head[rows.target_ids_N] - probs @ head)
    assert torch.allclose(hidden.grad, grad, rtol=0, atol=1e-12)


def test_orpo_needs_a_paired_rollout(tok):
    ro, rows, _, _ = _orpo_case(tok)
    from dataclasses import replace

    with pytest.raises(ConfigError, match="paired rollout"):
        ORPO()(rows, None, StepContext(rollout=replace(ro, row_writers=())))


# ---------------------------------------------------------------- OVD's judge


def test_parse_score_takes_the_first_digit():
    assert parse_score("7") == 7
    assert parse_score("score: 3") == 3
    assert parse_score(" 8/9, maybe 2") == 8
    assert parse_score("nine") is None
    assert parse_score("") is None


class CannedJudge:
    """A generation backend that answers each judge prompt with a fixed text, in order."""

    def __init__(self, tok, answers):
        self.tok, self.answers, self.prompts = tok, answers, []

    def generate(self, model, prompts, params, *, pad_id, stop_ids):
        assert params.temperature == 0.0  # greedy
        self.prompts += [self.tok.decode(p) for p in prompts]
        return [self.tok(a, add_special_tokens=False).input_ids for a in self.answers]


def test_ovd_scores_counts_bad_parses_and_gives_them_a_neutral_reward(tok):
    prompts = [tok("1+2=").input_ids] * 2 + [tok("3+4=").input_ids] * 2
    comps = [tok(c, add_special_tokens=False).input_ids for c in ("3", "4", "7", "77")]
    ro = make_rollout(prompts, comps, 0, "student")
    mask_BT = ro.completion_mask_BT.bool()
    torch.manual_seed(0)
    hidden = torch.randn(int(mask_BT.sum()), 6, dtype=F64, requires_grad=True)
    head = torch.randn(len(tok), 6, dtype=F64)
    rows = StudentRows(hidden, head, ro.completion_ids_BT[mask_BT], mask_BT.nonzero()[:, 0])
    judge = CannedJudge(tok, ["7", "score: 3", "nine", ""])
    ctx = StepContext(teacher=object(), backend=judge, tokenizer=tok, rollout=ro, chunk_size=4)
    values = OVD(group_size=2, judge_template="Q {question} A {answer} S:")(rows, None, ctx)
    assert ctx.metrics["ovd_bad_parses"] == 2.0 and ctx.metrics["ovd_score_mean"] == 5.0
    assert ctx.metrics["reward_mean"] == pytest.approx((7 / 9 + 3 / 9 + 0.5 + 0.5) / 4)
    assert "Q 1+2= A 4 S:" in judge.prompts[1] and "Q 3+4= A 77 S:" in judge.prompts[3]
    # group 1: rewards (7/9, 3/9) → A = ±(2/9)/(std + ε), std = (4/9)/√2; group 2: ties → 0
    a = (2 / 9) / ((4 / 9) / math.sqrt(2) + 1e-4)
    want = torch.tensor([-a, a, 0.0, 0.0, 0.0], dtype=F64)  # tokens 3 | 4 | 7 | 7 7
    assert torch.allclose(values, want, rtol=0, atol=1e-12)
    values.sum().backward()
    assert torch.isfinite(hidden.grad).all() and hidden.grad[2:].abs().max() == 0


def test_ovd_judge_template_is_checked():
    with pytest.raises(ConfigError, match="judge_template lacks \\{answer\\}"):
        get_recipe("ovd").build(judge_template="rate {question}")
    with pytest.raises(ConfigError, match="judge_template does not format"):
        get_recipe("ovd").build(judge_template="{question} {answer} {score}")
    assert get_recipe("ovd").build(judge_template="{question}|{answer}").signal.judge_template


# ---------------------------------------------------------------- from the command line


@pytest.mark.parametrize(
    "recipe, extra, logged",
    [
        ("orpo_distill", ("method.args.lam=0.2",), "orpo_log_odds_ratio"),
        ("ovd", ("method.args.group_size=2",), "ovd_bad_parses"),
    ],
)
def test_black_box_recipes_run_from_the_cli(tmp_path, recipe, extra, logged):
    from tests.helpers import run_opd, save_tiny_models, small_cli_args, write_prompts

    dirs = save_tiny_models(tmp_path)
    data = write_prompts(tmp_path / "d.jsonl", n=8)
    args = small_cli_args(tmp_path, dirs, data, f"recipe={recipe}", *extra)
    res = run_opd(["distill", "--no-report", *args])
    assert res.code == 0, res.err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(logged in r for r in steps)


def test_a_bad_judge_template_is_a_clean_cli_error(tmp_path):
    from tests.helpers import (
        assert_clean_error,
        run_opd,
        save_tiny_models,
        small_cli_args,
        write_prompts,
    )

    dirs = save_tiny_models(tmp_path)
    data = write_prompts(tmp_path / "d.jsonl", n=8)
    args = small_cli_args(tmp_path, dirs, data, "recipe=ovd", "method.args.judge_template=x")
    assert_clean_error(run_opd(["distill", *args]), "judge_template", "{question}")
