"""HDPO's parts: privileged rollouts for "cliff" prompts, and the hybrid per-token loss.

Ding, "HDPO: Hybrid Distillation Policy Optimization via Privileged Self-Distillation", 2026
(arXiv 2603.23871). The student writes G completions per prompt (rows b·G .. b·G + G − 1
answer example b), rewarded by the task's verifier or a reward function (`opd.rl.grpo`).
A prompt is a cliff when none of its G completions succeeds (r < 1 for all). For each cliff
prompt the self-teacher, shown the row's ground truth (`field`, default `solution`, joined
by `template`, `opd.selfdistill.context`), writes G privileged completions; with `filter`
only those that succeed themselves (r ≥ 1) are kept. The rollout is then

    rows [0, B·G)          the student's completions              writer "student"
    rows [B·G, B·G + R)    the R kept privileged completions,     writer "privileged"
                           after the student's PLAIN prompt

and every row's teacher prompt is the ground-truth-conditioned prompt (for the student rows
that is unused: the signal never reads the teacher there). Per token t of row i:

    L_t = GRPO_t (`opd.rl.parts.GRPO` on the student rows alone)       i < B·G
    L_t = λ · JSD_β(p_T(·|x, solution, y<t), q_θ(·|x, y<t))             i ≥ B·G

with JSD_β = β·KL(p_T ‖ m) + (1 − β)·KL(q_θ ‖ m), m = β·p_T + (1 − β)·q_θ, reduced by the
loop's token mean over all counted tokens. A cliff group's GRPO advantages are all zero, so
its rows add only tokens to the normaliser; groups with a success get the GRPO loss.

Logged (`rollout.info`): `hdpo_cliff_rate` (share of prompts that are cliffs),
`hdpo_rescued` (share of the cliff prompts' privileged samples kept), and the GRPO signal's
`reward_mean` (student rows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from opd.errors import ConfigError
from opd.rl.grpo import load_reward_fn, rollout_rewards
from opd.sampling.sources import make_rollout
from opd.selfdistill.context import (
    TEMPLATE,
    check_field,
    check_template,
    privileged_text,
    teacher_prompt_ids,
)

STUDENT, PRIVILEGED = "student", "privileged"


def cliff_groups(rewards_B: torch.Tensor, group_size: int) -> list[bool]:
    """For each group of `group_size` consecutive rewards: True when none is ≥ 1."""
    return [not bool((g >= 1.0).any()) for g in rewards_B.reshape(-1, group_size)]


def rollout_rows(rollout) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, completions) of a rollout as token lists, padding removed."""
    prompts, comps = [], []
    P, mask_BT = rollout.prompt_len, rollout.completion_mask_BT.bool()
    for b in range(rollout.input_ids_BL.shape[0]):
        prompts.append(
            rollout.input_ids_BL[b, :P][rollout.attention_mask_BL[b, :P].bool()].tolist()
        )
        comps.append(rollout.completion_ids_BT[b][mask_BT[b]].tolist())
    return prompts, comps


