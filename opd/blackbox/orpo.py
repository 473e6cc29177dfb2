"""ORPO's odds-ratio preference loss with the teacher's response as the chosen one.

Hong, Lee & Thorne, ORPO: Monolithic Preference Optimization without Reference Model (EMNLP
2024), used for distillation as in ORPO-Distill: for a prompt x the teacher writes y_w (chosen)
and the student writes y_l (rejected). With the student's length-normalised sequence
log-probability

    log P(y|x) = (1/|y|) Σ_t log q_student(y_t | x, y_<t)
    log odds(y) = log P(y) − log(1 − P(y))                   (log(1 − P) by `log1mexp`)

the pair's loss is

    L = L_SFT + λ·L_OR,   L_SFT = −(1/|y_w|) Σ_t log q_student(y_w,t),
    L_OR = −log σ(log odds(y_w) − log odds(y_l)),           λ = 0.1 by default

The teacher is never asked for a probability: only the student's log-probs enter the loss.

As per-token values for the loop: every token of both rows of pair b carries L_b (a constant
within the row), so the loop's "sequence_mean" reduction (mean over rows of each row's token
mean) gives the mean of L_b over the pairs, with the gradient of L_b (both rows' log-probs).
A pair whose chosen or rejected response is empty has no defined loss and carries 0.
log P is clamped to ≤ −1e-6 so that log(1 − P) stays finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from opd.errors import ConfigError
from opd.signals.tokens import student_token_logprobs
from opd.teachers.topk import log1mexp

MAX_LOGP = -1e-6


def log_odds(mean_logp_P: Tensor) -> Tensor:
    """(P,) log(P / (1 − P)) of length-normalised log-probabilities log P (clamped ≤ −1e-6)."""
    logp_P = mean_logp_P.clamp(max=MAX_LOGP)
    return logp_P - log1mexp(logp_P)


def orpo_pair_loss(
    chosen_mean_logp_P: Tensor, rejected_mean_logp_P: Tensor, lam: float = 0.1
) -> tuple[Tensor, Tensor]:
    """(P,) ORPO losses L_SFT + λ·L_OR of P pairs, and (P,) L_OR alone (module doc).

    Args:
      chosen_mean_logp_P: (1/|y_w|) Σ_t log q(y_w,t) per pair (−L_SFT).
      rejected_mean_logp_P: (1/|y_l|) Σ_t log q(y_l,t) per pair.
      lam: λ, the weight of the odds-ratio term.
    """
    ratio_P = log_odds(chosen_mean_logp_P) - log_odds(rejected_mean_logp_P)
    l_or_P = -F.logsigmoid(ratio_P)
    return -chosen_mean_logp_P + lam * l_or_P, l_or_P


@dataclass(frozen=True)
class ORPO:
    """The ORPO loss on a `Paired((teacher(), student()))` rollout (module doc).

    Attributes:
      lam: λ, the weight of the odds-ratio term (the paper's default 0.1).
      chosen, rejected: the writers of the preferred and the dispreferred rows.
    """

    lam: float = 0.1
    chosen: str = "teacher"
    rejected: str = "student"
    requires: ClassVar[frozenset] = frozenset()
    logs: ClassVar[frozenset] = frozenset({"orpo_l_or", "orpo_nll_chosen", "orpo_log_odds_ratio"})

    def __post_init__(self):
        if not self.lam >= 0:
            raise ConfigError(f"ORPO: lam (λ) must be >= 0, got {self.lam}")

    def _pairs(self, ctx) -> tuple[list[int], list[int]]:
        rollout = getattr(ctx, "rollout", None)
        writers = getattr(rollout, "row_writers", ()) or ()
        chosen = [b for b, w in enumerate(writers) if w == self.chosen]
        rejected = [b for b, w in enumerate(writers) if w == self.rejected]
        if not chosen or len(chosen) != len(rejected):
            raise ConfigError(
                f"ORPO needs a paired rollout with one {self.chosen!r} and one "
                f"{self.rejected!r} row per prompt (prefixes=Paired((teacher(), student())))"
                f"; got writers {sorted(set(writers)) or 'none'}"
            )
        return chosen, rejected

    def __call__(self, student, teacher, ctx) -> Tensor:
        chosen, rejected = self._pairs(ctx)
        logq_N = student_token_logprobs(student, ctx)
        B = len(ctx.rollout.row_writers)
        row_N = student.row_index_N
        sum_B = torch.zeros(B, dtype=logq_N.dtype, device=logq_N.device).index_add(0, row_N, logq_N)
        len_B = torch.bincount(row_N, minlength=B).to(logq_N.dtype)
        mean_B = sum_B / len_B.clamp_min(1.0)
        w_P = torch.tensor(chosen, device=logq_N.device)
        l_P = torch.tensor(rejected, device=logq_N.device)
        loss_P, l_or_P = orpo_pair_loss(mean_B[w_P], mean_B[l_P], self.lam)
        valid_P = (len_B[w_P] > 0) & (len_B[l_P] > 0)
        loss_P = torch.where(valid_P, loss_P, torch.zeros_like(loss_P))
        pair_of_row_B = torch.zeros(B, dtype=torch.long, device=logq_N.device)
        pair_of_row_B[w_P] = torch.arange(len(chosen), device=logq_N.device)
        pair_of_row_B[l_P] = torch.arange(len(rejected), device=logq_N.device)
        if bool(valid_P.any()):
            ratio_P = log_odds(mean_B[w_P]) - log_odds(mean_B[l_P])
            ctx.log("orpo_l_or", l_or_P[valid_P].mean().detach())
            ctx.log("orpo_nll_chosen", (-mean_B[w_P])[valid_P].mean().detach())
            ctx.log("orpo_log_odds_ratio", ratio_P[valid_P].mean().detach())
        return loss_P[pair_of_row_B[row_N]]

    def describe(self) -> str:
        return (
            f"ORPO: −mean log q(y_{self.chosen}) + {self.lam}·(−log σ(log odds(y_{self.chosen})"
            f" − log odds(y_{self.rejected}))), P = length-normalised sequence probability"
        )
