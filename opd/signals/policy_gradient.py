"""Policy-gradient signals: sampled-token and sequence-level surrogates per completion token.

Every signal here returns a per-token (N,) surrogate, never reduced; the loop multiplies it by
the token weights (including the sampler's importance weights `rollout.token_weight_BT`) and
takes the token mean. Notation: q = student, p = teacher, y_t the written token,
log q_t = log q(y_t | x, y<t) (from `opd.losses.chunked_token_logprobs`, with gradient),
log p_t the teacher's (from the teacher scores, no gradient), sg(·) = stop-gradient. Future
sums run over the counted tokens of the same sequence (rows from `StudentRows.row_index_N`):

    R^γ_t      = Σ_{t' ≥ t} γ^{t'−t} r_{t'}                 (reward-to-go, discount γ)
    R^{γ,K}_t  = Σ_{t'=t}^{t+K−1} γ^{t'−t} r_{t'}           (K-step return, KETCHUP)

SampledRKL(discount γ)        tinker-cookbook on-policy distillation (Lu & Thinking Machines 2025)
    a_t = −(log q_t − log p_t) (detached);  A_t = R^γ_t over a (γ = 0: A_t = a_t)
    loss_t = −A_t · log q_t
    With γ = 1, E_{y~q}[Σ_t ∇ loss_t] = ∇ KL(q(y|x) ‖ p(y|x)) exactly (sequence reverse KL;
    the tests check this by enumeration). γ = 0 is tinker's default (per-token advantage).

GOPD(λ, kl_coef β)            G-OPD / ExOPD, Yang et al. 2026 (arXiv 2602.12125)
    Paper objective: max E_{y~π_θ}[ λ·log(π*(y)/π_ref(y)) − KL(π_θ ‖ π_ref) ]. Its per-token
    (dense) sampled form, used here:
    A_t = λ·(log p_t − log π_ref,t) − β·(log q_t − log π_ref,t);  loss_t = −sg(A_t)·log q_t
    β = 1 is the paper's (unit KL weight); λ = β = 1 is OPD (π_ref cancels, A_t = log p_t −
    log q_t, and the reference is then never run); λ > 1 is ExOPD (reward extrapolation).
    π_ref defaults to a frozen copy of the student made at the first call (the initial
    student): one extra copy of the student's weights in memory (no gradients, no optimizer
    state; 135M parameters in float32 = 540 MB) and one extra forward per micro-batch.

MiniLLMPolicyGradient(...)    Gu et al., MiniLLM, ICLR 2024 (arXiv 2306.08543)
    r_t = log p_t − log q_t (detached).  Gradient of KL(q(y|x) ‖ p(y|x)) decomposed as
    ∇ = E[ Σ_t ∇ KL(q_t ‖ p_t) ]  (single step, exact over V)  −  E[ Σ_t R_{t+1} ∇ log q_t ]
    with the paper's length-normalised R^norm_{t+1} = mean of r over the tokens after t.
    loss_t = KL(q_t ‖ p_t) + max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε)) / w_t,
    A_t = R^norm_{t+1} (optionally whitened), ρ_t = w_t · q_t/sg(q_t), w_t the sampler weight
    q/(α p + (1−α) q) of teacher-mixed sampling. The loop multiplies every token by w_t, so
    the single-step term carries w_t (as in the paper) and the clipped term is exactly PPO's
    clip of ρ_t (dividing by w_t undoes the loop's factor). With γ = 1, no length norm, no
    whitening and w = 1 the expected gradient is exactly ∇ KL(q(y) ‖ p(y)) (tested).

Ketchup(k)                    Fan et al., KETCHUP, Findings of EACL 2026 (arXiv 2504.19024)
    MiniLLM with the K-step return R^{γ,K}_{t+1} in place of the full reward-to-go.

Reopold(λ, top_entropy)       Ko et al. 2026, Relaxed On-Policy Distillation (arXiv 2603.11137)
    r̂_t = max(log p_t − log q_t, log(λ/(1−λ))) (detached; mixture-based clipping from below:
    the floor is reached when the teacher's share p/(p+q) of the pair falls to λ)
    loss_t = −r̂_t · log q_t on the fraction `top_entropy` of tokens with the highest student
    entropy H(q_t) in the micro-batch (rescaled so the token mean is over the kept tokens).
    After progress `refine_after` the clipping and selection switch off (plain OPD).

RewardWeighted(β, kl)         survey eq. 29–30: max E[R(x,y)] − β Σ_t KL(q_t ‖ p_t)
    loss_t = −(R − mean_batch R) · log q_t + β · KL_t, R = verify(decode(y), answer) ∈ {0, 1};
    KL_t = KL(q_t ‖ p_t) over V (kl="full") or its sampled surrogate (log q_t − log p_t)·log q_t
    (kl="sampled", the SampledRKL loss). The batch mean reward is logged as `reward_mean`.

Deviations and what was checked (read from the papers' public pages and, for MiniLLM, the
authors' code, microsoft/LMOps minillm/; no code copied):
- SampledRKL: tinker computes the loss as −A_t · q_t/q_old,t (importance sampling); on fresh
  samples that has the same value-at-q_old gradient as −A_t · log q_t, used here.
- GOPD: the paper's objective is verified (abstract/summary); the per-token reward form and
  the KL in reward form (not a separate k3 loss) are our reading. ExOPD's λ default (1.25 in
  the exopd recipe) is not verified.
- MiniLLM: follows the paper's decomposition (R_{t+1}, analytic single step weighted by w_t).
  The official code instead puts r_t itself into the return (R_t, counted from t) *and* adds
  the analytic single-step term unweighted, uses γ = 0.95, divides rewards by 0.5 and clips
  them at ±100, runs 4 PPO epochs per rollout batch and adds a pre-training LM loss; we keep
  its whitening (default on) and clip range ε = 0.2, and omit the rest (one pass per rollout,
  so ρ = w in value). Whitening uses the mean and (biased) standard deviation over the
  counted tokens of the micro-batch only, never padding.
- SampledRKL: opd's loop takes the token mean of the per-token losses; tinker sums them
  (same direction, gradient scale differs by the number of counted tokens).
- KETCHUP: we could not verify the paper's exact K-step target (it induces the return from
  the Bellman optimality equation, possibly with a teacher-derived bootstrap value at t+K);
  this is the plain truncated K-step sum of MiniLLM rewards, no bootstrap. Default k unverified.
- REOPOLD: the clipping floor log(λ/(1−λ)) is taken from a secondary summary of the paper;
  λ = 0.2, the entropy fraction 0.2 and the refinement switch point are our defaults, not
  verified against the paper.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from opd.context import StepContext
from opd.errors import ConfigError
from opd.losses.divergences import check_unit_interval as _unit
from opd.signals.divergence import Divergence
from opd.signals.tokens import (
    future_returns,
    sampler_weights,
    student_entropy,
    student_token_logprobs,
    teacher_token_logprobs,
    whiten,
)
from opd.teachers.sampled import SampledLogprobs
from opd.types import StudentRows, TeacherScores

_REVERSE_KL = Divergence("reverse_kl")  # KL(q_student ‖ p_teacher) over V, chunked or plain


def check_unit_interval(name: str, value: float) -> None:
    """`opd.losses.divergences.check_unit_interval` raising ConfigError (a user's value)."""
    _unit(name, value, error=ConfigError)


# --- the signals -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SampledRKL:
    """−A_t · log q(y_t) with A_t = −(log q − log p)(y_t), optionally discounted future sums.

    Attributes:
      discount: γ in [0, 1]; 0 = per-token advantage (tinker's default), 1 = full future sum
        (the unbiased gradient of the sequence reverse KL).
    """

    discount: float = 0.0
    requires: ClassVar[frozenset] = frozenset({"token_logprobs"})

    def __post_init__(self):
        check_unit_interval("SampledRKL: discount", self.discount)

    def __call__(self, student: StudentRows, teacher: TeacherScores, ctx: StepContext) -> Tensor:
        logq_N = student_token_logprobs(student, ctx)
        logp_N = teacher_token_logprobs(teacher, student, ctx).to(logq_N.dtype)
        a_N = -(logq_N.detach() - logp_N)
        if self.discount > 0:
            a_N = future_returns(a_N, student.row_index_N, self.discount)
        return -a_N * logq_N

    def describe(self) -> str:
        return f"sampled reverse KL as advantage (discount={self.discount})"


@dataclass(frozen=True)
class GOPD:
    """G-OPD: A_t = λ(log p − log π_ref) − β(log q − log π_ref); loss −A_t log q(y_t).

    Attributes:
      lam: reward scale λ (1 = OPD, > 1 = ExOPD reward extrapolation).
      kl_coef: β, the weight of KL(π_θ ‖ π_ref) (the paper fixes it at 1).
      discount: γ for future sums of A (0 = per token).
      reference: the reference model; None = a frozen copy of the initial student.
    """

    lam: float = 1.0
    kl_coef: float = 1.0
    discount: float = 0.0
    reference: object = field(default=None, compare=False, repr=False)
    requires: ClassVar[frozenset] = frozenset({"token_logprobs"})
    _cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self):
        if self.lam < 0 or self.kl_coef < 0:
            raise ConfigError(f"GOPD: lam and kl_coef must be >= 0, got {self.lam}, {self.kl_coef}")
        check_unit_interval("GOPD: discount", self.discount)

    def prepare(self, models) -> None:
        """Called by the loop before any update (and before a checkpoint is restored), so
        the reference is the initial student also in a resumed run."""
        if self.reference is None and self.lam != self.kl_coef and "model" not in self._cache:
            ref = copy.deepcopy(models.student).eval()
            ref.requires_grad_(False)
            self._cache["model"] = ref

    def reference_model(self, ctx: StepContext) -> torch.nn.Module:
        if self.reference is not None:
            return self.reference
        if "model" not in self._cache:
            if ctx.models is None:
                raise ConfigError(
                    "GOPD needs a reference model: pass reference= or run via distill"
                )
            ref = copy.deepcopy(ctx.models.student).eval()  # the student before any update
            ref.requires_grad_(False)
            self._cache["model"] = ref
        return self._cache["model"]

    def __call__(self, student: StudentRows, teacher: TeacherScores, ctx: StepContext) -> Tensor:
        logq_N = student_token_logprobs(student, ctx)
        logp_N = teacher_token_logprobs(teacher, student, ctx).to(logq_N.dtype)
        if self.lam == self.kl_coef:  # π_ref cancels: A = λ(log p − log q)
            a_N = self.lam * (logp_N - logq_N.detach())
        else:
            if ctx.rollout is None:
                raise ConfigError("GOPD with lam != kl_coef needs ctx.rollout to run the reference")
            ref = self.reference_model(ctx)
            scores = SampledLogprobs(ctx.chunk_size).score(
                ref, ctx.rollout, student.head_VD.shape[0]
            )
            logr_N = scores.token_logprobs_N.to(logq_N.dtype)
            a_N = self.lam * (logp_N - logr_N) - self.kl_coef * (logq_N.detach() - logr_N)
        if self.discount > 0:
            a_N = future_returns(a_N, student.row_index_N, self.discount)
        return -a_N * logq_N

    def describe(self) -> str:
        return f"G-OPD reward λ={self.lam}, KL(π_θ ‖ π_ref) weight {self.kl_coef}"


