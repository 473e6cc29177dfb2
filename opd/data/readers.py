"""Prompt files: read records from a file (or a `datasets` folder) and check each row.

Formats, chosen by extension:
  .jsonl    one JSON object per line; blank lines are ignored.
  .json     a list of objects, or {"data": [...]}.
  .csv      a header row, then one row per record; a `messages` or chat-list `prompt` /
            `completion` cell holds a JSON chat list.
  .parquet  one row per record (needs `pip install pyarrow`, imported only when used).
  a folder  written by `datasets`' `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
            (needs `pip install datasets`; see `opd.data.hub`).

Errors: a malformed row raises `DataError` with one line naming the file, the line (JSONL
and CSV, 1-based, the CSV header is line 1) or row (JSON, parquet and datasets, 1-based), the
field and what would be valid. Row-level problems (bad JSON, bytes that are not UTF-8 on a
JSONL line, JSON nested too deeply for Python's parser, a lone surrogate, a bad field) are
skipped and counted with `skip_bad_rows=True`; file-level ones (missing, unreadable, a
directory, empty, not UTF-8 in a .json/.csv file) always raise. An empty file, or one whose
rows were all skipped, is always an error.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opd.data.rows import Row, parse_row
from opd.errors import ConfigError, DataError

FORMATS = (".jsonl", ".json", ".csv", ".parquet")
MAX_SKIPPED_EXAMPLES = 5
_CHAT_CELLS = ("messages", "prompt", "completion")
# The first key whose value opens a nested structure, to name the field of a too-deep row.
_NESTED_KEY = re.compile(r'\s*\{\s*"((?:[^"\\]|\\.)*)"\s*:\s*[\[{]')


@dataclass(frozen=True)
class LoadResult:
    """What `load_rows` read."""

    rows: list[Row]
    """The good rows, in file order."""
    skipped: int
    """How many bad rows were skipped (only with `skip_bad_rows=True`)."""
    skipped_examples: list[str]
    """The error messages of the first five skipped rows."""


def _too_deep(source: str, text: str) -> DataError:
    m = _NESTED_KEY.match(text)
    field = f"field '{m.group(1)}' is" if m else "the row is"
    return DataError(
        f"{source}: {field} JSON nested too deeply to parse (Python's recursion limit) "
        "(valid: a string prompt or a flat chat list)"
    )


def _decode(data: bytes, name: str) -> str:
    """UTF-8 text (a leading BOM dropped), or a DataError naming the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{name}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}) "
            "(valid: save the file as UTF-8)"
        ) from None


