"""`TopKDivergence`: a divergence between the teacher's top-k (+ tail) and the student, per token.

With top-k teacher access (`opd.teachers.TopK`) the teacher's distribution is known on k + 1
buckets: its k most likely tokens S_t and one tail bucket for everything else. The student's
distribution is collapsed onto the same buckets,

    p̂_t = ( p_v for v ∈ S_t ,  1 − Σ_{v∈S_t} p_v )          (teacher, from TopK)
    q̂_t = ( q_v for v ∈ S_t ,  Σ_{v∉S_t} q_v )              (student, q = softmax(z_S / τ))

and any registered divergence D (`opd.losses.DIVERGENCES`) is taken between the two (k + 1)-way
distributions: D_t = D(p̂_t, q̂_t), e.g. forward_kl = KL(p̂_teacher ‖ q̂_student), reverse_kl =
KL(q̂_student ‖ p̂_teacher). By the chain rule of KL, KL(p̂ ‖ q̂) ≤ KL(p ‖ q); with k = V the
tail is empty and D_t equals the full-vocabulary divergence (a test pins this).

The student's tail Σ_{v∉S} q_v is a logsumexp over the non-top-k log-probabilities (exact, no
1 − Σ cancellation). Empty buckets get log-mass TAIL_FLOOR (exp = 0, but finite) so that
0·log 0 never becomes NaN.

Memory: the student's bucket log-probabilities are computed in row chunks of C rows. Each chunk
runs under `torch.utils.checkpoint`, so its (C, V) logits and log-softmax are freed after the
forward and recomputed in the backward; peak memory is one chunk, never (N, V). The plain twin
`bucket_logprobs(logits_NV, ...)` is what each chunk runs, and the tests compare the two in
value and gradient (float64). With full-logits access the teacher's top-k is computed on the
fly (`teacher_topk_buckets`, also chunked), so the same signal works with `FullLogits`.

Deviation note: the survey's top-k methods (e.g. Fu et al. 2026, `topk_reverse_kl`) renormalise
both models on the support and drop the tail; this signal keeps the tail bucket, as the
top-k-with-remainder form used by served-teacher distillation. Use `topk_reverse_kl` for the
renormalised form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from opd.context import StepContext
from opd.errors import ConfigError
from opd.losses import divergence
from opd.losses.divergences import log_probs, upcast
from opd.signals.divergence import check_divergence_spec, params_key
from opd.signals.schedules import resolve_params
from opd.teachers.topk import TAIL_FLOOR, teacher_topk_buckets
from opd.types import StudentRows, TeacherScores


def bucket_logprobs(logits_NV: Tensor, ids_NK: Tensor, temperature: float = 1.0) -> Tensor:
    """The student's log-probabilities collapsed onto k token buckets plus a tail bucket.

    Args:
        logits_NV: (N, V) student logits.
        ids_NK: (N, k) token ids of the buckets (distinct per row), in [0, V).
        temperature: τ > 0.

    Returns:
        (N, k + 1): log q_v for the k ids, then log Σ_{v ∉ ids} q_v (≈ TAIL_FLOOR when empty).
    """
    logq_NV = log_probs(logits_NV, temperature)
    head_NK = logq_NV.gather(-1, ids_NK)
    in_topk_NV = torch.zeros_like(logq_NV, dtype=torch.bool).scatter_(-1, ids_NK, True)
    # masked_fill, not −inf: an all-masked row (k = V) then has a finite, gradient-free tail.
    tail_N = torch.logsumexp(logq_NV.masked_fill(in_topk_NV, TAIL_FLOOR), dim=-1)
    return torch.cat([head_NK, tail_N.clamp_min(TAIL_FLOOR)[:, None]], dim=-1)


def _chunk_buckets(hidden_CD: Tensor, head_VD: Tensor, ids_CK: Tensor, temperature: float):
    return bucket_logprobs(hidden_CD @ head_VD.T, ids_CK, temperature)


def chunked_bucket_logprobs(
    hidden_ND: Tensor,
    head_VD: Tensor,
    ids_NK: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 512,
) -> Tensor:
    """`bucket_logprobs(hidden_ND @ head_VD.T, ids_NK, τ)` without holding (N, V) logits.

    Each chunk of C rows is checkpointed: its forward keeps only the (C, k + 1) result, and
    its backward recomputes the (C, V) block once.

    Args:
        hidden_ND: (N, D) student hidden states.
        head_VD: (V, D) student lm_head weight.
        ids_NK: (N, k) bucket token ids.
        temperature: τ > 0.
        chunk_size: rows per chunk C.

    Returns:
        (N, k + 1) log-probabilities, differentiable w.r.t. hidden_ND and head_VD.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    n_rows, k = ids_NK.shape
    if n_rows == 0:
        return upcast(hidden_ND[:0, :1]).expand(0, k + 1)  # keeps the graph for .backward()
    needs_grad = torch.is_grad_enabled() and (hidden_ND.requires_grad or head_VD.requires_grad)
    pieces = []
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        args = (hidden_ND[start:end], head_VD, ids_NK[start:end], temperature)
        if needs_grad:
            pieces.append(checkpoint(_chunk_buckets, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_buckets(*args))
    return torch.cat(pieces, dim=0)


@dataclass(frozen=True)
class TopKDivergence:
    """Divergence `name` between the teacher's top-k + tail buckets and the collapsed student.

    Attributes:
      name: a key of `opd.losses.DIVERGENCES` (forward_kl, reverse_kl, generalized_jsd, ...).
      k: bucket count; None uses the k of the teacher's top-k scores (required with a
        full-logits teacher, which has no top-k of its own).
      temperature: τ for the student (the TopK access applies its own τ to the teacher; set
        both the same).
      params: the divergence's parameters, e.g. {"beta": 0.5}.
    """

    name: str = "forward_kl"
    k: int | None = None
    temperature: float = 1.0
    params: dict = field(default_factory=dict)
    requires: ClassVar[frozenset] = frozenset({"topk_logprobs"})

    def __post_init__(self):
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ConfigError(f"TopKDivergence: k must be an integer >= 1 or None, got {self.k!r}")
        check_divergence_spec(self.name, self.params, self.temperature, "TopKDivergence")

    def __hash__(self):
        return hash((self.name, self.k, self.temperature, params_key(self.params)))

    def teacher_buckets(
        self, teacher: TeacherScores, ctx: StepContext, dtype
    ) -> tuple[Tensor, Tensor]:
        """(ids_NK of the k tokens, (N, k + 1) teacher bucket log-probabilities)."""
        if teacher.topk_logprobs_NK is not None:
            k_teacher = teacher.topk_logprobs_NK.shape[1] - 1
            if self.k is not None and self.k != k_teacher:
                raise ConfigError(
                    f"TopKDivergence(k={self.k}) got teacher top-k scores with k = {k_teacher}; "
                    "set the same k on the signal and on the TopK access (or k=None)"
                )
            return teacher.topk_ids_NK[:, :-1], teacher.topk_logprobs_NK
        if teacher.hidden_ND is None:
            raise ConfigError("TopKDivergence needs top-k or full-logits teacher scores")
        if self.k is None:
            raise ConfigError("TopKDivergence with a full-logits teacher needs an explicit k")
        ids_NK1, logprobs_NK1 = teacher_topk_buckets(
            teacher.hidden_ND.to(dtype),
            teacher.head_VD.to(dtype),
            self.k,
            self.temperature,
            ctx.chunk_size,
        )
        return ids_NK1[:, :-1], logprobs_NK1

    def __call__(self, student: StudentRows, teacher: TeacherScores, ctx: StepContext) -> Tensor:
        ids_NK, teacher_NK1 = self.teacher_buckets(teacher, ctx, student.hidden_ND.dtype)
        if ctx.materialize:
            logits_NV = student.hidden_ND @ student.head_VD.T
            student_NK1 = bucket_logprobs(logits_NV, ids_NK, self.temperature)
        else:
            student_NK1 = chunked_bucket_logprobs(
                student.hidden_ND, student.head_VD, ids_NK, self.temperature, ctx.chunk_size
            )
        # The buckets are already normalised, so τ = 1 here (log_softmax is the identity).
        params = resolve_params(self.params, ctx.progress)
        return divergence(self.name, student_NK1, teacher_NK1.to(student_NK1.dtype), 1.0, **params)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        t = f", temperature={self.temperature}" if self.temperature != 1.0 else ""
        k = self.k if self.k is not None else "k"
        return f"{self.name}({args}{t}) on top-{k} + tail buckets"
