"""Top-k teacher access: the teacher's k most likely tokens per position, plus a tail bucket.

Many teachers cannot hand over a full (N, V) distribution: a served model returns its top-k
log-probabilities (OpenAI-style `top_logprobs`), and a top-k cache stores only those. `TopK`
gives exactly that view of a local teacher, so a method written against it runs unchanged on
a remote top-k teacher later. Per counted completion token it returns

    topk_ids_NK       (N, k + 1)  the k most likely token ids, descending, then TAIL_ID (-1)
    topk_logprobs_NK  (N, k + 1)  their log-probabilities log p_v, then the tail bucket
                                  log(1 − Σ_{v ∈ top-k} p_v), the mass of every other token
    token_logprobs_N  (N,)        log p(y_t) of the token actually written (cheap: one entry
                                  per row, `chunked_token_logprobs`)

so the k + 1 buckets form a proper distribution (their probabilities sum to 1). The tail is
computed from the top-k log-probabilities as log1mexp(logsumexp(top-k)), floored at
`TAIL_FLOOR`: when the top-k holds all the mass (k = V, or a peaked row in float32) the tail is
exp(TAIL_FLOOR) = 0 instead of log 0 = −inf, which would turn 0·(−inf) into NaN downstream.
`TAIL_ID` is −1 on purpose: indexing a vocabulary with it fails loudly instead of silently
reading the wrong row.

Nothing (N, V) is held: `opd.losses.chunked_topk` walks the teacher's hidden rows in chunks.
The temperature τ divides the teacher logits before the softmax; use the same τ in the signal
(`opd.signals.TopKDivergence`). Like `FullLogits`, the lm_head bias is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opd.losses import chunked_topk
from opd.types import Rollout, TeacherScores

TAIL_ID = -1
"""The id that marks the tail bucket in `topk_ids_NK` (never a real token)."""

TAIL_FLOOR = -1.0e4
"""Smallest log-mass of a bucket: exp(−1e4) is exactly 0 in float32 and float64, but finite."""


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate near 0 and near −∞ (Mächler 2012).

    Args:
        x: (...) values; anything above 0 (rounding) is treated as 0.

    Returns:
        (...) values in [−inf, 0); −inf where x = 0.
    """
    x = x.clamp(max=0.0)
    near_zero = x > -0.6931471805599453  # −log 2: switch between the two stable forms
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(x)),
        torch.log1p(-torch.exp(x.clamp(max=-0.6931471805599453))),
    )


def with_tail(topk_logprobs_NK: Tensor) -> Tensor:
    """Append the tail bucket log(1 − Σ_k p) to top-k log-probabilities.

    Args:
        topk_logprobs_NK: (N, k) log-probabilities of k tokens of a distribution over V.

    Returns:
        (N, k + 1) log-probabilities whose exponentials sum to 1; the last column is the tail,
        floored at TAIL_FLOOR.
    """
    tail_N = log1mexp(torch.logsumexp(topk_logprobs_NK, dim=-1)).clamp_min(TAIL_FLOOR)
    return torch.cat([topk_logprobs_NK, tail_N[:, None]], dim=-1)


@torch.no_grad()
def teacher_topk_buckets(
    hidden_ND: Tensor, head_VD: Tensor, k: int, temperature: float = 1.0, chunk_size: int = 512
) -> tuple[Tensor, Tensor]:
    """Top-k ids and (top-k + tail) log-probabilities of p = softmax(hidden @ head.T / τ).

    Args:
        hidden_ND: (N, D) teacher hidden states of the counted tokens.
        head_VD: (V, D) teacher lm_head weight.
        k: 1 ≤ k ≤ V.
        temperature: τ > 0.
        chunk_size: rows per chunk.

    Returns:
        ids_NK (N, k + 1) int64 with TAIL_ID last, and logprobs_NK (N, k + 1) (see `with_tail`).
    """
    logprobs_NK, ids_NK = chunked_topk(hidden_ND, head_VD, k, temperature, chunk_size)
    tail_ids_N1 = torch.full_like(ids_NK[:, :1], TAIL_ID)
    return torch.cat([ids_NK, tail_ids_N1], dim=-1), with_tail(logprobs_NK)


def completion_targets(rollout: Rollout, device) -> Tensor:
    """(N,) the counted completion tokens, row-major, as in `StudentRows.target_ids_N`."""
    mask_BT = rollout.completion_mask_BT.to(device).bool()
    return rollout.completion_ids_BT.to(device)[mask_BT]


@dataclass(frozen=True)
class TopK:
    """Top-k access: the teacher's k best log-probabilities per token plus a tail bucket.

    Attributes:
      k: number of tokens kept per position (1 ≤ k ≤ V).
      temperature: τ applied to the teacher logits (match the signal's τ).
      chunk_size: rows per chunk when scoring a local teacher.
    """

    k: int = 16
    temperature: float = 1.0
    chunk_size: int = 512
    provides: frozenset = frozenset({"topk_logprobs", "token_logprobs"})

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"TopK: k must be an integer >= 1, got {self.k!r}")
        if not self.temperature > 0:
            raise ValueError(f"TopK: temperature must be > 0, got {self.temperature}")

    needs: frozenset = frozenset({"topk_logprobs"})

    def score(self, teacher, rollout: Rollout, vocab_size: int) -> TeacherScores:
        from opd.teachers.base import LocalTeacher, as_teacher

        t = as_teacher(teacher)
        if isinstance(t, LocalTeacher) and t.chunk_size != self.chunk_size:
            t = LocalTeacher(t.model, self.chunk_size)
        return t.logprobs(rollout, self.k, self.temperature, vocab_size)

    def describe(self) -> str:
        t = f", temperature={self.temperature}" if self.temperature != 1.0 else ""
        return f"top-{self.k} log-probs + tail bucket{t}"
