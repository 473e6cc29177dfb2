"""Recoverable task variants: completion formats in which a mistake can be corrected.

On the plain `chain` and `sort` formats an answer is lost at the first wrong token, whatever
comes next, so a teacher cannot show how to recover from a student's mistake. The variants
here keep the prompts, the reference completions and the answers of their base task
(`chain_fix` rows are exactly `chain` rows, prompt `"chain: ..."` included, so the held-out
problems and the teachers of the two are comparable one to one) and add a correction marker:

- `chain_fix`: `"!"` right after a value and then the right value: `3+4=8!7;7*2=14 => 14`
  reads as `3+4=7;7*2=14 => 14`. A value may be corrected more than once (`8!9!7` is 7), and
  the final answer too (`=> 13!14` is 14).
- `sort_fix`: the token `"<"` retracts the last element written: `1 3 7 < 5 9` reads as
  `1 3 5 9`; `1 8 9 < < 3 5` reads as `1 3 5`.

The verifier still compares only the final answer, after APPLYING the corrections: a
completion whose errors are all corrected verifies, one with an uncorrected error does not.
A malformed marker (`"!"` not between two numbers; `"<"` glued to a number or with nothing
left to retract) makes the completion unreadable (no answer), so marker spam never passes.

`count_corrections(text)` counts the marker characters (`!` and `<`) on the line the
verifier reads (the first non-empty one), malformed ones included: the benchmark uses it to
see whether students learned to recover, and a burst of them flags marker spam.

Error injection (`inject_errors`) writes a reference completion with `k` wrong values at
distinct value slots, each followed by its marker and the right value, and returns the
character spans of the wrong values: a teacher trained on such rows has the loss on those
spans masked (it must learn to fix errors, never to make them; `opd.tasks.recovery`).
Wrong values imitate a student's slips: chain, the right value off by 1 (half the time) or
by 2..5, else any value in `0..max(20, 2·right)`; sort, an element that belongs elsewhere in
the list (a skipped or repeated one) or the right element off by 1. Never negative, never
equal to the right value nor a prefix of it (a prefix ending in `=1` could still become the
right `=14`; one ending in a wrong value is wrong whatever follows).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from opd.tasks.base import first_line
from opd.tasks.synthetic import Chain, Sort

CHAIN_MARK = "!"
"""Chain: `value!right` replaces the value just written."""
SORT_MARK = "<"
"""Sort: the token `<` retracts the last element written."""
MARKS = CHAIN_MARK + SORT_MARK


def count_corrections(text: str) -> int:
    """Correction markers (`!` or `<`) on the first non-empty line of `text`.

    Malformed markers count too, so a spike flags marker spam; a clean completion has 0.
    """
    line = first_line(text)
    return sum(line.count(mark) for mark in MARKS)


def apply_chain_corrections(line: str) -> str | None:
    """The chain line with every `value!right[!right2...]` replaced by its last value.

    Returns None if a `!` is malformed (not directly between two integers).
    """
    if CHAIN_MARK not in line:
        return line
    if re.search(r"(?<!\d)!|!(?!\d)", line):
        return None
    return re.sub(r"\d+(?:!\d+)+", lambda m: m.group(0).rsplit(CHAIN_MARK, 1)[1], line)


def apply_sort_corrections(line: str) -> str | None:
    """The sort line with each `<` token removing the element before it.

    Returns None if a token is neither an integer nor `<`, or a `<` has nothing to retract.
    """
    kept: list[str] = []
    for token in line.split():
        if token == SORT_MARK:
            if not kept:
                return None
            kept.pop()
        elif re.fullmatch(r"[0-9]+", token):
            kept.append(token)
        else:
            return None
    return " ".join(kept)


@dataclass(frozen=True)
class Slot:
    """A value written in a reference completion: `completion[start:end] == right`."""

    start: int
    end: int
    right: str


class RecoverableTask:
    """Mixin: correction markers, slots for injected errors, and the corrected verifier."""

    base_name = ""
    """The base task whose prompts (`"<base_name>: ..."`) and completions are reused."""

    def sample(self, rng: random.Random, **knobs: int) -> dict[str, str]:
        """The base task's row, prompt `"<base_name>: ..."` included."""
        row = super().sample(rng, **knobs)  # type: ignore[misc]
        return {**row, "prompt": row["prompt"].replace(self.name, self.base_name, 1)}

    def apply_corrections(self, line: str) -> str | None:
        """The line as it reads with its corrections applied, or None if malformed."""
        raise NotImplementedError

    def extract_answer(self, text: str) -> str | None:
        """The base task's answer of the first line after applying its corrections."""
        line = self.apply_corrections(first_line(text))
        return None if line is None else super().extract_answer(line)  # type: ignore[misc]

    def count_corrections(self, text: str) -> int:
        """Markers on the first line (see the module's `count_corrections`)."""
        return count_corrections(text)

    def slots(self, row: dict[str, str]) -> list[Slot]:
        """Where a wrong value can be injected in the row's reference completion."""
        raise NotImplementedError

    def wrong_value(self, rng: random.Random, row: dict[str, str], slot: Slot) -> str:
        """A plausible wrong value for `slot` (never the right one)."""
        raise NotImplementedError

    def fix(self, wrong: str, right: str) -> tuple[str, str]:
        """`(marker text, right text)` written after `wrong`: the correction."""
        raise NotImplementedError


