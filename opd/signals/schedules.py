"""Values that change over training, and what a part needs from the teacher.

- `Linear(start, end)`: a parameter value interpolated by training progress in [0, 1]
  (e.g. TAID's λ rising from λ_0 to 1). Any `Divergence` parameter, and the fractions of
  some token weights, may be a schedule; `resolve(value, progress)` evaluates one value and
  `resolve_params(params, progress)` a dict of them.
- `requirements(part)`: the teacher outputs a part needs, as a frozenset; `leaf_parts(part)`
  the labelled leaves of a combinator (stages of `ByProgress`, writers of `ByWriter`);
  `logged_names(part)` the metric names its leaves report with `ctx.log`.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def requirements(part) -> frozenset:
    """What a part needs from the teacher, as a frozenset (a plain string is one element;
    no `requires` attribute, or None, is the empty set)."""
    req = getattr(part, "requires", None)
    if req is None:
        return frozenset()
    if isinstance(req, str):
        return frozenset({req})
    return frozenset(req)


def logged_names(part) -> frozenset:
    """The names a part (or any leaf of a combinator) reports with `ctx.log`: the union of
    the leaves' `logs` (`opd.parts.LogsMetrics`)."""
    return frozenset().union(*(frozenset(getattr(p, "logs", ())) for _, p in leaf_parts(part)))


def leaf_parts(part, label: str = "") -> list:
    """[(label, part)] for every leaf part of a combinator (stages of stages, recursively);
    a part without `labelled_parts` is its own single leaf."""
    children = getattr(part, "labelled_parts", None)
    if children is None:
        return [(label, part)]
    out = []
    for child_label, child in children():
        out += leaf_parts(child, f"{label}, {child_label}" if label else child_label)
    return out


def resolve(value, progress: float):
    """A plain value, or a schedule (anything with `.at(progress)`) evaluated at `progress`."""
    return value.at(progress) if hasattr(value, "at") else value


def resolve_params(params: dict, progress: float) -> dict:
    """Evaluate scheduled parameter values at `progress`."""
    return {k: resolve(v, progress) for k, v in params.items()}
