"""Shipped tasks: prompt generators with exact verifiers.

`TASKS` maps a name to its `Task`; `get_task` looks one up with a helpful error.
`arithmetic` is the word-problem set for the demo with a real chat teacher; `sort`, `chain`,
`brackets` and `reverse` are synthetic tasks for tiny teachers trained from scratch
(`opd.tasks.teacher`); `chain_fix` and `sort_fix` are their variants with correction markers
(`opd.tasks.recoverable`). The arithmetic train/test files ship in `opd/tasks/data/`
(`shipped_path`).
"""

from __future__ import annotations

from opd.errors import ConfigError
from opd.tasks.arithmetic import Arithmetic
from opd.tasks.base import Task
from opd.tasks.recoverable import ChainFix, SortFix
from opd.tasks.shipped import load_shipped, shipped_path
from opd.tasks.synthetic import Brackets, Chain, Reverse, Sort

TASKS: dict[str, Task] = {
    t.name: t for t in (Arithmetic(), Sort(), Chain(), Brackets(), Reverse(), ChainFix(), SortFix())
}


def get_task(name: str) -> Task:
    """The registered task called `name`.

    Raises:
      ConfigError: if there is none; the message lists the valid names.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(
            f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}"
        ) from None


__all__ = ["TASKS", "Task", "get_task", "load_shipped", "shipped_path"]