class ChainFix(RecoverableTask, Chain):
    """`chain` with `!` corrections: `3+4=8!7;7*2=14 => 14`."""

    name = "chain_fix"
    base_name = "chain"
    description = "chain with corrections: '3+4=8!7;7*2=14 => 14' ('!' then the right value)"

    def apply_corrections(self, line: str) -> str | None:
        return apply_chain_corrections(line)

    def slots(self, row: dict[str, str]) -> list[Slot]:
        """Each running value after `=` and the final answer after `=> `."""
        text = row["completion"]
        return [Slot(m.start(1), m.end(1), m.group(1)) for m in re.finditer(r"=>? ?(\d+)", text)]

    def wrong_value(self, rng: random.Random, row: dict[str, str], slot: Slot) -> str:
        right = int(slot.right)
        while True:
            roll = rng.random()
            if roll < 0.5:
                wrong = right + rng.choice((-1, 1))
            elif roll < 0.8:
                wrong = right + rng.choice((-1, 1)) * rng.randint(2, 5)
            else:
                wrong = rng.randint(0, max(20, 2 * right))
            if wrong >= 0 and wrong != right:
                return str(wrong)

    def fix(self, wrong: str, right: str) -> tuple[str, str]:
        return CHAIN_MARK, right

    def count_errors(self, prompt: str, text: str) -> int:
        """Wrong values written on the first line, corrected or not, each judged against the
        completion's own previous (corrected) value: `3+4=8;8*2=16` is one error (the second
        step is right given 8), `3+4=8!7;7*2=15` two. A step that does not read as
        `a op b = v` (or names another operation than the prompt's) is one error, and the
        count stops there; so does a missing `=> answer`."""
        expr = prompt.split(":", 1)[1].strip()
        value, ops = int(re.match(r"\d+", expr).group()), re.findall(r"([-+*])(\d+)", expr)
        body, arrow, final = first_line(text).partition("=>")
        steps, errors = [x for x in body.split(";") if x.strip()], 0
        for i, step in enumerate(steps):
            m = re.fullmatch(r"\s*(\d+)([-+*])(\d+)=(\d+(?:!\d+)*)\s*", step)
            if not m or i >= len(ops) or (m.group(2), m.group(3)) != ops[i]:
                return errors + 1
            a, b = int(m.group(1)), int(ops[i][1])
            errors += a != value  # copied the previous value wrong
            right = {"+": a + b, "-": a - b, "*": a * b}[m.group(2)]
            written = [int(v) for v in m.group(4).split(CHAIN_MARK)]
            errors += sum(v != right for v in written)
            value = written[-1]
        if len(steps) < len(ops) or not arrow:
            return errors + 1
        written = re.fullmatch(r"\s*(\d+(?:!\d+)*)\s*", final)
        if not written:
            return errors + 1
        return errors + sum(int(v) != value for v in written.group(1).split(CHAIN_MARK))


