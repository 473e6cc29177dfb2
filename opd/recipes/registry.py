"""The recipe registry: `RECIPES` maps a name to a function that returns a `Method`.

Each recipe carries its citation, a one-line summary and its place in the survey's taxonomy
(feedback signal, teacher access, granularity), shown by `opd recipes`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from opd.errors import ConfigError


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    fn: Callable
    citation: str
    summary: str
    signal: str  # feedback signal: "logit", "sampled log-prob", "reward", ...
    access: str  # teacher access: "white-box", "top-k", "sampled", "black-box"
    granularity: str  # "token", "sequence", "hybrid"

    def defaults(self) -> dict:
        sig = inspect.signature(self.fn)
        return {k: p.default for k, p in sig.parameters.items()}

    def build(self, **kwargs):
        valid = self.defaults()
        for k in kwargs:
            if k not in valid:
                raise ConfigError(
                    f"recipe {self.name!r} has no argument {k!r}; valid: "
                    f"{', '.join(valid) or 'none'}"
                )
        try:
            method = self.fn(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"recipe {self.name!r}: {err}") from None
        return method


RECIPES: dict[str, RecipeInfo] = {}


def recipe(*, citation: str, summary: str, signal: str, access: str, granularity: str):
    """Register a recipe function under its own name."""

    def register(fn):
        RECIPES[fn.__name__] = RecipeInfo(
            fn.__name__, fn, citation, summary, signal, access, granularity
        )
        return fn

    return register


def get_recipe(name: str) -> RecipeInfo:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; valid: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]
