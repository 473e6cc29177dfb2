"""Schedules and stage combinators: parts of a method that change over training or by writer.

- `Linear(start, end)`: a parameter value interpolated by training progress in [0, 1]
  (e.g. TAID's λ rising from λ_0 to 1). Any `Divergence` parameter may be a schedule.
- `ByProgress(stages)`: use one part (a signal or a prefix source) until a progress
  boundary, then the next: the divergence schedule (FKL first, RKL after) of PACED and the
  survey's staged budget (off-policy warm-up, on-policy, reward-guided).
- `ByWriter(parts)`: pick the signal by who wrote the completions (DistiLLM-2: skew forward
  KL on teacher outputs, skew reverse KL on student outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

from opd.errors import ConfigError


@dataclass(frozen=True)
class Linear:
    """A value moving linearly from `start` (progress 0) to `end` (progress 1)."""

    start: float
    end: float

    def at(self, progress: float) -> float:
        p = min(1.0, max(0.0, progress))
        return self.start + (self.end - self.start) * p

    def __repr__(self) -> str:
        return f"linear({self.start}→{self.end})"


def resolve_params(params: dict, progress: float) -> dict:
    """Evaluate scheduled parameter values at `progress`."""
    return {k: (v.at(progress) if hasattr(v, "at") else v) for k, v in params.items()}


@dataclass(frozen=True)
class ByProgress:
    """Stages `((until_1, part_1), (until_2, part_2), ...)`, boundaries in (0, 1], increasing.

    Works for signals (called with a SignalContext) and prefix sources (`rollout(examples,
    ctx)` with a RolloutContext); the stage is chosen by step / total_steps.
    """

    stages: tuple

    def __post_init__(self):
        bounds = [b for b, _ in self.stages]
        if (
            not bounds
            or any(not 0 < b <= 1 for b in bounds)
            or bounds != sorted(bounds)
            or bounds[-1] != 1.0
        ):
            raise ConfigError(
                f"ByProgress: stage boundaries must increase within (0, 1] and end at 1.0, got {bounds}"
            )

    def part_at(self, progress: float):
        for until, part in self.stages:
            if progress < until:
                return part
        return self.stages[-1][1]

    def _progress(self, ctx) -> float:
        return ctx.step / max(1, ctx.total_steps)

    # --- as a signal -------------------------------------------------------------------
    @property
    def requires(self):
        reqs = {getattr(p, "requires", None) for _, p in self.stages} - {None}
        if len(reqs) > 1:  # Method checks one requirement; all stages must be servable
            return sorted(reqs)[0] if "full_logits" not in reqs else "full_logits"
        return next(iter(reqs), None)

    def __call__(self, student, teacher, ctx):
        return self.part_at(self._progress(ctx))(student, teacher, ctx)

    # --- as a prefix source ------------------------------------------------------------
    @property
    def needs_completions(self) -> bool:
        return any(getattr(p, "needs_completions", False) for _, p in self.stages)

    @property
    def needs_teacher_model(self) -> bool:
        return any(getattr(p, "needs_teacher_model", False) for _, p in self.stages)

    def rollout(self, examples, ctx):
        return self.part_at(self._progress(ctx)).rollout(examples, ctx)

    # --- checkpointing: stages with state (e.g. a replay buffer) are saved and restored ------
    def state_dict(self) -> dict:
        return {str(i): p.state_dict() for i, (_, p) in enumerate(self.stages) if hasattr(p, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        for i, (_, p) in enumerate(self.stages):
            if str(i) in state and hasattr(p, "load_state_dict"):
                p.load_state_dict(state[str(i)])

    def describe(self) -> str:
        parts, lo = [], 0.0
        for until, part in self.stages:
            parts.append(f"[{lo:.0%}–{until:.0%}) {part.describe()}")
            lo = until
        return "by progress: " + "; ".join(parts)


@dataclass(frozen=True)
class ByWriter:
    """A signal chosen by `rollout.writer` ("student", "teacher", "dataset")."""

    parts: tuple  # ((writer, signal), ...)

    @property
    def requires(self):
        reqs = {getattr(s, "requires", None) for _, s in self.parts} - {None}
        return "full_logits" if "full_logits" in reqs else next(iter(reqs), None)

    def __call__(self, student, teacher, ctx):
        writer = ctx.rollout.writer
        for w, sig in self.parts:
            if w == writer:
                return sig(student, teacher, ctx)
        raise ConfigError(
            f"ByWriter: no signal for completions written by {writer!r}; "
            f"have {', '.join(w for w, _ in self.parts)}"
        )

    def describe(self) -> str:
        return "by writer: " + "; ".join(f"{w}: {s.describe()}" for w, s in self.parts)
