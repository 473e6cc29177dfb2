"""Named task variants (longer outputs, where errors compound) and task specs with knobs.

A task spec is a registered task name, `name:knob=value,knob=value`, or a variant name.
A variant fixes the task's knobs and the teacher preset sized for them:

    chain_long / chain_fix_long   12-step chains, running values in 0..50
    chain_xl   / chain_fix_xl     16-step chains
    sort_long  / sort_fix_long    16 numbers in 0..49
    sort_xl    / sort_fix_xl      20 numbers in 0..49

(`opd bench quality --task chain_fix_long`). The clean and `_fix` variants share knobs,
prompts and teacher size; the `_fix` teacher also trains on corrupted prefixes with up to 3
errors (a weak student makes more errors on longer outputs). Chains of 8-16 steps and sorts of
12-20 numbers are the knob ranges meant (any value works: `chain_fix:steps=8`).

Sizes, and what was tried: the default teachers (2 x 128) reach >= 97 % on the short tasks.
Per-step errors compound over a longer output (p^12 for 12 steps), so the long teachers are
one layer deeper (3 x 128, 519,296 parameters) and train 3x longer; the suggested student
(`STUDENT_FOR_LONG`: 3 x 96, 297,312 parameters) is one layer deeper than the default 2 x 64,
as each chain step is the short task's sub-problem but the sequence is 3-4x longer. These are
choices by that argument, not tuned: the only things tried were that every variant's rows fit
the teachers' 256 positions, and the step cost (5 steps of `chain_fix_long`: 15 s/step on one
thread of the shared 2-core machine at load ~11), which puts one long teacher at hours here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opd.errors import ConfigError
from opd.tasks import get_task
from opd.tasks.teacher import TeacherPreset


@dataclass(frozen=True)
class Variant:
    """A task with fixed knobs and a teacher preset."""

    task: str
    knobs: dict = field(default_factory=dict)
    preset: TeacherPreset | None = None


_LONG = TeacherPreset(hidden=128, layers=3, steps=3000, warmup=200)
_FIX = {"corrupt_fraction": 0.5, "max_errors": 3}
_KNOBS = {
    "chain_long": {"steps": 12, "max_value": 50},
    "chain_xl": {"steps": 16, "max_value": 50},
    "sort_long": {"length": 16, "max_value": 49},
    "sort_xl": {"length": 20, "max_value": 49},
}
VARIANTS: dict[str, Variant] = {}
for _name, _knobs in _KNOBS.items():
    _base, _size = _name.split("_")
    VARIANTS[_name] = Variant(_base, _knobs, _LONG)
    VARIANTS[f"{_base}_fix_{_size}"] = Variant(f"{_base}_fix", _knobs, TeacherPreset(
        **{**_LONG.__dict__, **_FIX}))  # fmt: skip

STUDENT_FOR_LONG = {"student_hidden": 96, "student_layers": 3, "student_heads": 4}
"""Student settings of `opd bench quality` suggested for the long variants."""


def task_spec(spec: str) -> Variant:
    """The task, knobs and preset of a spec: `name`, `name:knob=v,knob=v` or a variant.

    Raises:
      ConfigError: for an unknown task or knob, or a knob value that is not an integer.
    """
    if spec in VARIANTS:
        return VARIANTS[spec]
    name, _, rest = spec.partition(":")
    task = get_task(name.strip())
    knobs = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not value.strip().lstrip("-").isdigit():
            raise ConfigError(
                f"task spec {spec!r}: {item!r} is not knob=integer; valid knobs of "
                f"{task.name!r}: {', '.join(task.default_knobs) or 'none'}"
            )
        knobs[key.strip()] = int(value)
    task.resolve_knobs(knobs)
    return Variant(task.name, knobs, None)
