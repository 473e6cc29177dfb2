"""Token weights: per-token multipliers w_t on any signal (docs/methods.md §3).

The loop computes `values_N = method.signal(...)` and then, for each weight in
`method.weights`, `w_N *= weight(values_N, student, teacher, rollout, ctx)`; the loss is
reduce(w_N · values_N). A weight is a frozen dataclass that returns a detached (N,) tensor on
the device and in the dtype of `values_N`; it never reduces and never carries a gradient.
A weight that needs the teacher's logits says so with `requires = frozenset({"full_logits"})`, and `Method`
checks that against the teacher access at construction.

    SpecialTokenMask(ids, keep_stop)   w_t = 0 where the target y_t is a special/template token.
                                       Fu et al., "Revisiting On-Policy Distillation: Empirical
                                       Failure Modes and Simple Fixes", arXiv 2603.25562 (2026).
    AdaKD(metric, focus)               w_t = s_t / mean_kept(s) on the `focus` fraction of tokens
                                       with the largest difficulty s_t (Hellinger distance
                                       between p_t and q_t by default), 0 elsewhere.
                                       Xie et al., "LLM-Oriented Token-Adaptive Knowledge
                                       Distillation", arXiv 2510.11615 (AAAI 2026).
    SelecTKD(rho, by)                  w_t ∈ {0, 1}: keep the fraction ρ of tokens with the
                                       largest learning value (D_t by default).
    SelecTKDVerify(k, reject_weight)   w_t = 1 if the student's proposal at t is in the
                                       teacher's top-k, else `reject_weight` (greedy Top-k).
                                       Huang et al., "SelecTKD: Selective Token-Weighted
                                       Knowledge Distillation for LLMs", arXiv 2510.24021 (2025).
    EntropyBand(low, high)             w_t = 1[low ≤ H(p_t) ≤ high], teacher entropy in nats.

Teacher statistics (entropy, Hellinger distance, top-k membership) are computed from
`hidden_ND @ head_VD.T` in row chunks under no_grad, so no (N, V) tensor is ever held;
`teacher_entropy` and `hellinger_distance` have plain reference twins in the tests.

Deviations and choices (papers read through their abstracts, summaries and, for AdaKD, the
authors' public code; each point says what is and is not verified):

- SpecialTokenMask: the paper masks special tokens because teacher and student may disagree
  on template tokens (chat markers, thinking tags). By default we mask
  `tokenizer.all_special_ids` *except* the stop ids (eos and the chat end-of-turn token):
  stopping is a real decision the student must learn, and with a shared tokenizer the teacher
  scores it meaningfully. `keep_stop=False` masks those too (the literal "all special tokens").
- AdaKD: the paper's difficulty metric is the Hellinger distance (verified) and its LATF module
  keeps the hardest tokens, with the kept fraction adapted from the loss's stability; we keep
  a fixed (or scheduled: `focus` may be an `opd.signals.Linear`) fraction. Within the kept
  tokens we weight proportionally to difficulty, normalised to mean 1 (the "first form" of
  the equation sheet opd was specified from; the paper's code weights kept tokens equally). The paper's Inverse Difficulty
  Temperature Scaling (a per-token temperature inside the divergence) is not a token weight
  and is not implemented. The survey's "low student confidence" upweighting is not a separate
  term in the paper: a low-confidence student has a large Hellinger distance.
- SelecTKD: the paper selects by propose-and-verify (`SelecTKDVerify`): the student proposes
  a token, the teacher accepts it if it is in its top-k; rejected tokens get weight β (0 =
  masked). Its default k and β, and the non-greedy Spec-k variant, are not verified / not
  implemented. `SelecTKD(rho)` is the survey's description (docs/methods.md §3) ("keep the fraction
  ρ with the highest learning value"), kept as its own weight.
- Ties at a selection boundary are broken by `torch.topk` (stable for a fixed input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from opd.errors import ConfigError
from opd.signals.schedules import resolve
from opd.signals.tokens import row_entropy, row_stat
from opd.types import Rollout, StudentRows, TeacherScores

FULL_LOGITS = frozenset({"full_logits"})

SCORES = ("signal", "hellinger")

# ---------------------------------------------------------------------------------------------
# Row-chunked statistics of the logits (no grad, no (N, V) tensor)


def teacher_entropy(
    teacher: TeacherScores, temperature: float = 1.0, chunk_size: int = 512
) -> Tensor:
    """H(p_t) = −Σ_v p_v log p_v per counted token, p = softmax(teacher logits / τ), in nats.

    Args:
      teacher: white-box scores (hidden_ND, head_VD).
      temperature: τ > 0.
      chunk_size: rows per chunk.

    Returns:
      (N,) entropies, detached; 0 for a one-hot teacher, log V for a uniform one.
    """

    return row_entropy(teacher.hidden_ND, teacher.head_VD, temperature, chunk_size)


def hellinger_distance(
    student: StudentRows, teacher: TeacherScores, temperature: float = 1.0, chunk_size: int = 512
) -> Tensor:
    """Hellinger distance H(p_t, q_t) = (1/√2)·‖√p − √q‖₂ per counted token, in [0, 1].

    AdaKD's token difficulty (Xie et al., 2025): symmetric and bounded.

    Returns:
      (N,) distances, detached.
    """

    def hellinger(logits_s, logits_t, _start, _end):
        sqrt_q = torch.softmax(logits_s / temperature, dim=-1).sqrt()
        sqrt_p = torch.softmax(logits_t / temperature, dim=-1).sqrt()
        return ((sqrt_p - sqrt_q).pow(2).sum(-1) / 2).clamp(0.0, 1.0).sqrt()

    return row_stat(
        hellinger,
        chunk_size,
        (student.hidden_ND, student.head_VD),
        (teacher.hidden_ND, teacher.head_VD),
    )


def _needs_teacher_logits(teacher: TeacherScores, who: str) -> None:
    if teacher.hidden_ND is None or teacher.head_VD is None:
        raise ConfigError(f"{who} needs the teacher's full logits (hidden_ND, head_VD)")


def _top_fraction(scores_N: Tensor, fraction: float) -> Tensor:
    """Bool (N,): True on the ceil(fraction·N) largest scores (at least one when N > 0)."""
    n = scores_N.shape[0]
    keep = torch.zeros(n, dtype=torch.bool, device=scores_N.device)
    if n == 0 or fraction <= 0:
        return keep
    count = min(n, max(1, math.ceil(fraction * n)))
    keep[scores_N.topk(count).indices] = True
    return keep


def _resolve(value, ctx) -> float:
    """A number, or a schedule evaluated at the context's progress (`opd.signals.resolve`)."""
    return float(resolve(value, ctx.progress))


