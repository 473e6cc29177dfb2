"""The recipe registry: `RECIPES` maps a name to a function that returns a `Method`.

Each recipe carries its citation, a one-line summary, its place in the survey's taxonomy
(feedback signal, teacher access, granularity) and its remaining deviations from its paper,
shown by `opd recipes`. The name is the function's name, written once: `@recipe` sets it on
the `Method` the function returns. The deviations are the paragraph of the recipe module's
docstring that starts with "Deviation(s) ...:" (to the end of the docstring).

Arguments from a config file or the command line arrive as YAML scalars; `RecipeInfo.build`
checks each against the recipe function's annotation (or its default's type): numbers for
float/int arguments, true/false for booleans, text for strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import re
import sys
import typing
from dataclasses import dataclass
from typing import Callable

from opd.errors import ConfigError

_DEVIATIONS = re.compile(r"\bDeviations?\b[^:\n]*:\s*", re.IGNORECASE)


def deviations_from_docstring(doc: str | None) -> str:
    """The text after the first "Deviation(s) ...:" of `doc` ("" if none): one line per "- "
    item (or one line when there are no items), line breaks inside an item removed."""
    if not doc:
        return ""
    match = _DEVIATIONS.search(doc)
    if match is None:
        return ""
    items: list[str] = []
    for line in doc[match.end() :].splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("- ") or not items:
            items.append(line)
        else:
            items[-1] += " " + line
    return "\n".join(items)


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

    @property
    def deviations(self) -> str:
        """The recipe's remaining deviations from its paper, from its module docstring."""
        return deviations_from_docstring(sys.modules[self.fn.__module__].__doc__)

    def argument_types(self) -> dict:
        """name -> the expected type (bool, int, float, str), or None where any value goes."""
        try:
            hints = typing.get_type_hints(self.fn)
        except Exception:  # an annotation that does not resolve: fall back to the defaults
            hints = {}
        out = {}
        for k, default in self.defaults().items():
            hint = hints.get(k)
            if hint in (bool, int, float, str):
                out[k] = hint
            elif hint is None and type(default) in (bool, int, float, str):
                out[k] = type(default)
            else:
                out[k] = None
        return out

    def build(self, **kwargs):
        valid = self.defaults()
        types = self.argument_types()
        checked = {}
        for k, v in kwargs.items():
            if k not in valid:
                near = difflib.get_close_matches(k, list(valid), n=3)
                hint = f"did you mean {' or '.join(near)}? " if near else ""
                raise ConfigError(
                    f"recipe {self.name!r} has no argument {k!r}; {hint}valid: "
                    f"{', '.join(valid) or 'none'}"
                )
            checked[k] = _coerce(self.name, k, v, types[k], valid[k])
        try:
            return self.fn(**checked)
        except ConfigError as err:
            message = str(err)
            if not message.startswith(f"recipe {self.name!r}"):
                message = f"recipe {self.name!r}: {message}"
            raise ConfigError(message) from None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"recipe {self.name!r}: {err}") from None


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def _coerce(recipe_name: str, key: str, value, expected, default):
    """`value` as the type argument `key` expects, or a ConfigError saying what it expects."""
    where = f"recipe {recipe_name!r}: method.args.{key}"
    if expected is None or value is None:
        return value
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{where} expects true or false, got {value!r}")
    if expected in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip()) if expected is float else int(value.strip())
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            kind = "a number" if expected is float else "an integer"
            raise ConfigError(f"{where} expects {kind} (default {default!r}), got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{where} expects a finite number, got {value!r}")
        if expected is int:
            if float(number) != int(number):
                raise ConfigError(
                    f"{where} expects an integer (default {default!r}), got {value!r}"
                )
            return int(number)
        return float(number) if isinstance(number, float) else number
    if expected is str and not isinstance(value, str):
        raise ConfigError(f"{where} expects text (default {default!r}), got {value!r}")
    return value


RECIPES: dict[str, RecipeInfo] = {}


def recipe(*, citation: str, summary: str, signal: str, access: str, granularity: str):
    """Register a recipe function under its own name; the `Method` it returns gets that name."""

    def register(fn):
        name = fn.__name__

        @functools.wraps(fn)
        def named(*args, **kwargs):
            method = fn(*args, **kwargs)
            return dataclasses.replace(method, name=name) if method.name != name else method

        RECIPES[name] = RecipeInfo(name, named, citation, summary, signal, access, granularity)
        return named

    return register


def deviations_markdown() -> str:
    """The "Deviations by recipe" list of docs/methods.md, generated from the recipes."""
    lines = []
    for name in sorted(RECIPES):
        items = RECIPES[name].deviations.splitlines() or ["none stated"]
        lines.append(f"- **{name}**")
        lines += [f"  - {item.removeprefix('- ')}" for item in items]
    return "\n".join(lines)


def get_recipe(name: str) -> RecipeInfo:
    if name not in RECIPES:
        near = difflib.get_close_matches(str(name), list(RECIPES), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(n) for n in near)}? " if near else ""
        raise ConfigError(f"unknown recipe {name!r}; {hint}valid: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]
