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

import torch

from opd.losses import chunked_token_logprobs
from opd.teachers.local import FullLogits
from opd.teachers.topk import completion_targets
from opd.types import Rollout, TeacherScores


@dataclass(frozen=True)
class SampledLogprobs:
    """Sampled-token access: log p_teacher(y_t) for each counted completion token.

    Attributes:
      chunk_size: rows per chunk when scoring a local teacher.
    """

    chunk_size: int = 512
    provides: frozenset = frozenset({"token_logprobs"})

    @torch.no_grad()
    def score(self, teacher: torch.nn.Module, rollout: Rollout, vocab_size: int) -> TeacherScores:
        full = FullLogits().score(teacher, rollout, vocab_size)
        targets_N = completion_targets(rollout, full.head_VD.device)
        token_logprobs_N = chunked_token_logprobs(
            full.hidden_ND, full.head_VD, targets_N, chunk_size=self.chunk_size
        )
        return TeacherScores(token_logprobs_N=token_logprobs_N)

    def describe(self) -> str:
        return "sampled-token log-probs log p(y_t) (local teacher)"
