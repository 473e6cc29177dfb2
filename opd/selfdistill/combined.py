"""`PlusDistillation`: an RL signal plus a weighted distillation term, per token (SDPO's sum).

    values_N = rl(student, teacher, ctx)_N + λ · distill(student, teacher, ctx)_N

Both parts see the same student rows and the same teacher scores (one teacher pass per
micro-batch). With λ = 0 the distillation term is not computed at all, so the values are the
RL signal's own, bit for bit. The teacher outputs required are the union of the parts';
`labelled_parts` lists both so that `Method` checks each against the teacher access and the
loop collects each part's logged numbers (e.g. GRPO's `reward_mean`). `prepare(models)` is
passed on to the parts that have it (e.g. GRPO's reference copy for its k3 KL).
"""

from __future__ import annotations

from dataclasses import dataclass

from opd.errors import ConfigError
from opd.signals.schedules import requirements


@dataclass(frozen=True)
class PlusDistillation:
    """An RL signal plus `coef` times a distillation signal, per token (SDPO: GRPO + λ·RKL)."""

    rl: object
    distill: object
    coef: float = 1.0

    def __post_init__(self):
        if not self.coef >= 0:
            raise ConfigError(f"distillation coefficient must be >= 0, got {self.coef}")

    @property
    def requires(self) -> frozenset:
        return requirements(self.rl) | (requirements(self.distill) if self.coef else frozenset())

    def labelled_parts(self) -> tuple:
        parts = (("RL term", self.rl),)
        return parts + ((("distillation term", self.distill),) if self.coef else ())

    def prepare(self, models) -> None:
        for part in (self.rl, self.distill):
            hook = getattr(part, "prepare", None)
            if callable(hook):
                hook(models)

    def __call__(self, student, teacher, ctx):
        values_N = self.rl(student, teacher, ctx)
        if not self.coef:
            return values_N
        return values_N + self.coef * self.distill(student, teacher, ctx).to(values_N.dtype)

    def describe(self) -> str:
        if not self.coef:
            return f"{self.rl.describe()} (distillation coefficient 0: no distillation term)"
        return f"{self.rl.describe()} + {self.coef:g} · {self.distill.describe()}"
