"""The GRPO core as parts of a `Method`: G samples per prompt, no teacher, the GRPO signal.

    Grouped(inner, G)    each example of the batch repeated G times before `inner` writes:
                         rows b·G .. b·G + G − 1 answer prompt b (the group of `opd.rl.grpo`)
    NoTeacher()          a teacher access that asks nothing and returns empty scores
    GRPO(...)            per token: −min(ρ·A, clip(ρ)·A) + β·k3 with group-normalised A from
                         the verifier's (or a reward function's) rewards (`opd.rl.grpo`)

Each micro-batch holds whole groups (the loop rolls out batch_size prompts × G rows), so the
group statistics never span micro-batches. With kl_coef > 0 the reference is a frozen copy of
the initial student, made in `prepare` (before a checkpoint is restored, as G-OPD's).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from opd.errors import ConfigError
from opd.rl.grpo import SCALES, group_advantages, grpo_token_loss, load_reward_fn, rollout_rewards
from opd.signals.tokens import student_token_logprobs
from opd.teachers import SampledLogprobs
from opd.types import TeacherScores


@dataclass(frozen=True)
class Grouped:
    """`inner` writes G completions per prompt (each example repeated G times, in order)."""

    inner: object
    group_size: int = 4

    def __post_init__(self):
        if self.group_size < 1:
            raise ConfigError(f"group size G must be >= 1, got {self.group_size}")

    @property
    def needs_completions(self) -> bool:
        return self.inner.needs_completions

    @property
    def needs_teacher_model(self) -> bool:
        return self.inner.needs_teacher_model

    def rollout(self, examples, ctx):
        return self.inner.rollout([ex for ex in examples for _ in range(self.group_size)], ctx)

    def describe(self) -> str:
        return f"{self.inner.describe()}, {self.group_size} samples per prompt"


@dataclass(frozen=True)
class NoTeacher:
    """No teacher at all: the method learns from rewards only."""

    provides: frozenset = frozenset()
    needs: frozenset = frozenset()

    def score(self, teacher, rollout, vocab_size: int) -> TeacherScores:
        return TeacherScores()

    def describe(self) -> str:
        return "none (rewards only)"


@dataclass(frozen=True)
class GRPO:
    """GRPO's per-token loss (`opd.rl.grpo`), rewards by the task's verifier or `reward`.

    Attributes:
      group_size: G, the rows of each group (the prefix source must write G per prompt).
      scale: "std" (GRPO) or "none" (Dr. GRPO).
      eps_low, eps_high: the clip band [1 − ε_low, 1 + ε_high] (eps_high 0: = eps_low).
      kl_coef: β of the k3 KL to the initial student (0: no reference is kept).
      reward: a reward function "package.module:function"; "" = the task's verifier.
    """

    group_size: int = 4
    scale: str = "std"
    eps_low: float = 0.2
    eps_high: float = 0.0
    kl_coef: float = 0.0
    reward: str = ""
    requires: ClassVar[frozenset] = frozenset()
    logs: ClassVar[frozenset] = frozenset({"reward_mean"})
    _cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self):
        if self.scale not in SCALES:
            raise ConfigError(f"GRPO: scale {self.scale!r}; valid: {', '.join(SCALES)}")
        if self.eps_low < 0 or self.eps_high < 0 or self.kl_coef < 0:
            raise ConfigError("GRPO: eps_low, eps_high and kl_coef must be >= 0")
        if self.group_size < 1:
            raise ConfigError(f"GRPO: group_size must be >= 1, got {self.group_size}")
        if self.reward:
            self._cache["reward"] = load_reward_fn(self.reward)  # a bad path fails now

    def prepare(self, models) -> None:
        if self.kl_coef and "reference" not in self._cache:
            ref = copy.deepcopy(models.student).eval()
            ref.requires_grad_(False)
            self._cache["reference"] = ref

    def __call__(self, student, teacher, ctx) -> torch.Tensor:
        if ctx.rollout is None:
            raise ConfigError("GRPO needs ctx.rollout (the rows' completions) to score rewards")
        logq_N = student_token_logprobs(student, ctx)
        R_B = rollout_rewards(ctx.rollout, ctx, self._cache.get("reward")).to(logq_N.device)
        ctx.log("reward_mean", R_B.mean())
        A_B = group_advantages(R_B.to(logq_N.dtype), self.group_size, self.scale)
        ref_N = None
        if self.kl_coef:
            if "reference" not in self._cache:
                raise ConfigError("GRPO with kl_coef > 0: prepare(models) was not called")
            scores = SampledLogprobs(ctx.chunk_size).score(
                self._cache["reference"], ctx.rollout, student.head_VD.shape[0]
            )
            ref_N = scores.token_logprobs_N.to(logq_N.dtype)
        return grpo_token_loss(
            logq_N,
            logq_N.detach(),  # one update per rollout: π_old = π_θ
            A_B[student.row_index_N],
            ref_N,
            self.kl_coef,
            self.eps_low,
            self.eps_high or None,
        )

    def describe(self) -> str:
        adv = "(r − mean)/(std + ε)" if self.scale == "std" else "r − mean (Dr. GRPO)"
        kl = f" + {self.kl_coef}·k3 KL to the initial student" if self.kl_coef else ""
        src = self.reward or "the task's verifier"
        return f"GRPO clipped surrogate, G={self.group_size}, A = {adv}, rewards: {src}{kl}"
