"""Prompt files shipped inside the package, generated once from the task generators.

`opd/tasks/data/<task>_<split>.jsonl` holds rows `{"prompt", "completion", "answer"}`.
The test split is drawn first; the train split is drawn from another seed with every test
prompt (and every repeat) skipped, so the two never share a prompt. Regenerate with
`python -c "from opd.tasks.shipped import write_shipped; write_shipped()"`; the output is
byte-identical for the same code, and a test checks the shipped files against it.
"""

from __future__ import annotations

import json
from pathlib import Path

from opd.errors import ConfigError, DataError

DATA_DIR = Path(__file__).parent / "data"

SHIPPED: dict[str, dict[str, tuple[int, int]]] = {
    "arithmetic": {"test": (100, 1), "train": (500, 0)},
}
"""task -> split -> (rows, seed). Test splits are built before train splits."""


def shipped_path(name: str, split: str) -> Path:
    """The path of a shipped prompt file.

    Args:
      name: a task with shipped files (see `SHIPPED`).
      split: `"train"` or `"test"`.

    Returns:
      `opd/tasks/data/<name>_<split>.jsonl` inside the installed package.

    Raises:
      ConfigError: if no such file ships; the message lists the ones that do.
    """
    if split not in SHIPPED.get(name, {}):
        valid = ", ".join(f"{t}/{s}" for t, splits in SHIPPED.items() for s in splits)
        raise ConfigError(f"no shipped prompt file {name}/{split}; shipped: {valid}")
    return DATA_DIR / f"{name}_{split}.jsonl"


def load_shipped(name: str, split: str) -> list[dict[str, str]]:
    """The rows of a shipped prompt file.

    Raises:
      ConfigError: for an unknown file; DataError: if it is missing from the install.
    """
    path = shipped_path(name, split)
    if not path.is_file():
        raise DataError(f"{path}: shipped prompt file is missing; reinstall opd")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_shipped(name: str) -> dict[str, list[dict[str, str]]]:
    """Generate the splits of `name` as in `SHIPPED`, with no prompt in two splits.

    Returns:
      split -> rows, each split exactly its row count, prompts unique across all splits.
    """
    from opd.tasks import get_task  # deferred: opd.tasks imports this module

    task, seen, splits = get_task(name), set(), {}
    for split, (n_rows, seed) in SHIPPED[name].items():
        rows, pool = [], task.generate(50 * n_rows, seed)
        for row in pool:
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                rows.append(row)
            if len(rows) == n_rows:
                break
        if len(rows) < n_rows:
            raise RuntimeError(f"{name}/{split}: only {len(rows)} distinct prompts")
        splits[split] = rows
    return splits


def write_shipped(out_dir: Path = DATA_DIR) -> list[Path]:
    """Write every shipped file to `out_dir`; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SHIPPED:
        for split, rows in build_shipped(name).items():
            path = out_dir / f"{name}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            paths.append(path)
    return paths