def _check_fraction(name: str, value) -> None:
    probes = (value.at(0.0), value.at(1.0)) if hasattr(value, "at") else (value,)
    if any(not 0.0 < float(v) <= 1.0 for v in probes):
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}")


def _scores(by: str, values_N: Tensor, student, teacher, ctx) -> Tensor:
    if by == "signal":  # a signal may be negative (an advantage); difficulty is its positive part
        return values_N.detach().float().clamp_min(0.0)
    _needs_teacher_logits(teacher, "score 'hellinger'")
    return hellinger_distance(student, teacher, chunk_size=ctx.chunk_size).to(values_N.device)


# ---------------------------------------------------------------------------------------------
# The weights


@dataclass(frozen=True)
class SpecialTokenMask:
    """w_t = 0 where the target token y_t is a special/template token, else 1.

    Attributes:
      ids: the token ids to mask; None uses `ctx.tokenizer.all_special_ids`.
      keep_stop: keep (do not mask) the stop ids, eos and the chat end-of-turn token, so the
        student still learns when to stop. Applies to the default ids only.
    """

    ids: tuple | None = None
    keep_stop: bool = True
    requires: ClassVar[frozenset] = frozenset()

    def __post_init__(self):
        if self.ids is not None:
            object.__setattr__(self, "ids", tuple(int(i) for i in self.ids))

    def masked_ids(self, tokenizer) -> tuple[int, ...]:
        """The ids this mask zeroes for `tokenizer`."""
        if self.ids is not None:
            return self.ids
        if tokenizer is None:
            raise ConfigError(
                "SpecialTokenMask: no tokenizer in the signal context; pass ids=(...) explicitly"
            )
        from opd.data import end_of_turn_ids

        keep = set(end_of_turn_ids(tokenizer)) if self.keep_stop else set()
        return tuple(sorted(set(tokenizer.all_special_ids) - keep))

    def __call__(
        self, values_N, student: StudentRows, teacher: TeacherScores, rollout: Rollout, ctx
    ):
        ids = self.masked_ids(ctx.tokenizer)
        targets_N = student.target_ids_N.to(values_N.device)
        special_N = torch.isin(
            targets_N, torch.tensor(ids, dtype=targets_N.dtype, device=targets_N.device)
        )
        return (~special_N).to(values_N.dtype)

    def describe(self) -> str:
        which = f"ids={list(self.ids)}" if self.ids is not None else "tokenizer special ids"
        stop = ", stop tokens kept" if self.keep_stop and self.ids is None else ""
        return f"special-token mask ({which}{stop})"


