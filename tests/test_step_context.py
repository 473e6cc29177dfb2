"""One `StepContext` for every part, and the numbers parts report for the step row.

The step row of metrics.jsonl keeps the keys and values it had when `RewardWeighted` wrote
`reward_mean` into `rollout.info`: the keys below were read from a run of the code before
the change, and `reward_mean` equals a hand computation from the verifier's answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from opd.context import StepContext
from opd.logs import read_metrics
from opd.method import Method
from opd.parts import LogsMetrics
from opd.recipes import get_recipe
from opd.sampling import student
from opd.signals import ByProgress, Divergence, RewardWeighted, logged_names
from opd.train import distill
from tests.helpers import fresh_models, tiny_cfg

# The keys of a step row before this change (read from a `staged` run of commit fc21604).
ROW_KEYS = {
    "step",
    "loss",
    "teacher_kl",
    "completion_length",
    "tokens",
    "tokens_per_s",
    "grad_norm",
    "lr",
    "seconds",
}


def test_progress_is_step_over_total_steps_clipped_to_one():
    ctx = StepContext(total_steps=4)
    assert [StepContext(step=s, total_steps=4).progress for s in (0, 1, 4, 9)] == [
        0.0,
        0.25,
        1.0,
        1.0,
    ]
    assert StepContext(total_steps=0).progress == 0.0
    ctx.log("x", 2)
    ctx.log("x", 3)  # a second report in the same micro-batch replaces the first
    assert ctx.metrics == {"x": 3.0} and isinstance(ctx.metrics["x"], float)


def test_staged_run_logs_reward_mean_averaged_over_micro_batches(
    tmp_path, prompt_file, tok, monkeypatch
):
    # A verifier that accepts calls 0, 1, 2 and 4: micro-batch 1 (rows 0–3) has mean
    # reward 3/4, micro-batch 2 (rows 4–7) 1/4; the step row holds their mean, 1/2.
    calls = []

    def verify(text, answer):
        calls.append(answer)
        return len(calls) - 1 in (0, 1, 2, 4)

    monkeypatch.setattr("opd.run_setup.generic_verify", verify)  # the loop's default verifier
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=3", "train.grad_accum=2")
    # progress 0, 1/3, 2/3: forward KL, reverse KL, then RewardWeighted at the last step
    method = get_recipe("staged").build(warmup=0.3, on_policy=0.6)
    res = distill(cfg, models=fresh_models(tok), method=method, evaluate=False, log=lambda *_: 0)
    rows = read_metrics(res.run_dir / "metrics.jsonl")
    assert [set(r) for r in rows] == [ROW_KEYS, ROW_KEYS, ROW_KEYS | {"reward_mean"}]
    assert rows[2]["reward_mean"] == 0.5
    assert len(calls) == 8 and all(a.isdigit() for a in calls)  # every row's answer
    assert logged_names(method.signal) == {"reward_mean"} == RewardWeighted.logs
    assert isinstance(RewardWeighted(), LogsMetrics)
    assert not isinstance(Divergence(), LogsMetrics)


@dataclass(frozen=True)
class _Seen:
    """A source and a signal that record the context they are given."""

    seen: list
    logs = frozenset({"calls"})

    # as a prefix source
    needs_completions = False
    needs_teacher_model = False

    def rollout(self, examples, ctx):
        ro = student().rollout(examples, ctx)
        self.seen.append(("source", ctx, ctx.step, ctx.rollout, ro))
        return ro

    # as a signal
    requires = frozenset({"full_logits"})

    def __call__(self, student_rows, teacher, ctx):
        self.seen.append(("signal", ctx, ctx.step, ctx.rollout, None))
        ctx.log("calls", len(self.seen))
        return Divergence("reverse_kl")(student_rows, teacher, ctx)

    def describe(self) -> str:
        return "records its context"


def test_sources_and_signals_share_one_context_that_the_loop_advances(tmp_path, prompt_file, tok):
    seen: list = []
    part = _Seen(seen)
    method = Method(prefixes=part, signal=ByProgress(((1.0, part),)))
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=2", "train.chunk_size=3")
    res = distill(cfg, models=fresh_models(tok), method=method, evaluate=False, log=lambda *_: 0)
    assert [(who, step) for who, _, step, _, _ in seen] == [
        ("source", 0),
        ("signal", 0),
        ("source", 1),
        ("signal", 1),
    ]
    ctx = seen[0][1]
    assert all(c is ctx for _, c, _, _, _ in seen)  # one object for the whole run
    assert ctx.total_steps == 2 and ctx.chunk_size == 3 and ctx.models is not None
    assert ctx.tokenizer is tok and ctx.verify is not None
    assert seen[0][3] is None and seen[2][3] is None  # no rollout while sources write
    assert seen[1][3] is seen[0][4] and seen[3][3] is seen[2][4]  # the signal's rollout
    rows = read_metrics(res.run_dir / "metrics.jsonl")
    assert [r["calls"] for r in rows] == [2.0, 4.0]
    assert all(not r.info for _, _, _, _, r in seen if r is not None)


@pytest.mark.parametrize("old", ["RolloutContext", "SignalContext"])
def test_the_two_old_contexts_are_gone(old):
    import opd.sampling
    import opd.signals

    assert not hasattr(opd.sampling, old) and not hasattr(opd.signals, old)