# ---------------------------------------------------------------------------- file readers
# Each reader yields (source, record) pairs; a record that cannot even be parsed is yielded
# as a DataError so that `skip_bad_rows` can skip it. File-level problems raise directly.


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            source = f"{path.name}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield (
                    source,
                    DataError(
                        f"{source}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1}) "
                        "(valid: save the file as UTF-8)"
                    ),
                )
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                hint = "valid: one JSON object per line"
                record = DataError(f"{source}: invalid JSON ({e.msg}, column {e.colno}) ({hint})")
            except RecursionError:
                record = _too_deep(source, line)
            yield source, record


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = _decode(path.read_bytes(), path.name)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path.name}:{e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(
            f"{path.name}: JSON nested too deeply to parse (Python's recursion limit) "
            "(valid: a list of flat row objects)"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        hint = 'valid: a list of row objects, or {"data": [...]}'
        raise DataError(f"{path}: top level is {type(data).__name__} ({hint})")
    for i, obj in enumerate(data, start=1):
        yield f"{path.name}:row {i}", obj


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    text = _decode(path.read_bytes(), path.name)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long prompts are bounded at encoding
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    while True:
        start = reader.line_num + 1  # a quoted cell may span lines; name the first
        try:
            cells = next(reader, None)
        except csv.Error as e:
            raise DataError(f"{path.name}:{start}: malformed CSV ({e})") from None
        if cells is None:
            return
        obj: dict[str, Any] = {k: v for k, v in zip(header, cells) if v.strip()}
        if not obj:
            continue
        for key in _CHAT_CELLS:  # a JSON chat list in a cell; a plain string stays a string
            cell = obj.get(key, "").lstrip()
            if not cell or (key != "messages" and not cell.startswith("[")):
                continue
            try:
                value = json.loads(cell)
            except (json.JSONDecodeError, RecursionError):
                continue  # left a string: the row check reports it (or it is a plain prompt)
            is_chat = isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
            if key == "messages" or is_chat:  # a prompt like "[1, 2]" stays text
                obj[key] = value
        yield f"{path.name}:{start}", obj


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: unreadable parquet ({type(e).__name__}: {e})") from None
    for i, obj in enumerate(records, start=1):
        yield f"{path.name}:row {i}", obj


_READERS = dict(zip(FORMATS, (_read_jsonl, _read_json, _read_csv, _read_parquet)))


def check_rows(
    records: Iterable[tuple[str, Any]], label: str, *, skip_bad_rows: bool, limit: int | None
) -> LoadResult:
    """Check (source, record) pairs from a reader; `label` names the whole set in errors."""
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1 or None, got {limit}")
    rows: list[Row] = []
    skipped, examples, seen = 0, [], 0
    for source, record in records:
        seen += 1
        try:
            if isinstance(record, DataError):
                raise record
            rows.append(parse_row(record, source))
        except DataError as e:
            if not skip_bad_rows:
                raise
            skipped += 1
            if len(examples) < MAX_SKIPPED_EXAMPLES:
                examples.append(str(e))
        if limit is not None and len(rows) >= limit:
            break
    if seen == 0:
        raise DataError(f"{label}: no rows (valid: at least one row with 'prompt' or 'messages')")
    if not rows:
        raise DataError(f"{label}: all {skipped} rows are malformed; first: {examples[0]}")
    return LoadResult(rows=rows, skipped=skipped, skipped_examples=examples)


def load_rows(
    path: str | Path,
    *,
    skip_bad_rows: bool = False,
    limit: int | None = None,
    split: str | None = None,
) -> LoadResult:
    """Read and check a prompt file (or a folder saved with `datasets`' `save_to_disk`).

    Args:
      path: a .jsonl, .json, .csv or .parquet file, or a `save_to_disk` folder.
      skip_bad_rows: skip and count malformed rows instead of raising on the first one.
      limit: stop after this many good rows; None reads the whole file.
      split: the split of a saved `DatasetDict` (default: its only split, else an error).

    Returns:
      A `LoadResult` with the good rows in file order and the skip count.

    Raises:
      DataError: a missing, unreadable or empty file, a directory that is no saved dataset,
        an unknown extension, a bad row (unless skipped), or every row skipped.
    """
    path = Path(path)
    if path.is_dir():
        from opd.data.hub import is_saved_dataset, read_saved_dataset

        if not is_saved_dataset(path):
            raise DataError(
                f"{path}: is a directory, not a prompt file (valid: a .jsonl, .json, .csv or "
                ".parquet file, or a folder written by datasets' save_to_disk)"
            )
        records = read_saved_dataset(path, split)
        return check_rows(records, str(path), skip_bad_rows=skip_bad_rows, limit=limit)
    if not path.exists():
        raise DataError(f"prompt file not found: {path}")
    if not path.is_file():  # a FIFO or device would block or never end
        raise DataError(f"{path}: not a regular file (valid: a prompt file or a folder)")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        valid = ", ".join(FORMATS)
        raise DataError(f"{path}: unknown prompt file extension {path.suffix!r} (valid: {valid})")
    if split is not None:
        raise DataError(f"{path}: a ':{split}' split only applies to a saved datasets folder")
    try:
        return check_rows(reader(path), str(path), skip_bad_rows=skip_bad_rows, limit=limit)
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise DataError(f"{path}: cannot read the prompt file ({why})") from None
