"""Signals: the per-token quantity the student minimises on the rollout.

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

from opd.errors import ConfigError
from opd.losses import DIVERGENCES, chunked_divergence, chunked_weighted_divergence, divergence
from opd.losses.mixture import chunked_mixture_divergence, mixture_logits
from opd.schedules import resolve_params
from opd.types import StudentRows, TeacherScores


@dataclass(frozen=True)
class SignalContext:
    """Run-time facts a signal or token weight may need.

    Attributes:
      step, total_steps: the optimizer step (0-based) and the run's length; schedules read
        `progress` = step / total_steps in [0, 1].
      chunk_size: rows per chunk for the chunked losses.
      materialize: use the plain (N, V) reference path instead of the chunked one.
      rollout: the micro-batch's rollout (sequence-level signals need the row structure).
      tokenizer: the shared tokenizer (reward signals decode completions).
      verify: `verify(text, answer) -> bool`, the task's verifier (reward signals).
    """

    step: int = 0
    total_steps: int = 1
    chunk_size: int = 512
    materialize: bool = False
    rollout: object = None
    tokenizer: object = None
    verify: object = None
    models: object = None  # opd.build.Models: for signals that need a reference model

    @property
    def progress(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))


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
        if self.name not in DIVERGENCES:
            raise ConfigError(
                f"unknown divergence {self.name!r}; valid: {', '.join(sorted(DIVERGENCES))}"
            )
        if not self.temperature > 0:
            raise ConfigError(f"divergence temperature must be > 0, got {self.temperature}")
        # Fail at construction, not at step 1, on a bad parameter name or value.
        probe = torch.zeros(1, 3)
        try:
            divergence(self.name, probe, probe, temperature=1.0, **resolve_params(self.params, 0.0))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"divergence {self.name!r}: {err}") from None

    def __hash__(self):
        items = tuple(sorted(self.params.items(), key=str))
        return hash((self.name, items, self.temperature, self.tau_squared))

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

    def __call__(self, student: StudentRows, teacher: TeacherScores, ctx: SignalContext):
        values_N = self._values(student, teacher, ctx)
        return values_N * self.scale if self.scale != 1.0 else values_N

    def _values(self, student: StudentRows, teacher: TeacherScores, ctx: SignalContext):
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
        self, student: StudentRows, teacher: TeacherScores, ctx: SignalContext, coef_N: torch.Tensor
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
        t += " × τ²" if self.tau_squared else ""
        return f"{self.name}({args}{t})"
