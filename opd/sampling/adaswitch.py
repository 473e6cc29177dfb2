"""AdaSwitch (Peng et al., 2025): the student writes until it strays, then the teacher.

Decoded with both models side by side (`opd.sampling.interleaved`, which states the sampling
semantics). The student proposes y'_t ~ q and d_t = −log p(y'_t) (default, p at temperature
1) or d_t = KL(p ‖ q) (`divergence="forward_kl"`, AdaSwitch's metric). With s the first
position where d_t > τ (or, with `scale`=K, d_t > K·mean(d_{t−window..t−1}), AdaSwitch's
adaptive threshold):

    y_t = y'_t (student)  for t < s        y_t ~ p (teacher)  for t ≥ s

i.e. the proposal that crossed the threshold is dropped and the teacher writes position s
and everything after it (one switch per row). τ = inf is the student alone, τ = −inf the
teacher from the first token. Written by "adaswitch"; `rollout.info` logs `student_share`
(the fraction of student-written tokens) and `switched_rows`.

Deviations: the default is a fixed threshold τ on d = −log p(y'_t) (the rule above with
`scale=None`). The paper's rule is d = KL(p ‖ q) against K·(mean of the last L values of
d); use `divergence="forward_kl", tau=inf, scale=K, window=L`. Its K and L are not
reproduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


def switch_decode(
    ctx,
    prompts,
    tau: float,
    divergence: str = "teacher_nll",
    scale: float | None = None,
    window: int = 8,
) -> Decoded:
    """AdaSwitch: student until d_t crosses the threshold, then the teacher (one switch).

    Records "by_student", "proposal" (the student's proposal y'_t) and "divergence" (d_t of
    the proposal while the row is still with the student, NaN after the switch).
    """
    params = ctx.params
    state = {"switched": None, "history": []}

    def pick(z_s, z_t):
        B = z_s.shape[0]
        if state["switched"] is None:
            state["switched"] = torch.zeros(B, dtype=torch.bool, device=z_s.device)
        before_B = state["switched"].clone()
        proposal_B = draw(sample_probs(z_s, params), params.greedy)
        logp_BV = z_t.log_softmax(dim=-1)
        if divergence == "teacher_nll":
            d_B = -logp_BV.gather(1, proposal_B[:, None]).squeeze(1)
        else:  # KL(p ‖ q) at temperature 1
            d_B = (logp_BV.exp() * (logp_BV - z_s.log_softmax(dim=-1))).sum(dim=-1)
        threshold_B = torch.full_like(d_B, tau)
        if scale is not None and state["history"]:
            recent_B = torch.stack(state["history"][-window:]).mean(dim=0)
            threshold_B = torch.minimum(threshold_B, scale * recent_B)
        state["history"].append(d_B)
        switched_B = before_B | (d_B > threshold_B)
        state["switched"] = switched_B
        y_B = proposal_B.clone()
        rows = switched_B.nonzero().squeeze(1)
        if rows.numel():
            y_B[rows] = draw(sample_probs(z_t[rows], params), params.greedy)
        d_rec = torch.where(before_B, torch.full_like(d_B, math.nan), d_B)
        return y_B, {"by_student": ~switched_B, "proposal": proposal_B, "divergence": d_rec}

    return decode_with_records(ctx, prompts, pick, ("by_student", "proposal", "divergence"))


DIVERGENCES = ("teacher_nll", "forward_kl")


@dataclass(frozen=True)
class AdaSwitch:
    """AdaSwitch: the student writes until d_t > τ, the teacher writes the rest."""

    tau: float = 3.0  # −log p > 3 means the teacher gives the student's token under e^−3 ≈ 5 %
    divergence: str = "teacher_nll"
    scale: float | None = None
    window: int = 8
    needs_completions: ClassVar[bool] = False
    needs_teacher_model: ClassVar[bool] = True

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ConfigError(
                f"adaswitch: 'divergence' must be one of {DIVERGENCES}, got {self.divergence!r}"
            )
        if math.isnan(self.tau):
            raise ConfigError("adaswitch: 'tau' must be a number (inf and -inf allowed), got nan")
        if self.scale is not None and not self.scale > 0:
            raise ConfigError(f"adaswitch: 'scale' (K) must be > 0 or None, got {self.scale}")
        if self.window < 1:
            raise ConfigError(f"adaswitch: 'window' must be >= 1, got {self.window}")

    def rollout(self, examples, ctx: StepContext):
        prompts, answers = prompts_of(examples), answers_of(examples)
        dec = switch_decode(ctx, prompts, float(self.tau), self.divergence, self.scale, self.window)
        by_student = dec.records["by_student"]
        info = {
            "student_share": share(by_student),
            "switched_rows": sum(1 for r in by_student if r and not r[-1])
            / max(1, len(by_student)),
        }
        return make_rollout(prompts, dec.completions, ctx.pad_id, "adaswitch", answers, info)

    def describe(self) -> str:
        rule = f"d_t > {self.tau}"
        if self.scale is not None:
            rule += f" or d_t > {self.scale}·mean(last {self.window} d)"
        return f"adaswitch: student writes until {rule} (d = {self.divergence}), then the teacher"


def adaswitch(
    tau: float = 3.0, divergence: str = "teacher_nll", scale: float | None = None, window: int = 8
) -> AdaSwitch:
    return AdaSwitch(tau=tau, divergence=divergence, scale=scale, window=window)