@dataclass(frozen=True)
class AdaKD:
    """AdaKD-style difficulty weights: w_t = s_t / mean_{kept}(s) on the hardest tokens.

    s_t is the token difficulty: the Hellinger distance H(p_t, q_t) ("hellinger", the paper's
    metric) or the signal's own value D_t ("signal"). The `focus` fraction of the batch's
    tokens with the largest s_t is kept (LATF); the rest get 0. On the kept tokens the weights
    average to 1, so the loss scale matches the unweighted signal. If every kept s_t is 0
    (p = q everywhere) the kept tokens get weight 1.

    Attributes:
      metric: "hellinger" (needs teacher logits) or "signal".
      focus: fraction of tokens kept, in (0, 1]; a number or a schedule (`opd.signals.Linear`).
      proportional: weight kept tokens by s_t / mean(s) (True) or equally (False, as the
        authors' code does).
    """

    metric: str = "hellinger"
    focus: object = 1.0
    proportional: bool = True

    def __post_init__(self):
        if self.metric not in SCORES:
            raise ConfigError(f"AdaKD: metric must be one of {SCORES}, got {self.metric!r}")
        _check_fraction("AdaKD: focus", self.focus)

    @property
    def requires(self):
        return FULL_LOGITS if self.metric == "hellinger" else frozenset()

    def __call__(self, values_N, student, teacher, rollout, ctx):
        s_N = _scores(self.metric, values_N, student, teacher, ctx)
        keep_N = _top_fraction(s_N, _resolve(self.focus, ctx))
        w_N = keep_N.to(s_N.dtype)
        if self.proportional and keep_N.any():
            mean = s_N[keep_N].mean()
            if mean > 0:
                w_N = torch.where(keep_N, s_N / mean, 0.0)
        return w_N.to(values_N.dtype)

    def describe(self) -> str:
        how = "∝ difficulty, mean 1" if self.proportional else "kept tokens weighted 1"
        return f"AdaKD({self.metric}, focus={self.focus}, {how})"


@dataclass(frozen=True)
class SelecTKD:
    """Keep the fraction ρ of tokens with the largest learning value; w_t ∈ {0, 1}.

    Attributes:
      rho: ρ in (0, 1], the fraction kept (at least one token per batch); a number or a
        schedule.
      by: the learning value: "signal" (D_t, the default) or "hellinger".
    """

    rho: object = 0.5
    by: str = "signal"

    def __post_init__(self):
        if self.by not in SCORES:
            raise ConfigError(f"SelecTKD: by must be one of {SCORES}, got {self.by!r}")
        _check_fraction("SelecTKD: rho", self.rho)

    @property
    def requires(self):
        return FULL_LOGITS if self.by == "hellinger" else frozenset()

    def __call__(self, values_N, student, teacher, rollout, ctx):
        s_N = _scores(self.by, values_N, student, teacher, ctx)
        return _top_fraction(s_N, _resolve(self.rho, ctx)).to(values_N.dtype)

    def describe(self) -> str:
        return f"SelecTKD(keep top ρ={self.rho} by {self.by})"


