"""Old import path of the schedules and combinators, now in the `opd.signals` package.

`docs/writing-a-recipe.md` imports `ByProgress` from here; new code imports from
`opd.signals` (`Linear`, `ByProgress`, `ByWriter`, `Paired`, `resolve_params`).
"""

from opd.signals.combinators import ByProgress, ByWriter, Paired
from opd.signals.schedules import Linear, leaf_parts, requirements, resolve, resolve_params

__all__ = [
    "ByProgress",
    "ByWriter",
    "Linear",
    "Paired",
    "leaf_parts",
    "requirements",
    "resolve",
    "resolve_params",
]
