"""Prompt sets of a run: where the train and eval prompts come from, loaded and encoded.

Sources (`data.train`, `data.eval`):
  task:NAME[:SPLIT]     a prompt file shipped with a task (`opd/tasks/data`), with its verifier
  FILE                  .jsonl / .json / .csv / .parquet (`opd.data.readers`)
  DIR[:SPLIT]           a folder saved with `datasets`' `save_to_disk` (`opd.data.hub`)
  hf:ORG/NAME:SPLIT     a Hub dataset, only with data.allow_download=true (`opd.data.hub`)

The eval rule. `data.eval` given: its first `data.eval_count` rows. `data.eval` empty (the
default), the eval set follows `data.train`:
  * a shipped task's train split -> the same task's test split (first `eval_count` rows);
  * anything else -> k = min(eval_count, max(1, n // 5)) of the n good rows of `data.train`
    are held out (removed from training), chosen by `numpy.random.default_rng(train.seed)`;
    so a user's file is never evaluated on the shipped arithmetic set, and at least four
    fifths of a small file stays for training. A one-row file holds out nothing.
`data.eval_count=0` turns held-out evaluation off. `PromptSets.describe()` states which rule
applied, one line for train and one for eval, for the run's first lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from opd.config import DataConfig
from opd.data.encode import encode_rows
from opd.data.hub import HUB_PREFIX, read_hub_dataset
from opd.data.readers import LoadResult, check_rows, load_rows
from opd.data.rows import Row
from opd.errors import DataError

HOLDOUT_SHARE = 5
"""Without `data.eval`, at most 1/HOLDOUT_SHARE of the training rows are held out."""


@dataclass
class PromptSets:
    """The encoded train and eval prompts of a run, and where they came from."""

    train: list  # of opd.data.Example
    eval: list
    task: object | None  # an opd.tasks.Task when the data is a shipped task (its verifier)
    truncated: int = 0
    skipped: int = 0  # malformed rows skipped under data.skip_bad_rows
    skipped_examples: list = None
    sources: list = field(default_factory=list)  # the two lines of `describe()`

    def describe(self) -> list[str]:
        """One line each for the train and the eval source, e.g. "train: my.jsonl (480 rows)"."""
        return list(self.sources)


@dataclass
class _Loaded:
    result: LoadResult
    task: object | None
    label: str  # how the source is named in `describe()`


def _task_split(spec: str, default_split: str) -> tuple[str, str] | None:
    """(name, split) of 'task:NAME[:SPLIT]', or None for other sources."""
    if not spec.startswith("task:"):
        return None
    parts = spec.split(":")
    return parts[1], parts[2] if len(parts) > 2 else default_split


def _load(spec: str, key: str, cfg, default_split: str) -> _Loaded:
    """Rows of one source (see the module docstring), checked."""
    skip = cfg.data.skip_bad_rows
    named = _task_split(spec, default_split)
    if named is not None:
        from opd.tasks import get_task, shipped_path

        name, split = named
        task = get_task(name)
        result = load_rows(shipped_path(name, split), skip_bad_rows=skip)
        return _Loaded(result, task, f"shipped task '{name}', split '{split}'")
    if spec.startswith(HUB_PREFIX):
        allow = cfg.data.allow_download or getattr(cfg.model, "allow_download", False)
        records = read_hub_dataset(spec, allow, key)
        return _Loaded(check_rows(records, spec, skip_bad_rows=skip, limit=None), None, spec)
    if not spec.strip():
        raise DataError(f"{key} is empty (valid: a prompt file, a folder, hf:ORG/NAME:SPLIT "
                        "or task:NAME)")  # fmt: skip
    path, split = Path(spec), None
    head, sep, tail = spec.rpartition(":")
    if not path.exists() and sep and head and Path(head).is_dir():  # DIR:SPLIT
        path, split = Path(head), tail
    return _Loaded(load_rows(path, skip_bad_rows=skip, split=split), None, spec)


def _count(n: int, total: int) -> str:
    return f"{n} rows" if n == total else f"first {n} of {total} rows"


def holdout(rows: list[Row], eval_count: int, seed: int) -> tuple[list[Row], list[Row], str]:
    """(train, held out, why) with the rule of the module docstring."""
    from opd.stream import split_rows

    n = len(rows)
    k = min(eval_count, max(1, n // HOLDOUT_SHARE))
    if n < 2:
        return rows, [], ""
    capped = (
        f"; data.eval_count={eval_count} capped at a fifth of {n} rows" if k < eval_count else ""
    )
    train, held = split_rows(rows, eval_count=k, seed=seed)
    return train, held, f"{k} rows, chosen by train.seed={seed}{capped}"


def encode_options(d) -> dict:
    """`encode_rows` keyword arguments from a `DataConfig`."""
    return dict(
        max_prompt_tokens=d.max_prompt_tokens,
        truncation=d.truncation,
        use_chat_template={"auto": "auto", "true": True, "false": False}[d.chat_template],
        system_prompt=d.system_prompt or None,
    )


def build_data(cfg, tokenizer, *, need_train: bool = True) -> PromptSets:
    """Load and encode the train and eval prompts of `cfg.data` (rules in the module docstring).

    Args:
      cfg: a `RunConfig`.
      tokenizer: the run's tokenizer.
      need_train: False (e.g. `opd eval` with `data.eval` given) skips loading `data.train`.

    Raises:
      DataError / ConfigError: an unreadable source or a bad row, with one line naming it.
    """
    d = cfg.data
    enc_kw = encode_options(d)
    default_note = "; data.train not given" if d.train == DataConfig().train else ""
    follows = "data.eval not given, follows data.train"
    eval_spec = d.eval
    named = _task_split(d.train, "train")
    if not eval_spec and named is not None and named[1] != "test":
        eval_spec = f"task:{named[0]}:test"  # a shipped task's own test split
    train_rows, task, skipped, examples = [], None, 0, []
    train_line = "train: not loaded (only data.eval is needed)"
    if need_train or not eval_spec:
        tr = _load(d.train, "data.train", cfg, "train")
        train_rows, task = tr.result.rows, tr.task
        skipped, examples = tr.result.skipped, list(tr.result.skipped_examples)
        train_line = f"train: {tr.label} ({len(train_rows)} rows{default_note})"
    if d.eval_count == 0:
        eval_rows, eval_line = [], "eval: none (data.eval_count=0)"
    elif eval_spec:
        ev = _load(eval_spec, "data.eval", cfg, "test")
        task = task or ev.task
        skipped += ev.result.skipped
        examples += ev.result.skipped_examples
        eval_rows = ev.result.rows[: d.eval_count]
        note = "" if d.eval else f"; {follows}"
        eval_line = f"eval: {ev.label} ({_count(len(eval_rows), len(ev.result.rows))}{note})"
    else:
        n = len(train_rows)
        train_rows, eval_rows, why = holdout(train_rows, d.eval_count, cfg.train.seed)
        eval_line = f"eval: held out from {d.train} ({why}; {follows})"
        if not eval_rows:
            eval_line = f"eval: none ({d.train} has 1 row, none to spare; set data.eval=FILE)"
        else:
            train_line = f"train: {tr.label} ({len(train_rows)} of {n} rows{default_note})"
    if skipped:
        train_line += f"; {skipped} bad rows skipped"
    train_enc = encode_rows(train_rows, tokenizer, **enc_kw) if train_rows else None
    eval_enc = encode_rows(eval_rows, tokenizer, **enc_kw) if eval_rows else None
    return PromptSets(
        train=list(train_enc.examples) if train_enc else [],
        eval=list(eval_enc.examples) if eval_enc else [],
        task=task,
        truncated=(train_enc.truncated if train_enc else 0)
        + (eval_enc.truncated if eval_enc else 0),
        skipped=skipped,
        skipped_examples=examples[:5],
        sources=[train_line, eval_line],
    )
