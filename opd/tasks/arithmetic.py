"""Arithmetic word problems: one- or two-step, small numbers, a worked answer.

Made for the demo with a weak real teacher (SmolLM2-135M-Instruct): the problems are short
and the numbers small, so the teacher is right often enough for distillation to matter.
A problem reads "Tom has 3 apples. He buys 4 more. How many apples does Tom have now?" and
its completion shows the arithmetic, then ends "The answer is 7.".

Templates add, subtract and multiply (factors 2..max(2, max_number // 2)); two-step
templates chain two of them. Every intermediate and final result is a positive integer.
Knobs: `max_number` (largest operand, default 10) and `max_steps` (1 or 2, default 2).
"""

from __future__ import annotations

import random
import re

from opd.errors import ConfigError
from opd.tasks.base import Task

# (name, subject pronoun)
PEOPLE = [
    ("Tom", "He"),
    ("Anna", "She"),
    ("Ben", "He"),
    ("Lily", "She"),
    ("Sam", "He"),
    ("Mia", "She"),
    ("Jack", "He"),
    ("Emma", "She"),
    ("Leo", "He"),
    ("Zoe", "She"),
    ("Max", "He"),
    ("Lucy", "She"),
]
OBJECTS = [
    "apples",
    "pencils",
    "marbles",
    "cookies",
    "stickers",
    "books",
    "toy cars",
    "oranges",
    "shells",
    "balloons",
    "cards",
    "eggs",
]

_ANSWER_RE = re.compile(r"the answer is\s*:?\s*\$?\s*(-?\d[\d,]*)", re.IGNORECASE)
_INT_RE = re.compile(r"-?\d[\d,]*")


def _int_text(token: str) -> str | None:
    """`"1,000"` -> `"1000"`, `"007"` -> `"7"`; None if not an integer."""
    digits = token.replace(",", "")
    try:
        return str(int(digits))
    except ValueError:
        return None


class Arithmetic(Task):
    """Short word problems with add, subtract and multiply; answers are integers."""

    name = "arithmetic"
    description = "one- or two-step word problems with small numbers (for a real chat teacher)"
    default_knobs = {"max_number": 10, "max_steps": 2}

    def check_knobs(self, knobs: dict[str, int]) -> None:
        if knobs["max_number"] < 3:
            raise ConfigError(
                f"task 'arithmetic' knob 'max_number' must be >= 3, got {knobs['max_number']}"
            )
        if knobs["max_steps"] > 2:
            raise ConfigError(
                f"task 'arithmetic' knob 'max_steps' must be 1 or 2, got {knobs['max_steps']}"
            )

    def sample(
        self, rng: random.Random, max_number: int = 10, max_steps: int = 2
    ) -> dict[str, str]:
        name, he = rng.choice(PEOPLE)
        friend = rng.choice([p for p, _ in PEOPLE if p != name])
        obj = rng.choice(OBJECTS)
        steps = rng.randint(1, max_steps)
        templates = _ONE_STEP if steps == 1 else _TWO_STEP
        prompt, completion, answer = rng.choice(templates)(rng, max_number, name, he, friend, obj)
        return {"prompt": prompt, "completion": completion, "answer": str(answer)}

    def extract_answer(self, text: str) -> str | None:
        """The integer after "The answer is", else the last integer in `text`, else None."""
        match = _ANSWER_RE.search(text)
        if match:
            return _int_text(match.group(1))
        ints = _INT_RE.findall(text)
        return _int_text(ints[-1]) if ints else None


def _factor(rng: random.Random, max_number: int) -> int:
    return rng.randint(2, max(2, max_number // 2))


def _add_buy(rng, m, name, he, friend, obj):
    a, b = rng.randint(1, m), rng.randint(1, m)
    return (
        f"{name} has {a} {obj}. {he} buys {b} more. How many {obj} does {name} have now?",
        f"{name} has {a} + {b} = {a + b} {obj}. The answer is {a + b}.",
        a + b,
    )


def _add_find(rng, m, name, he, friend, obj):
    a, b = rng.randint(1, m), rng.randint(1, m)
    return (
        f"{name} had {a} {obj}. Then {friend} gave {name} {b} more. "
        f"How many {obj} does {name} have now?",
        f"{name} has {a} + {b} = {a + b} {obj}. The answer is {a + b}.",
        a + b,
    )


def _sub_give(rng, m, name, he, friend, obj):
    a = rng.randint(2, m)
    b = rng.randint(1, a - 1)
    return (
        f"{name} has {a} {obj}. {he} gives {b} {obj} to {friend}. "
        f"How many {obj} does {name} have left?",
        f"{name} has {a} - {b} = {a - b} {obj} left. The answer is {a - b}.",
        a - b,
    )


def _sub_lose(rng, m, name, he, friend, obj):
    a = rng.randint(2, m)
    b = rng.randint(1, a - 1)
    return (
        f"{name} had {a} {obj}. {he} lost {b} of them. How many {obj} does {name} have left?",
        f"{name} has {a} - {b} = {a - b} {obj} left. The answer is {a - b}.",
        a - b,
    )


def _mul_bags(rng, m, name, he, friend, obj):
    a, b = _factor(rng, m), _factor(rng, m)
    return (
        f"{name} has {a} bags. Each bag has {b} {obj}. How many {obj} does {name} have?",
        f"{name} has {a} * {b} = {a * b} {obj}. The answer is {a * b}.",
        a * b,
    )


def _add_then_sub(rng, m, name, he, friend, obj):
    a, b = rng.randint(1, m), rng.randint(1, m)
    c = rng.randint(1, a + b - 1)
    x, y = a + b, a + b - c
    return (
        f"{name} has {a} {obj}. {he} buys {b} more, then gives {c} to {friend}. "
        f"How many {obj} does {name} have now?",
        f"{name} has {a} + {b} = {x} {obj}. Then {x} - {c} = {y}. The answer is {y}.",
        y,
    )


def _mul_then_add(rng, m, name, he, friend, obj):
    a, b, c = _factor(rng, m), _factor(rng, m), rng.randint(1, m)
    x, y = a * b, a * b + c
    return (
        f"{name} has {a} bags with {b} {obj} in each bag, and {c} more {obj} on the table. "
        f"How many {obj} does {name} have in total?",
        f"The bags hold {a} * {b} = {x} {obj}. Then {x} + {c} = {y}. The answer is {y}.",
        y,
    )


def _more_than(rng, m, name, he, friend, obj):
    a, b = rng.randint(1, m), rng.randint(1, m)
    x, y = a + b, a + a + b
    return (
        f"{name} has {a} {obj}. {friend} has {b} more {obj} than {name}. "
        f"How many {obj} do they have together?",
        f"{friend} has {a} + {b} = {x} {obj}. Together they have {a} + {x} = {y}. "
        f"The answer is {y}.",
        y,
    )


_ONE_STEP = [_add_buy, _add_find, _sub_give, _sub_lose, _mul_bags]
_TWO_STEP = [_add_then_sub, _mul_then_add, _more_than]
