"""Chunk-level sampled reverse KL across tokenizers.

Notation as in `opd.signals.policy_gradient`: q = student, p = teacher, log q_t = log q(y_t |
x, y_<t) with gradient, sg(·) = stop-gradient. With the spans g of `opd.crosstok.access`
(student tokens t ∈ g and teacher tokens u ∈ g over the same bytes):

    log p_g = Σ_{u ∈ g} log p(u | x_T, u_<)            (teacher, its own tokenisation)
    log q_g = Σ_{t ∈ g} log q_t                         (student)
    A_g     = sg(log p_g − log q_g)
    loss_t  = −A_g · log q_t     for every student token t of span g;  0 for masked tokens

Σ_t loss_t = −Σ_g A_g · log q_g: the policy-gradient surrogate with the per-span reward
log p_g − log q_g. Both models give the probability of the same byte string given the same
prefix bytes, so Σ_g (log q_g − log p_g) over a completion is the one-sample estimate of the
sequence KL(q_student ‖ p_teacher) over byte strings (up to the tokenisation ambiguity: the
teacher scores one tokenisation of the text, not the sum over all of them).

With identical tokenizers every span is one token, log q_g = log q_t and log p_g = log p_t,
and the loss is `opd.signals.SampledRKL` (discount 0) bit for bit (tested).

Logged per micro-batch (`ctx.log`): `xtok_unaligned`, the number of counted student tokens
in masked spans, and `xtok_kl`, Σ_g (log q_g − log p_g) per aligned student token.
Deviations: masked tokens give 0 but still count in the loop's token mean (the loop's
normaliser is fixed before the teacher is asked), so a batch with many masked tokens gets a
proportionally smaller step. No discount over future spans (tinker's default, γ = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from opd.context import StepContext
from opd.errors import ConfigError
from opd.signals.tokens import student_token_logprobs
from opd.types import StudentRows, TeacherScores


@dataclass(frozen=True)
class SpanSampledRKL:
    """−sg(log p_g − log q_g) · log q(y_t) per student token t of aligned span g."""

    requires: ClassVar[frozenset] = frozenset({"span_logprobs"})
    logs: ClassVar[frozenset] = frozenset({"xtok_unaligned", "xtok_kl"})

    def __call__(self, student: StudentRows, teacher: TeacherScores, ctx: StepContext) -> Tensor:
        if teacher.span_index_N is None or teacher.span_teacher_logprobs_G is None:
            raise ConfigError(
                "SpanSampledRKL needs span log-probs: use the cross-tokenizer teacher access "
                "(opd.crosstok.CrossTokenizerLogprobs)"
            )
        logq_N = student_token_logprobs(student, ctx)
        span_N = teacher.span_index_N.to(logq_N.device)
        logp_G = teacher.span_teacher_logprobs_G.to(device=logq_N.device, dtype=logq_N.dtype)
        valid_N = span_N >= 0
        span_V = span_N[valid_N]
        logq_G = torch.zeros_like(logp_G).index_add_(0, span_V, logq_N.detach()[valid_N])
        a_G = logp_G - logq_G
        loss_N = torch.zeros_like(logq_N)
        loss_N[valid_N] = -a_G[span_V] * logq_N[valid_N]
        n_aligned = int(valid_N.sum())
        ctx.log("xtok_unaligned", int(span_N.numel()) - n_aligned)
        ctx.log("xtok_kl", float(-a_G.sum()) / max(n_aligned, 1))
        return loss_N

    def describe(self) -> str:
        return "span-level sampled reverse KL as advantage, −sg(log p_g − log q_g)·log q(y_t)"