class SortFix(RecoverableTask, Sort):
    """`sort` with `<` retractions: `1 3 7 < 5 9`."""

    name = "sort_fix"
    base_name = "sort"
    description = "sort with retractions: '1 3 7 < 5 9' ('<' removes the last element)"

    def apply_corrections(self, line: str) -> str | None:
        return apply_sort_corrections(line)

    def slots(self, row: dict[str, str]) -> list[Slot]:
        """Each element of the sorted list."""
        text = row["completion"]
        return [Slot(m.start(), m.end(), m.group()) for m in re.finditer(r"\d+", text)]

    def wrong_value(self, rng: random.Random, row: dict[str, str], slot: Slot) -> str:
        values = [int(v) for v in row["prompt"].split(":", 1)[1].split()]
        right = int(slot.right)
        near = [v for v in (right - 1, right + 1) if v >= 0]
        others = sorted({v for v in values if v != right})
        pool = others if others and rng.random() < 0.6 else near
        return str(rng.choice(pool))

    def fix(self, wrong: str, right: str) -> tuple[str, str]:
        return f" {SORT_MARK} ", right


RECOVERABLE = (ChainFix, SortFix)


@dataclass
class Corrupted:
    """A completion with injected errors: `text`, the wrong values' `spans` and `n_errors`."""

    text: str
    spans: list[tuple[int, int]]
    n_errors: int


def _wrong(task: RecoverableTask, rng: random.Random, row: dict, slot: Slot) -> str:
    """A wrong value that is not a prefix of the right one (so a prefix ending in it is wrong
    whatever comes next: `=1` could still become `=14`)."""
    for _ in range(100):
        wrong = task.wrong_value(rng, row, slot)
        if not slot.right.startswith(wrong):
            return wrong
    return str(int(slot.right) + 1)  # never a prefix: same length or one digit longer


def inject_errors(
    task: RecoverableTask,
    row: dict[str, str],
    rng: random.Random,
    n_errors: int,
    *,
    prefix_only: bool = False,
) -> Corrupted:
    """The row's reference completion with `n_errors` corrected errors at distinct slots.

    Args:
      task: a recoverable task.
      row: one of its rows (`"prompt"`, `"completion"`).
      rng: draws the slots and the wrong values.
      n_errors: how many; capped at the number of slots.
      prefix_only: cut the text right after the LAST wrong value (its marker and everything
        after it dropped): a corrupted prefix from which a model must recover.

    Returns:
      `Corrupted(text, spans, n_errors)`; `text[a:b]` is a wrong value for each `(a, b)`.
    """
    slots = task.slots(row)
    chosen = sorted(rng.sample(range(len(slots)), min(n_errors, len(slots))))
    completion, out, spans, pos, length = row["completion"], [], [], 0, 0
    for i in chosen:
        slot = slots[i]
        wrong = _wrong(task, rng, row, slot)
        out.append(completion[pos : slot.start])
        length += slot.start - pos
        spans.append((length, length + len(wrong)))
        marker, right = task.fix(wrong, slot.right)
        out.append(wrong + marker + right)
        length += len(wrong) + len(marker) + len(right)
        pos = slot.end
    out.append(completion[pos:])
    text = "".join(out)
    if prefix_only and spans:
        text = text[: spans[-1][1]]
    return Corrupted(text, spans, len(chosen))


__all__ = [
    "CHAIN_MARK",
    "SORT_MARK",
    "RECOVERABLE",
    "ChainFix",
    "Corrupted",
    "RecoverableTask",
    "SortFix",
    "Slot",
    "apply_chain_corrections",
    "apply_sort_corrections",
    "count_corrections",
    "inject_errors",
]
