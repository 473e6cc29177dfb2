"""`Divergence`: a full-vocabulary divergence as a signal.

A signal maps (student rows, teacher scores) to a per-token tensor (N,), never reduced.
`Divergence` covers every full-vocabulary divergence in `opd.losses` (docs/methods.md §1–2):

    D_t = D( p_teacher(. | x, y<t), q_student(. | x, y<t) )    for each counted token t

It uses the memory-lean chunked path by default (hidden states + lm_head, row chunks,
custom autograd) and the plain materialized path when `materialize=True`: the reference
twin the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from opd.context import StepContext
from opd.errors import ConfigError
from opd.losses import DIVERGENCES, chunked_divergence, chunked_weighted_divergence, divergence
from opd.losses.mixture import chunked_mixture_divergence, mixture_logits
from opd.signals.schedules import resolve_params
from opd.types import StudentRows, TeacherScores


def check_divergence_spec(name: str, params: dict, temperature: float, who: str) -> None:
    """Raise ConfigError now (not at step 1) on an unknown divergence, a temperature ≤ 0, or
    a bad parameter name or value (probed at progress 0 on a tiny input)."""
    if name not in DIVERGENCES:
        raise ConfigError(f"unknown divergence {name!r}; valid: {', '.join(sorted(DIVERGENCES))}")
    if not temperature > 0:
        raise ConfigError(f"{who}: temperature must be > 0, got {temperature}")
    probe = torch.zeros(1, 3)
    try:
        divergence(name, probe, probe, temperature=1.0, **resolve_params(params, 0.0))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"divergence {name!r}: {err}") from None


def params_key(params: dict) -> tuple:
    """A hashable form of a parameter dict (for the frozen signals' __hash__)."""
    return tuple(sorted(params.items(), key=str))


@dataclass(frozen=True)
class Divergence:
    """A full-vocabulary divergence D(p_teacher, q_student) per completion token.

    Attributes:
      name: a key of `opd.losses.DIVERGENCES` (forward_kl, reverse_kl, generalized_jsd, ...).
      params: the divergence's parameters, e.g. {"beta": 0.5}.
      temperature: τ applied to both models' logits before the softmax.
      tau_squared: multiply the values by τ² (Hinton et al. 2015: keeps the gradient's scale
        comparable across temperatures). Off by default, as in GKD, DistiLLM, MiniLLM and TRL;
        on in the `supervised_kd` recipe.
    """

    name: str = "reverse_kl"
    params: dict = field(default_factory=dict)
    temperature: float = 1.0
    requires: ClassVar[frozenset] = frozenset({"full_logits"})
    tau_squared: bool = False

    def __post_init__(self):
        check_divergence_spec(self.name, self.params, self.temperature, "divergence")

    def __hash__(self):
        return hash((self.name, params_key(self.params), self.temperature, self.tau_squared))

    @property
    def scale(self) -> float:
        """The factor on every value: τ² with `tau_squared`, else 1."""
        return self.temperature**2 if self.tau_squared else 1.0

    def is_reverse_kl(self, progress: float) -> bool:
        """True when this signal is exactly KL(q_student ‖ p_teacher) at temperature 1 now:
        `reverse_kl`, or generalized JSD with β = 1 (special-cased to that KL)."""
        if self.temperature != 1.0:
            return False  # (so τ² = 1 too)
        if self.name == "reverse_kl":
            return True
        return (
            self.name == "generalized_jsd"
            and resolve_params(self.params, progress).get("beta") == 1.0
        )

    def __call__(self, student: StudentRows, teacher: TeacherScores, ctx: StepContext):
        values_N = self._values(student, teacher, ctx)
        return values_N * self.scale if self.scale != 1.0 else values_N

    def _values(self, student: StudentRows, teacher: TeacherScores, ctx: StepContext):
        params = resolve_params(self.params, ctx.progress)
        tau = self.temperature
        dtype = student.hidden_ND.dtype
        if teacher.members:  # an ensemble: the divergence to p = Σ_k w_k p_k
            pairs = [(m.hidden_ND.to(dtype), m.head_VD.to(dtype)) for m in teacher.members]
            if ctx.materialize:
                mix_NV = mixture_logits([h @ W.T for h, W in pairs], teacher.member_weights, tau)
                logits_s_NV = student.hidden_ND @ student.head_VD.T
                return divergence(self.name, logits_s_NV, mix_NV, temperature=tau, **params)
            return chunked_mixture_divergence(
                self.name,
                student.hidden_ND,
                student.head_VD,
                pairs,
                teacher.member_weights,
                temperature=tau,
                chunk_size=ctx.chunk_size,
                **params,
            )
        if ctx.materialize:
            logits_s_NV = student.hidden_ND @ student.head_VD.T
            logits_t_NV = (teacher.hidden_ND @ teacher.head_VD.T).to(logits_s_NV.dtype)
            return divergence(self.name, logits_s_NV, logits_t_NV, temperature=tau, **params)
        return chunked_divergence(
            self.name,
            student.hidden_ND,
            student.head_VD,
            teacher.hidden_ND.to(dtype),
            teacher.head_VD.to(dtype),
            temperature=tau,
            chunk_size=ctx.chunk_size,
            **params,
        )

    def weighted_loss(
        self, student: StudentRows, teacher: TeacherScores, ctx: StepContext, coef_N: torch.Tensor
    ):
        """(Σ_n c_n · D_n, values_N) in one pass over the heads (gradient taken in the forward,
        `chunked_weighted_divergence`), or None where that path does not apply (ensembles,
        the materialized reference path). Equal to (self(...) · coef_N).sum() in value and
        gradient."""
        if teacher.members or ctx.materialize:
            return None
        dtype = student.hidden_ND.dtype
        if self.scale != 1.0:
            coef_N = coef_N * self.scale
        loss = chunked_weighted_divergence(
            self.name,
            student.hidden_ND,
            student.head_VD,
            teacher.hidden_ND.to(dtype),
            teacher.head_VD.to(dtype),
            coef_N,
            temperature=self.temperature,
            chunk_size=ctx.chunk_size,
            **resolve_params(self.params, ctx.progress),
        )
        if self.scale == 1.0:
            return loss
        total, values_N = loss
        return total, values_N * self.scale

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        t = f", temperature={self.temperature}" if self.temperature != 1.0 else ""
        scale = " × τ²" if self.tau_squared else ""
        return f"{self.name}({(args + t).lstrip(', ')}){scale}"