@dataclass(frozen=True)
class MiniLLMPolicyGradient:
    """MiniLLM: analytic single-step KL(q_t ‖ p_t) + clipped policy gradient on R^norm_{t+1}.

    Attributes:
      discount: γ of the reward-to-go (paper: 1; official code: 0.95).
      length_norm: average the future rewards instead of summing them (paper: on).
      whiten: standardise the advantages over the micro-batch (official code: on).
      clip: ε of the importance-ratio clip [1 − ε, 1 + ε] (0.2).
      single_step: add the analytic single-step term (needs full teacher logits).
    """

    discount: float = 1.0
    length_norm: bool = True
    whiten: bool = True
    clip: float = 0.2
    single_step: bool = True
    requires: ClassVar[frozenset] = frozenset({"full_logits"})

    def __post_init__(self):
        check_unit_interval("MiniLLM: discount", self.discount)
        if not self.clip > 0:
            raise ConfigError(f"MiniLLM: clip must be > 0, got {self.clip}")

    @property
    def horizon(self) -> int | None:
        return None

    def __call__(self, student: StudentRows, teacher: TeacherScores, ctx: StepContext) -> Tensor:
        logq_N = student_token_logprobs(student, ctx)
        logp_N = teacher_token_logprobs(teacher, student, ctx).to(logq_N.dtype)
        r_N = logp_N - logq_N.detach()
        adv_N = future_returns(
            r_N,
            student.row_index_N,
            self.discount,
            self.horizon,
            exclude_current=True,
            length_norm=self.length_norm,
        )
        if self.whiten:
            adv_N = whiten(adv_N)
        w_N = sampler_weights(ctx, logq_N).clamp_min(1e-8)
        ratio_N = w_N * torch.exp(logq_N - logq_N.detach())  # value w, gradient w ∇log q
        clipped_N = ratio_N.clamp(1.0 - self.clip, 1.0 + self.clip)
        pg_N = torch.maximum(-adv_N * ratio_N, -adv_N * clipped_N) / w_N
        if not self.single_step:
            return pg_N
        return _REVERSE_KL(student, teacher, ctx).to(pg_N.dtype) + pg_N

    def describe(self) -> str:
        k = f", {self.horizon}-step return" if self.horizon else ""
        return (
            f"MiniLLM policy gradient (discount={self.discount}, length_norm={self.length_norm}, "
            f"whiten={self.whiten}, clip={self.clip}{k})"
        )


