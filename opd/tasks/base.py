"""The `Task` base: a prompt generator with an exact verifier.

A task turns `(n, seed, knobs)` into `n` rows `{"prompt", "completion", "answer"}`. The
completion is a reference answer written out the way a model should write it (the teacher
is trained on it, or it serves as the supervised target); the answer is the short string a
verifier compares. Everything is plain text, so a task works with any tokenizer.

`generate` draws every row from one `random.Random(seed)` stream, so it is deterministic in
the seed and prefix-stable: `generate(n + k, s)[:n] == generate(n, s)`.

Knobs are named integer difficulty settings (list length, number of steps, ...). Each task
declares its defaults in `default_knobs`; an unknown knob or a value below 1 is a
`ConfigError` that names the valid knobs.
"""

from __future__ import annotations

import random
import re
from typing import ClassVar

from opd.errors import ConfigError


class Task:
    """A prompt set with a generator and an exact-match verifier.

    Subclasses set the class attributes and implement `sample` and `extract_answer`.
    Instances hold no state; the registry in `opd.tasks` keeps one of each.
    """

    name: ClassVar[str] = ""
    """Registry key, e.g. `"sort"`."""
    description: ClassVar[str] = ""
    """One line for `opd tasks` and error messages."""
    default_knobs: ClassVar[dict[str, int]] = {}
    """Difficulty knobs and their default values."""

    def resolve_knobs(self, knobs: dict[str, int] | None = None) -> dict[str, int]:
        """The defaults overridden by `knobs`, validated.

        Args:
          knobs: a subset of `default_knobs` with positive integer values.

        Returns:
          A new dict with every knob of the task.

        Raises:
          ConfigError: for an unknown knob or a value that is not an integer >= 1.
        """
        knobs = dict(knobs or {})
        unknown = sorted(set(knobs) - set(self.default_knobs))
        if unknown:
            valid = ", ".join(f"{k} (default {v})" for k, v in self.default_knobs.items())
            raise ConfigError(
                f"task {self.name!r} has no knob {unknown[0]!r}; valid knobs: {valid or 'none'}"
            )
        for key, value in knobs.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"task {self.name!r} knob {key!r} must be an integer >= 1, got {value!r}"
                )
        self.check_knobs({**self.default_knobs, **knobs})
        return {**self.default_knobs, **knobs}

    def check_knobs(self, knobs: dict[str, int]) -> None:
        """Task-specific range checks on resolved knobs; raise `ConfigError` if invalid."""

    def generate(self, n: int, seed: int, **knobs: int) -> list[dict[str, str]]:
        """`n` rows drawn deterministically from `seed`.

        Args:
          n: number of rows (prompts may repeat when the task's space is small).
          seed: the seed of the row stream.
          **knobs: difficulty overrides, see `default_knobs`.

        Returns:
          A list of `{"prompt": str, "completion": str, "answer": str}`.
        """
        if n < 0:
            raise ConfigError(f"task {self.name!r}: number of rows must be >= 0, got {n}")
        settings = self.resolve_knobs(knobs)
        rng = random.Random(seed)
        return [self.sample(rng, **settings) for _ in range(n)]

    def sample(self, rng: random.Random, **knobs: int) -> dict[str, str]:
        """One row drawn from `rng` with resolved knobs."""
        raise NotImplementedError

    def extract_answer(self, text: str) -> str | None:
        """The final answer in a model's output, normalised, or None if there is none."""
        raise NotImplementedError

    def verify(self, text: str, answer: str) -> bool:
        """True iff the answer extracted from `text` equals `answer` exactly.

        Args:
          text: a model's completion (the prompt not included).
          answer: the row's `"answer"`.

        Returns:
          Whether the extracted answer is present and matches.
        """
        extracted = self.extract_answer(text)
        return extracted is not None and extracted == answer.strip()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def first_line(text: str) -> str:
    """The first non-empty line of `text`, stripped, with runs of spaces collapsed."""
    for line in text.strip().splitlines():
        line = re.sub(r"[ \t]+", " ", line.strip())
        if line:
            return line
    return ""
