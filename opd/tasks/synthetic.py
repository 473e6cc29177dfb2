"""Synthetic tasks where one early mistake spoils the answer (compounding errors).

Each task is plain ASCII, so it is tokenizer independent, and short at its default knobs
(completions of at most ~40 characters), so a character-level model of ~1 M parameters
learns it from scratch on a CPU in minutes (see `opd.tasks.teacher`). Prompts read
`"<task>: <input>\\n"`; the completion is the answer written on one line.

- `sort`: `"sort: 5 3 9 1\\n"` -> `"1 3 5 9"`. Knobs `length`, `max_value`.
- `chain`: `"chain: 3+4*2-1\\n"` -> `"3+4=7;7*2=14;14-1=13 => 13"`, evaluated left to right
  with every running value kept in `0..max_value`. Knobs `steps`, `max_operand`,
  `max_value`.
- `brackets`: `"brackets: ([]{(\\n"` -> `")})"`, the closers of a prefix of a balanced
  sequence. Knobs `length` (longest prefix; the length is drawn from `length//2..length`)
  and `depth` (largest nesting).
- `reverse`: `"reverse: abcde\\n"` -> `"edcba"`. Knob `length`.

Verification is exact match of the final answer: the first line for `sort`, `brackets` and
`reverse`; the number after the last `"=>"` for `chain`.
"""

from __future__ import annotations

import random
import re
import string

from opd.errors import ConfigError
from opd.tasks.base import Task, first_line

OPENERS, CLOSERS = "([{", ")]}"
CLOSER_OF = dict(zip(OPENERS, CLOSERS))


def _row(task: str, question: str, answer: str, completion: str | None = None) -> dict:
    return {"prompt": f"{task}: {question}\n", "completion": completion or answer, "answer": answer}


class Sort(Task):
    """Sort a list of small non-negative integers ascending."""

    name = "sort"
    description = "sort a list of small integers: 'sort: 5 3 9 1' -> '1 3 5 9'"
    default_knobs = {"length": 6, "max_value": 19}

    def sample(self, rng: random.Random, length: int = 6, max_value: int = 19) -> dict[str, str]:
        values = [rng.randint(0, max_value) for _ in range(length)]
        answer = " ".join(str(v) for v in sorted(values))
        return _row(self.name, " ".join(str(v) for v in values), answer)

    def extract_answer(self, text: str) -> str | None:
        """The first line if it is a space-separated list of integers, else None."""
        line = first_line(text)
        if not re.fullmatch(r"\d+( \d+)*", line):
            return None
        return " ".join(str(int(v)) for v in line.split())


class Chain(Task):
    """Evaluate `a op b op c ...` left to right, writing each running value."""

    name = "chain"
    description = "evaluate '3+4*2-1' left to right step by step: '3+4=7;7*2=14;14-1=13 => 13'"
    default_knobs = {"steps": 3, "max_operand": 9, "max_value": 30}

    def check_knobs(self, knobs: dict[str, int]) -> None:
        if knobs["max_value"] < knobs["max_operand"]:
            raise ConfigError(
                f"task 'chain' knob 'max_value' ({knobs['max_value']}) must be >= "
                f"'max_operand' ({knobs['max_operand']})"
            )

    def sample(
        self, rng: random.Random, steps: int = 3, max_operand: int = 9, max_value: int = 30
    ) -> dict[str, str]:
        value = rng.randint(1, max_operand)
        expression, lines = str(value), []
        for _ in range(steps):
            op, operand = _chain_step(rng, value, max_operand, max_value)
            new_value = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
            lines.append(f"{value}{op}{operand}={new_value}")
            expression += f"{op}{operand}"
            value = new_value
        completion = ";".join(lines) + f" => {value}"
        return _row(self.name, expression, str(value), completion)

    def extract_answer(self, text: str) -> str | None:
        """The integer after the last `"=>"` of the first line, else None."""
        line = first_line(text)
        match = re.search(r"=>\s*(-?\d+)\s*$", line)
        return str(int(match.group(1))) if match else None


def _chain_step(
    rng: random.Random, value: int, max_operand: int, max_value: int
) -> tuple[str, int]:
    """An operator and operand that keep `value op operand` in `0..max_value`."""
    choices = {
        "+": range(1, min(max_operand, max_value - value) + 1),
        "-": range(1, min(max_operand, value) + 1),
        # x1 teaches nothing; a zero running value allows any factor.
        "*": range(2, min(max_operand, max_value // value if value else max_operand) + 1),
    }
    ops = [op for op, operands in choices.items() if len(operands)]
    op = rng.choice(ops)
    return op, rng.choice(choices[op])


class Brackets(Task):
    """Close every open bracket of a prefix of a balanced `([{` sequence."""

    name = "brackets"
    description = "close a bracket prefix: 'brackets: ([]{(' -> ')})'"
    default_knobs = {"length": 16, "depth": 6}

    def check_knobs(self, knobs: dict[str, int]) -> None:
        # depth 1 cannot leave a bracket open at the end of a prefix longer than one.
        for key in ("length", "depth"):
            if knobs[key] < 2:
                raise ConfigError(f"task 'brackets' knob {key!r} must be >= 2, got {knobs[key]}")

    def sample(self, rng: random.Random, length: int = 16, depth: int = 6) -> dict[str, str]:
        # A varied prefix length varies the parity, hence the number of open brackets.
        n_chars = rng.randint(max(2, length // 2), length)
        prefix, stack = [], []
        for i in range(n_chars):
            last = i == n_chars - 1
            # The prefix must leave at least one bracket open: never close the last one.
            can_close = len(stack) > (1 if last else 0)
            can_open = len(stack) < depth
            # Opening with p = 0.6 keeps the stack away from empty, so answers are long.
            if can_open and (not can_close or rng.random() < 0.6):
                ch = rng.choice(OPENERS)
                stack.append(ch)
            else:
                ch = CLOSER_OF[stack.pop()]
            prefix.append(ch)
        answer = "".join(CLOSER_OF[ch] for ch in reversed(stack))
        return _row(self.name, "".join(prefix), answer)

    def extract_answer(self, text: str) -> str | None:
        """The first line with spaces removed if it is only closing brackets, else None."""
        line = first_line(text).replace(" ", "")
        return line if line and all(ch in CLOSERS for ch in line) else None


class Reverse(Task):
    """Reverse a string of lowercase letters."""

    name = "reverse"
    description = "reverse a string of letters: 'reverse: abcde' -> 'edcba'"
    default_knobs = {"length": 8}

    def sample(self, rng: random.Random, length: int = 8) -> dict[str, str]:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
        return _row(self.name, word, word[::-1])

    def extract_answer(self, text: str) -> str | None:
        """The first line if it is only lowercase letters, else None."""
        line = first_line(text)
        return line if re.fullmatch(r"[a-z]+", line) else None