@dataclass(frozen=True)
class Ketchup(MiniLLMPolicyGradient):
    """KETCHUP: MiniLLM with the K-step return R^{γ,K}_{t+1} instead of the full one.

    Attributes:
      k: the return's horizon K ≥ 1 (k ≥ T is MiniLLM).
    """

    k: int = 8

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"Ketchup: k must be an integer >= 1, got {self.k!r}")

    @property
    def horizon(self) -> int | None:
        return self.k


@dataclass(frozen=True)
class Reopold:
    """REOPOLD: reward log p − log q clipped below at log(λ/(1−λ)), high-entropy tokens only.

    Attributes:
      lam: mixture weight λ in (0, 1) of the clipping floor log(λ/(1−λ)).
      top_entropy: fraction of tokens (highest student entropy) that get a gradient; 1 = all.
      refine_after: training progress in [0, 1] after which clipping and selection stop
        (plain sampled-token OPD); 1 = never.
    """

    lam: float = 0.2
    top_entropy: float = 0.2
    refine_after: float = 1.0
    requires: ClassVar[frozenset] = frozenset({"token_logprobs"})

    def __post_init__(self):
        if not 0.0 < self.lam < 1.0:
            raise ConfigError(f"Reopold: lam must be in (0, 1), got {self.lam}")
        if not 0.0 < self.top_entropy <= 1.0:
            raise ConfigError(f"Reopold: top_entropy must be in (0, 1], got {self.top_entropy}")
        check_unit_interval("Reopold: refine_after", self.refine_after)

    @property
    def floor(self) -> float:
        return math.log(self.lam / (1.0 - self.lam))

    def __call__(self, student: StudentRows, teacher: TeacherScores, ctx: StepContext) -> Tensor:
        logq_N = student_token_logprobs(student, ctx)
        logp_N = teacher_token_logprobs(teacher, student, ctx).to(logq_N.dtype)
        r_N = logp_N - logq_N.detach()
        if ctx.progress >= self.refine_after and self.refine_after < 1.0:
            return -r_N * logq_N
        loss_N = -r_N.clamp_min(self.floor) * logq_N
        n = loss_N.shape[0]
        n_keep = max(1, math.ceil(self.top_entropy * n))
        if self.top_entropy >= 1.0 or n == 0:
            return loss_N
        entropy_N = student_entropy(student, ctx.chunk_size)
        keep_N = torch.zeros_like(loss_N)
        keep_N[entropy_N.topk(n_keep).indices] = n / n_keep  # token mean over the kept ones
        return loss_N * keep_N

    def describe(self) -> str:
        return (
            f"REOPOLD reward clip ≥ log(λ/(1−λ)) = {self.floor:.3f}, top {self.top_entropy:.0%} "
            f"entropy tokens, refine after {self.refine_after:.0%}"
        )


