"""`Method`: one choice for each stage of the loop, checked for compatibility at construction.

    prompts ─► prefix source ─► rollout ─► teacher access ─► signal ─► weights ─► reduce ─► step

The training loop never branches on a method's name; it calls the parts the method names.
A published method is a function in `opd/recipes/` that returns a `Method` with the paper's
defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd.errors import ConfigError
from opd.parts import PromptSelector, Signal, TokenWeight, missing_members
from opd.sampling.sources import PrefixSource
from opd.signals import Divergence, leaf_parts, requirements
from opd.teachers import FullLogits, TeacherAccess

REDUCTIONS = ("token_mean", "sequence_mean")


def _check_interface(label: str, role: str, part, protocol) -> None:
    """ConfigError naming the members `part` lacks, unless it satisfies `protocol`."""
    if isinstance(part, protocol):
        return
    members = missing_members(part, protocol)
    raise ConfigError(
        f"{label}: {role} {part!r} is not a {protocol.__name__}: it has no "
        f"{', '.join(sorted(members)) or 'matching members'} (see opd.parts)"
    )


def _names(items) -> str:
    return ", ".join(repr(x) for x in sorted(items)) or "nothing"


@dataclass(frozen=True)
class Method:
    """A distillation method as data.

    Attributes:
      prefixes: who writes the completions (`opd.sampling`).
      teacher: what the teacher returns (`opd.teachers`).
      signal: the per-token quantity to minimise (`opd.signals`).
      weights: per-token weights/masks applied to the signal, in order (`opd.weights`).
      reduction: how per-token values become one loss: "token_mean" (mean over all counted
        tokens of the batch) or "sequence_mean" (mean of per-sequence token means).
      name: a label for logs.
      prompts: an optional prompt selector (a curriculum such as PACED) with
        `select(stream, ctx) -> examples`; None takes the next batch of the data stream.
    """

    prefixes: PrefixSource
    teacher: TeacherAccess = FullLogits()
    signal: Signal = Divergence()
    weights: tuple = ()
    reduction: str = "token_mean"
    name: str = "custom"
    prompts: object = None

    def __post_init__(self):
        _check_interface(self._label, "signal", self.signal, Signal)
        for w in self.weights:
            _check_interface(self._label, "token weight", w, TokenWeight)
        if self.prompts is not None:
            _check_interface(self._label, "prompts", self.prompts, PromptSelector)
        provides = frozenset(getattr(self.teacher, "provides", frozenset()))
        access = self.teacher.describe()
        # Every stage of a scheduled signal (ByProgress, ByWriter, nested) is checked now,
        # so a teacher that cannot serve a later stage is refused here, not midway.
        for label, part in leaf_parts(self.signal):
            missing = requirements(part) - provides
            if missing:
                where = f" {label}" if label else ""
                raise ConfigError(
                    f"{self._label}: signal{where} {part.describe()} needs the teacher's "
                    f"{_names(missing)}, but teacher access {access} provides only "
                    f"{_names(provides)}; use a teacher access that provides {_names(missing)} "
                    f"or a signal that needs only {_names(provides)}"
                )
        for w in self.weights:
            missing = requirements(w) - provides
            if missing:
                raise ConfigError(
                    f"{self._label}: token weight {w.describe()} needs {_names(missing)}, "
                    f"teacher access {access} provides {_names(provides)}"
                )
        if self.reduction not in REDUCTIONS:
            raise ConfigError(
                f"{self._label}: reduction must be one of {REDUCTIONS}, got {self.reduction!r}"
            )

    @property
    def _label(self) -> str:
        return "method" if self.name == "custom" else f"method {self.name!r}"

    def describe(self) -> str:
        lines = [
            f"prefixes:  {self.prefixes.describe()}",
            f"teacher:   {self.teacher.describe()}",
            f"signal:    {self.signal.describe()}",
            f"weights:   {', '.join(w.describe() for w in self.weights) or 'none'}",
            f"reduction: {self.reduction}",
        ]
        if self.prompts is not None:
            lines.append(f"prompts:   {self.prompts.describe()}")
        return "\n".join(lines)
