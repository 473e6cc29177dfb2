"""GATES' consensus gate: the context-conditioned self writes k samples per prompt; a prompt
passes when their final answers agree, and only the agreeing samples are distilled.

Stein, Huang & Goldstein, "GATES: Self-Distillation under Privileged Context with Consensus
Gating", 2026 (arXiv 2602.20574). For example b the self-teacher (the tutor) sees the
prompt with the row's document (`field`, default `context`) added by `template`
(`opd.selfdistill.context`) and samples y_b1 .. y_bk. With a_bj the final answer of y_bj
(the task's `extract_answer` when the run has a task, else the stripped completion text; a
sample with no extractable answer votes for nothing) and m_b the majority answer (ties: the
one sampled first),

    agreement_b = |{j : a_bj = m_b}| / k,      pass_b = agreement_b ≥ τ     (τ = `threshold`)

Row (b, j) of the rollout is the student's prompt x_b followed by y_bj; its tokens count only
when pass_b and a_bj = m_b (the gated-out rows keep no token, so they add nothing to the
loss or to its normaliser). Every row's teacher prompt is the document-conditioned prompt,
so the signal compares q_θ(·|x, y<t) with p_T(·|x, document, y<t) on those tokens.

Logged per step (`rollout.info`): `gate_pass_rate` (share of prompts that pass),
`gate_agreement` (mean agreement_b) and `gate_kept` (share of the B·k samples kept).
No ground truth is read: the gate needs only the samples.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from opd.errors import ConfigError
from opd.sampling.sources import answers_of, make_rollout, prompts_of
from opd.selfdistill.context import (
    TEMPLATE,
    check_field,
    check_template,
    privileged_text,
    teacher_prompt_ids,
)


def answer_extractor(verify):
    """The task's `extract_answer` behind a verifier (a bound `Task.verify`), else None."""
    return getattr(getattr(verify, "__self__", None), "extract_answer", None)


def final_answer(text: str, extract=None) -> str | None:
    """`extract(text)` when an extractor is given, else the stripped text ("" is no answer)."""
    answer = extract(text) if extract is not None else text.strip()
    return answer if answer else None


def consensus(answers: Sequence[str | None]) -> tuple[str | None, float]:
    """(majority answer, agreement = its count / k) of one prompt's k answers (module doc)."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None, 0.0
    majority, count = votes.most_common(1)[0]  # ties: the first sampled (stable sort)
    return majority, count / len(answers)


@dataclass(frozen=True, eq=False)
class ConsensusSamples:
    """A prefix source: the self-teacher writes k samples per prompt; the consensus gate
    keeps the majority's samples of the prompts whose agreement reaches `threshold`.

    Attributes:
      teacher: the `SelfTeacher` whose model writes (its view: live, frozen, ema, adapter_off).
      k: samples per prompt.
      threshold: τ, the agreement a prompt needs (a share of k, in (0, 1]).
      field, template: the row field holding the document and how it joins the prompt.
      who: how errors name the part that needs the field.
    """

    teacher: object
    k: int = 4
    threshold: float = 0.5
    field: str = "context"
    template: str = TEMPLATE
    who: str = "recipe 'gates'"
    needs_completions: ClassVar[bool] = False
    needs_teacher_model: ClassVar[bool] = False

    def __post_init__(self):
        check_field(self.field)
        check_template(self.template)
        if self.k < 2:
            raise ConfigError(f"{self.who}: k must be >= 2 samples per prompt, got {self.k}")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"{self.who}: threshold must be in (0, 1], got {self.threshold}")

    def check_data(self, examples: Sequence) -> None:
        """DataError naming the first row without the document field (before training)."""
        for ex in examples:
            privileged_text(ex, self.field, None, self.who)

    def rollout(self, examples, ctx):
        k, tok = self.k, ctx.tokenizer
        t_prompts = [
            teacher_prompt_ids(
                ex, privileged_text(ex, self.field, None, self.who), tok, self.template
            )
            for ex in examples
        ]
        rows_t = [p for p in t_prompts for _ in range(k)]
        with self.teacher.scope():
            comps = ctx.generate(self.teacher.ready(), rows_t)
        extract = answer_extractor(ctx.verify)
        kept, passed, agreement = [], 0, 0.0
        for b in range(len(examples)):
            group = comps[b * k : (b + 1) * k]
            answers = [
                final_answer(tok.decode(c, skip_special_tokens=True), extract) for c in group
            ]
            majority, share = consensus(answers)
            ok = majority is not None and share >= self.threshold
            passed += ok
            agreement += share
            kept += [list(c) if ok and a == majority else [] for c, a in zip(group, answers)]
        B = max(1, len(examples))
        info = {
            "gate_pass_rate": passed / B,
            "gate_agreement": agreement / B,
            "gate_kept": sum(1 for c in kept if c) / max(1, len(kept)),
        }
        prompts = [p for p in prompts_of(examples) for _ in range(k)]
        answers_rows = [a for a in answers_of(examples) for _ in range(k)]
        rollout = make_rollout(prompts, kept, ctx.pad_id, "self-teacher", answers_rows, info)
        return dataclasses.replace(rollout, teacher_prompts=tuple(rows_t))

    def describe(self) -> str:
        return (
            f"self-teacher shown the row's '{self.field}' writes {self.k} samples per prompt; "
            f"kept: the majority answer's samples where agreement >= {self.threshold:g}"
        )