@dataclass(frozen=True, eq=False)
class CliffRescue:
    """A prefix source: the student's G samples per prompt, plus the ground-truth-conditioned
    self-teacher's (filtered) samples for the prompts where all G fail (module doc).

    Attributes:
      inner: writes the student's G completions per prompt (`Grouped(student(), G)`).
      teacher: the `SelfTeacher` whose model writes the privileged completions.
      group_size: G.
      field, template: the row field holding the ground truth and how it joins the prompt.
      filter: keep only privileged completions that succeed (r ≥ 1).
      reward: a reward function "package.module:function"; "" = the task's verifier.
      who: how errors name the part that needs the field.
    """

    inner: object
    teacher: object
    group_size: int = 4
    field: str = "solution"
    template: str = TEMPLATE
    filter: bool = True
    reward: str = ""
    who: str = "recipe 'hdpo'"
    needs_completions: ClassVar[bool] = False
    needs_teacher_model: ClassVar[bool] = False
    _cache: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self):
        check_field(self.field)
        check_template(self.template)
        if self.group_size < 1:
            raise ConfigError(f"{self.who}: group_size must be >= 1, got {self.group_size}")
        if self.reward:
            self._cache["reward"] = load_reward_fn(self.reward)

    def check_data(self, examples: Sequence) -> None:
        """DataError naming the first row without the ground-truth field (before training)."""
        for ex in examples:
            privileged_text(ex, self.field, None, self.who)

    def rollout(self, examples, ctx):
        G, tok, reward_fn = self.group_size, ctx.tokenizer, self._cache.get("reward")
        student_ro = self.inner.rollout(examples, ctx)
        if student_ro.input_ids_BL.shape[0] != len(examples) * G:
            raise ValueError(f"{student_ro.input_ids_BL.shape[0]} rows for {len(examples)} × G")
        t_prompts = [
            teacher_prompt_ids(
                ex, privileged_text(ex, self.field, None, self.who), tok, self.template
            )
            for ex in examples
        ]
        rewards_B = rollout_rewards(student_ro, ctx, reward_fn)
        cliffs = [b for b, cliff in enumerate(cliff_groups(rewards_B, G)) if cliff]
        prompts, comps = rollout_rows(student_ro)
        writers = [STUDENT] * len(prompts)
        answers = list(student_ro.answers) or [None] * len(prompts)
        rows_t = [t_prompts[b] for b in range(len(examples)) for _ in range(G)]
        kept = 0
        if cliffs:
            cand_t = [t_prompts[b] for b in cliffs for _ in range(G)]
            with self.teacher.scope():
                cand = ctx.generate(self.teacher.ready(), cand_t)
            plain = [list(examples[b].prompt_ids) for b in cliffs for _ in range(G)]
            cand_answers = [examples[b].answer for b in cliffs for _ in range(G)]
            ok = [True] * len(cand)
            if self.filter:
                scored = make_rollout(plain, cand, ctx.pad_id, PRIVILEGED, cand_answers)
                ok = (rollout_rewards(scored, ctx, reward_fn) >= 1.0).tolist()
            for i, c in enumerate(cand):
                if ok[i] and len(c):
                    prompts.append(plain[i])
                    comps.append(list(c))
                    writers.append(PRIVILEGED)
                    answers.append(cand_answers[i])
                    rows_t.append(cand_t[i])
                    kept += 1
        info = {
            "hdpo_cliff_rate": len(cliffs) / max(1, len(examples)),
            "hdpo_rescued": kept / (len(cliffs) * G) if cliffs else 0.0,
        }
        merged = make_rollout(
            prompts, comps, ctx.pad_id, "hdpo", answers, {**student_ro.info, **info}
        )
        return dataclasses.replace(
            merged, row_writers=tuple(writers), teacher_prompts=tuple(rows_t)
        )

    def describe(self) -> str:
        kept = "its successful ones" if self.filter else "all of them"
        return (
            f"{self.inner.describe()}; where all {self.group_size} fail, the self-teacher shown "
            f"the row's '{self.field}' writes {self.group_size} more ({kept} distilled)"
        )


@dataclass(frozen=True)
class HybridLoss:
    """GRPO on the student rows, λ times `distill` on the privileged rows (module doc)."""

    rl: object
    distill: object
    coef: float = 1.0
    logs: ClassVar[frozenset] = frozenset({"reward_mean"})

    def __post_init__(self):
        if not self.coef >= 0:
            raise ConfigError(f"HDPO: distillation coefficient must be >= 0, got {self.coef}")

    @property
    def requires(self) -> frozenset:
        return frozenset(self.rl.requires) | frozenset(self.distill.requires)

    def labelled_parts(self) -> tuple:
        return (("RL term", self.rl), ("distillation term", self.distill))

    def prepare(self, models) -> None:
        hook = getattr(self.rl, "prepare", None)
        if callable(hook):
            hook(models)

    def __call__(self, student, teacher, ctx):
        rollout = ctx.rollout
        writers = rollout.row_writers or (STUDENT,) * rollout.input_ids_BL.shape[0]
        n_rl = sum(1 for w in writers if w == STUDENT)
        if any(w != STUDENT for w in writers[:n_rl]):
            raise ValueError("HDPO: the student's rows must come first in the rollout")
        row_N = student.row_index_N
        is_rl_N = row_N < n_rl
        idx_rl = is_rl_N.nonzero()[:, 0]
        sub_ctx = dataclasses.replace(ctx, rollout=rollout.take_rows(list(range(n_rl))))
        rl_N = self.rl(student.take(idx_rl, row_N[idx_rl]), teacher.take(idx_rl), sub_ctx)
        values_N = torch.zeros(row_N.shape[0], dtype=rl_N.dtype, device=rl_N.device)
        values_N = values_N.index_copy(0, idx_rl, rl_N)
        idx_d = (~is_rl_N).nonzero()[:, 0]
        if self.coef and idx_d.numel():
            d_N = self.distill(student.take(idx_d, row_N[idx_d]), teacher.take(idx_d), ctx)
            values_N = values_N.index_copy(0, idx_d, self.coef * d_N.to(values_N.dtype))
        return values_N

    def describe(self) -> str:
        return (
            f"{self.rl.describe()} on the student's rows; {self.coef:g} · "
            f"{self.distill.describe()} on the privileged rows"
        )
