"""The declared interfaces of a method's parts (`typing.Protocol`, checkable with isinstance).

    prompts ─► prefix source ─► rollout ─► teacher access ─► signal ─► weights ─► reduce

    PromptSelector  select(stream, ctx) -> examples; describe()          (e.g. PACED's `Paced`)
    PrefixSource    rollout(examples, ctx) -> Rollout; needs_completions;
                    needs_teacher_model; describe()                      (`opd.sampling`)
    TeacherAccess   score(teacher, rollout, vocab_size) -> TeacherScores;
                    provides (a frozenset); describe()                   (`opd.teachers`)
    Signal          __call__(student, teacher, ctx) -> (N,) values; requires (a frozenset of
                    teacher outputs); describe()                         (`opd.signals`)
    ReverseKLSignal a Signal that says when its values are KL(q_student ‖ p_teacher) (logging)
    OnePassSignal   a Signal that can also give (Σ_n c_n·D_n, values) in one pass,
                    weighted_loss(student, teacher, ctx, coef_N), or None where it cannot
    TokenWeight     __call__(values_N, student, teacher, rollout, ctx) -> (N,) detached
                    weights; requires; describe()                        (`opd.weights`)
    Stateful        state_dict() -> JSON-serialisable dict; load_state_dict(state): a part
                    whose state is saved in each checkpoint (replay buffers, curricula)
    Preparable      prepare(models): called once before the first update (and before a
                    checkpoint is restored), e.g. G-OPD snapshots the initial student
    LogsMetrics     logs (a frozenset of names): a part that reports numbers for the step
                    row by calling ctx.log(name, value) during its call, e.g.
                    RewardWeighted's "reward_mean"; it never writes into the rollout
                    (`rollout.info` holds the prefix sources' facts about the rollout)

Every part receives the same context, `opd.context.StepContext` (run-wide facts, the step,
the micro-batch's rollout, and `log`).

`requires` and `provides` name teacher outputs: "full_logits", "topk_logprobs",
"token_logprobs". `Method` checks at construction that the teacher access provides every
output each signal stage and each weight requires.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from opd.sampling.sources import PrefixSource
from opd.teachers.local import TeacherAccess

if TYPE_CHECKING:
    from torch import Tensor

    from opd.types import Rollout, StudentRows, TeacherScores


@runtime_checkable
class Signal(Protocol):
    """The per-token quantity to minimise: (N,) values, never reduced."""

    requires: frozenset

    def __call__(self, student: StudentRows, teacher: TeacherScores, ctx: Any) -> Tensor: ...

    def describe(self) -> str: ...


@runtime_checkable
class OnePassSignal(Signal, Protocol):
    """A signal whose weighted sum the loop can take in one pass over the heads."""

    def weighted_loss(
        self, student: StudentRows, teacher: TeacherScores, ctx: Any, coef_N: Tensor
    ) -> tuple[Tensor, Tensor] | None: ...


@runtime_checkable
class ReverseKLSignal(Signal, Protocol):
    """A signal that can say when its values are exactly KL(q_student ‖ p_teacher) at
    temperature 1 (then the loop logs them instead of computing that divergence again)."""

    def is_reverse_kl(self, progress: float) -> bool: ...


@runtime_checkable
class TokenWeight(Protocol):
    """A per-token multiplier on the signal: detached (N,) weights in the values' dtype."""

    requires: frozenset

    def __call__(
        self,
        values_N: Tensor,
        student: StudentRows,
        teacher: TeacherScores,
        rollout: Rollout,
        ctx: Any,
    ) -> Tensor: ...

    def describe(self) -> str: ...


@runtime_checkable
class PromptSelector(Protocol):
    """Chooses the examples of each batch (a curriculum) instead of the stream's order."""

    def select(self, stream: Any, ctx: Any) -> list: ...

    def describe(self) -> str: ...


@runtime_checkable
class Stateful(Protocol):
    """A part with state across steps, saved in each checkpoint and restored on resume."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class Preparable(Protocol):
    """A part that needs the models once before training (e.g. a frozen reference copy)."""

    def prepare(self, models: Any) -> None: ...


@runtime_checkable
class LogsMetrics(Protocol):
    """A part that reports numbers for metrics.jsonl: during its call it calls
    `ctx.log(name, value)` for each name in `logs`; the loop averages each over the step's
    micro-batches into the step row (the same rule as the prefix sources' `rollout.info`)."""

    logs: frozenset


def missing_members(part: object, protocol: type) -> list[str]:
    """The members of `protocol` that `part` lacks (empty when it satisfies it)."""
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass in (Protocol, object) or not getattr(klass, "_is_protocol", False):
            continue
        names |= set(getattr(klass, "__annotations__", {}))
        names |= {
            n
            for n, v in vars(klass).items()
            if callable(v) and (n == "__call__" or not n.startswith("_"))
        }
    return sorted(n for n in names if not hasattr(part, n))


__all__ = [
    "LogsMetrics",
    "OnePassSignal",
    "PrefixSource",
    "Preparable",
    "ReverseKLSignal",
    "PromptSelector",
    "Signal",
    "Stateful",
    "TeacherAccess",
    "TokenWeight",
    "missing_members",
]