@dataclass(frozen=True)
class RewardWeighted:
    """−(R − mean R) · log q(y_t) + β · KL(q_t ‖ p_t), R from the task's verifier.

    Attributes:
      beta: β, the weight of the per-token reverse KL to the teacher.
      kl: "full" (exact over V, needs full logits) or "sampled" (SampledRKL's surrogate).
    """

    beta: float = 1.0
    kl: str = "full"
    logs: ClassVar[frozenset] = frozenset({"reward_mean"})  # opd.parts.LogsMetrics

    def __post_init__(self):
        if self.kl not in ("full", "sampled"):
            raise ConfigError(f"RewardWeighted: kl must be 'full' or 'sampled', got {self.kl!r}")
        if self.beta < 0:
            raise ConfigError(f"RewardWeighted: beta must be >= 0, got {self.beta}")

    @property
    def requires(self) -> frozenset:
        return frozenset({"full_logits" if self.kl == "full" else "token_logprobs"})

    def rewards(self, ctx: StepContext, device) -> Tensor:
        """(B,) 1.0 where the verifier accepts row b's decoded completion, else 0.0."""
        rollout = ctx.rollout
        if rollout is None or ctx.tokenizer is None or ctx.verify is None:
            raise ConfigError("RewardWeighted needs ctx.rollout, ctx.tokenizer and ctx.verify")
        ids_BT, mask_BT = rollout.completion_ids_BT, rollout.completion_mask_BT.bool()
        if len(rollout.answers) != ids_BT.shape[0] or any(a is None for a in rollout.answers):
            raise ConfigError("RewardWeighted needs an 'answer' for every prompt row")
        rewards = []
        for b in range(ids_BT.shape[0]):
            text = ctx.tokenizer.decode(ids_BT[b][mask_BT[b]].tolist(), skip_special_tokens=True)
            rewards.append(float(bool(ctx.verify(text, rollout.answers[b]))))
        return torch.tensor(rewards, device=device)

    def __call__(self, student: StudentRows, teacher: TeacherScores, ctx: StepContext) -> Tensor:
        logq_N = student_token_logprobs(student, ctx)
        R_B = self.rewards(ctx, logq_N.device).to(logq_N.dtype)
        ctx.log("reward_mean", R_B.mean())  # mean verifier reward of this micro-batch
        pg_N = -(R_B - R_B.mean())[student.row_index_N] * logq_N
        if self.kl == "full":
            kl_N = _REVERSE_KL(student, teacher, ctx).to(pg_N.dtype)
        else:
            logp_N = teacher_token_logprobs(teacher, student, ctx).to(logq_N.dtype)
            kl_N = (logq_N.detach() - logp_N) * logq_N  # SampledRKL's surrogate, γ = 0
        return pg_N + self.beta * kl_N

    def describe(self) -> str:
        return (
            f"verifier reward policy gradient + {self.beta}·KL(q_student ‖ p_teacher) ({self.kl})"
        )
