"""Token-level interleaved prefix sources: MiniLLM's teacher-mixed sampling and SKD.

Both decode with the student and the teacher side by side (`opd.sampling.interleaved`, which
states the sampling semantics shared with `adaswitch`), with p (teacher) and q (student) the
warped next-token distributions:

- `token_mix(alpha, clip)`: MiniLLM's teacher-mixed sampling (Gu et al., ICLR 2024),

      y_t ~ p̃ = α·p + (1−α)·q,      w_t = q(y_t) / p̃(y_t)      (α = 0.2)

  w_t goes into `Rollout.token_weight_BT` (detached), so a signal averaged over these tokens
  estimates its average over student-written tokens. MiniLLM clips the PPO ratio that carries
  w_t to [1−ε, 1+ε] with ε = 0.2 (its `cliprange`); opd has no PPO ratio here, so `clip=ε`
  clamps w_t itself to [1−ε, 1+ε]; `clip=None` keeps the unbiased (higher-variance) weight.
  Greedy (temperature 0) takes the argmax of α·softmax(z_T) + (1−α)·softmax(z_S), whose
  weights are then computed at temperature 1. Written by "student".
- `speculative(k)`: SKD (Xu et al., ICLR 2025). The student proposes y'_t ~ q; it is kept if
  it is among the teacher's k most likely tokens at t (ranked on the raw teacher logits), else
  it is replaced by y_t ~ p. `rollout.info["student_share"]` is the fraction of kept tokens.

Deviations:
- MiniLLM clips the ratio inside its PPO objective; opd clips the weight itself (above).
- SKD: none in the sampling rule (top-k on the teacher's logits, replacement drawn from the
  teacher at the sampling temperature).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from opd.context import StepContext
from opd.errors import ConfigError
from opd.sampling.interleaved import (
    Decoded,
    decode_with_records,
    draw,
    sample_probs,
    share,
)
from opd.sampling.sources import answers_of, make_rollout, prompts_of


def mixture_decode(ctx, prompts, alpha: float, clip: float | None) -> Decoded:
    """MiniLLM teacher-mixed sampling; records the importance weight "weight" per token."""
    params = ctx.params

    def pick(z_s, z_t):
        q_BV, p_BV = sample_probs(z_s, params), sample_probs(z_t, params)
        mix_BV = alpha * p_BV + (1.0 - alpha) * q_BV  # α=0 is exactly q, α=1 exactly p
        y_B = draw(mix_BV, params.greedy)
        w_B = (q_BV.gather(1, y_B[:, None]) / mix_BV.gather(1, y_B[:, None])).squeeze(1)
        if clip is not None:
            w_B = w_B.clamp(1.0 - clip, 1.0 + clip)
        return y_B, {"weight": w_B}

    return decode_with_records(ctx, prompts, pick, ("weight",))


def speculative_decode(ctx, prompts, k: int) -> Decoded:
    """SKD interleaved sampling; records "by_student" (1 = proposal kept) and "proposal"."""
    params = ctx.params

    def pick(z_s, z_t):
        proposal_B = draw(sample_probs(z_s, params), params.greedy)
        topk_BK = z_t.topk(min(k, z_t.shape[-1]), dim=-1).indices
        kept_B = (topk_BK == proposal_B[:, None]).any(dim=-1)
        y_B = proposal_B.clone()
        rejected = (~kept_B).nonzero().squeeze(1)
        if rejected.numel():
            y_B[rejected] = draw(sample_probs(z_t[rejected], params), params.greedy)
        return y_B, {"by_student": kept_B, "proposal": proposal_B}

    return decode_with_records(ctx, prompts, pick, ("by_student", "proposal"))


@dataclass(frozen=True)
class TokenMix:
    """MiniLLM teacher-mixed sampling with importance weights (see the module docstring)."""

    alpha: float = 0.2
    clip: float | None = 0.2
    needs_completions: ClassVar[bool] = False
    needs_teacher_model: ClassVar[bool] = True

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"token_mix: 'alpha' must be in [0, 1], got {self.alpha}")
        if self.clip is not None and not 0.0 <= self.clip < 1.0:
            raise ConfigError(f"token_mix: 'clip' must be None or in [0, 1), got {self.clip}")

    def rollout(self, examples, ctx: StepContext):
        prompts, answers = prompts_of(examples), answers_of(examples)
        dec = mixture_decode(ctx, prompts, self.alpha, self.clip)
        weights = dec.records["weight"]
        n = sum(len(w) for w in weights)
        info = {"mean_token_weight": sum(map(sum, weights)) / n if n else 1.0}
        ro = make_rollout(prompts, dec.completions, ctx.pad_id, "student", answers, info)
        w_BT = torch.ones(ro.completion_mask_BT.shape, dtype=torch.float32)
        for i, w in enumerate(weights):
            w_BT[i, : len(w)] = torch.tensor(w, dtype=torch.float32)
        return replace(ro, token_weight_BT=w_BT)

    def describe(self) -> str:
        clip = (
            f", weights clipped to [{1 - self.clip:g}, {1 + self.clip:g}]"
            if self.clip is not None
            else ""
        )
        return f"token_mix: y_t ~ {self.alpha}·p_teacher + {1 - self.alpha:g}·q_student{clip}"


@dataclass(frozen=True)
class Speculative:
    """SKD: student proposals kept if in the teacher's top-k, else teacher samples."""

    k: int = 25
    needs_completions: ClassVar[bool] = False
    needs_teacher_model: ClassVar[bool] = True

    def __post_init__(self):
        if int(self.k) != self.k or self.k < 1:
            raise ConfigError(f"speculative: 'k' must be a positive integer, got {self.k}")

    def rollout(self, examples, ctx: StepContext):
        prompts, answers = prompts_of(examples), answers_of(examples)
        dec = speculative_decode(ctx, prompts, int(self.k))
        info = {"student_share": share(dec.records["by_student"])}
        return make_rollout(prompts, dec.completions, ctx.pad_id, "speculative", answers, info)

    def describe(self) -> str:
        return f"speculative: student proposes, kept if in the teacher's top-{self.k}, else a teacher sample"


def token_mix(alpha: float = 0.2, clip: float | None = 0.2) -> TokenMix:
    return TokenMix(alpha=alpha, clip=clip)


def speculative(k: int = 25) -> Speculative:
    return Speculative(k=k)
