"""Per-token clipping of a divergence signal (OPSD's optional clip).

    values_N = min(D_t, c)      (c > 0; c = 0 leaves the values unchanged)

A token whose divergence exceeds c contributes c and no gradient, so a few tokens where the
privileged teacher and the student disagree sharply (e.g. the teacher copying the solution's
wording) cannot dominate the step.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd.errors import ConfigError


@dataclass(frozen=True)
class Clipped:
    """`inner`'s per-token values clipped above at `clip` (see module doc)."""

    inner: object
    clip: float

    def __post_init__(self):
        if not self.clip > 0:
            raise ConfigError(f"per-token clip must be > 0 (or 0 for none), got {self.clip}")

    @property
    def requires(self) -> frozenset:
        return self.inner.requires

    def __call__(self, student, teacher, ctx):
        return self.inner(student, teacher, ctx).clamp(max=self.clip)

    def describe(self) -> str:
        return f"min({self.inner.describe()}, {self.clip:g}) per token"
