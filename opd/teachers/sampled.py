"""Sampled-token teacher access: only log p_teacher(y_t) of the tokens actually written.

The narrowest white-box view, and the one a served teacher gives most cheaply (a "logprobs of
the prompt" call): one number per completion token. It is all the sampled-token and
policy-gradient signals need (`opd.signals.policy_gradient`: the tinker recipe's per-token advantage
A_t = −(log q(y_t) − log p(y_t)), G-OPD, REOPOLD). A full-vocabulary divergence cannot be
computed from it, and `Method` refuses the combination at construction.

The teacher runs without gradients; its hidden rows are projected chunk by chunk and only the
target column is kept (`opd.losses.chunked_token_logprobs`), so nothing (N, V) is held.
Policy-gradient signals are defined on the sampling distribution, so there is no temperature
(τ = 1). Like `FullLogits`, the lm_head bias is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd.teachers.base import LocalTeacher, as_teacher
from opd.types import Rollout, TeacherScores


@dataclass(frozen=True)
class SampledLogprobs:
    """Sampled-token access: log p_teacher(y_t) for each counted completion token.

    Attributes:
      chunk_size: rows per chunk when scoring a local teacher.
    """

    chunk_size: int = 512
    provides: frozenset = frozenset({"token_logprobs"})

    needs: frozenset = frozenset({"token_logprobs"})

    def score(self, teacher, rollout: Rollout, vocab_size: int) -> TeacherScores:
        t = as_teacher(teacher)
        if isinstance(t, LocalTeacher) and t.chunk_size != self.chunk_size:
            t = LocalTeacher(t.model, self.chunk_size)
        scores = t.logprobs(rollout, 0, 1.0, vocab_size)
        return TeacherScores(token_logprobs_N=scores.token_logprobs_N)

    def describe(self) -> str:
        return "sampled-token log-probs log p(y_t)"