@dataclass(frozen=True)
class SelecTKDVerify:
    """SelecTKD's greedy Top-k propose-and-verify: accept a token the teacher ranks top-k.

    The student's proposal at position t is the written token y_t ("written": on student
    rollouts this is the student's own sample) or its argmax ("greedy"). Accepted tokens get
    weight 1, rejected ones `reject_weight` (0 masks them).

    Attributes:
      k: the teacher's top-k set size, ≥ 1.
      reject_weight: β in [0, 1], the weight of rejected tokens.
      proposal: "written" or "greedy".
    """

    k: int = 5
    reject_weight: float = 0.0
    proposal: str = "written"
    requires: ClassVar[frozenset] = FULL_LOGITS

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"SelecTKDVerify: k must be an integer >= 1, got {self.k!r}")
        if not 0.0 <= self.reject_weight <= 1.0:
            raise ConfigError(
                f"SelecTKDVerify: reject_weight must be in [0, 1], got {self.reject_weight}"
            )
        if self.proposal not in ("written", "greedy"):
            raise ConfigError(
                f"SelecTKDVerify: proposal must be 'written' or 'greedy', got {self.proposal!r}"
            )

    def accepted(
        self, student: StudentRows, teacher: TeacherScores, chunk_size: int = 512
    ) -> Tensor:
        """Bool (N,): whether each proposal is among the teacher's k most likely tokens."""
        _needs_teacher_logits(teacher, "SelecTKDVerify")
        if self.proposal == "greedy":
            proposal_N = row_stat(
                lambda z, *_: z.argmax(-1).to(z.dtype),
                chunk_size,
                (student.hidden_ND, student.head_VD),
            ).long()
        else:
            proposal_N = student.target_ids_N.to(teacher.hidden_ND.device)

        def in_topk(logits_t, start, end):
            k = min(self.k, logits_t.shape[-1])
            kth_C = logits_t.topk(k, dim=-1).values[:, -1]
            mine_C = logits_t.gather(-1, proposal_N[start:end, None].to(logits_t.device))[:, 0]
            return (mine_C >= kth_C).to(logits_t.dtype)

        return row_stat(in_topk, chunk_size, (teacher.hidden_ND, teacher.head_VD)).bool()

    def __call__(self, values_N, student, teacher, rollout, ctx):
        ok_N = self.accepted(student, teacher, ctx.chunk_size).to(values_N.device)
        return torch.where(ok_N, 1.0, self.reject_weight).to(values_N.dtype)

    def describe(self) -> str:
        return (
            f"SelecTKD verify ({self.proposal} proposal in teacher top-{self.k}; "
            f"rejected weight {self.reject_weight})"
        )


@dataclass(frozen=True)
class EntropyBand:
    """Keep tokens whose teacher entropy H(p_t) (nats) lies in [low, high]; w_t ∈ {0, 1}.

    Attributes:
      low, high: the band, 0 ≤ low ≤ high (high may be inf).
      temperature: τ applied to the teacher logits before the entropy.
    """

    low: float = 0.0
    high: float = math.inf
    temperature: float = 1.0
    requires: ClassVar[frozenset] = FULL_LOGITS

    def __post_init__(self):
        if not 0.0 <= self.low <= self.high:
            raise ConfigError(
                f"EntropyBand: need 0 <= low <= high, got low={self.low}, high={self.high}"
            )
        if not self.temperature > 0:
            raise ConfigError(f"EntropyBand: temperature must be > 0, got {self.temperature}")

    def __call__(self, values_N, student, teacher, rollout, ctx):
        _needs_teacher_logits(teacher, "EntropyBand")
        h_N = teacher_entropy(teacher, self.temperature, ctx.chunk_size).to(values_N.device)
        return ((h_N >= self.low) & (h_N <= self.high)).to(values_N.dtype)

    def describe(self) -> str:
        return f"teacher-entropy band [{self.low}, {self.high}] nats"
