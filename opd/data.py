"""Prompt sets: load rows from a file, check them, encode them to token ids, batch them.

On-policy distillation needs only prompts (the student writes the completions); a reference
`completion` (off-policy warm-up, held-out KL) and an `answer` (task verifiers) are optional.

Formats, chosen by extension:
  .jsonl    one JSON object per line; blank lines are ignored.
  .json     a list of objects, or {"data": [...]}.
  .csv      a header row, then one row per record; a `messages` cell holds a JSON chat list.
  .parquet  one row per record (needs `pip install pyarrow`, imported only when used).

Row schema (unknown extra fields are ignored; null or an empty CSV cell counts as absent):
  prompt      non-empty string                 exactly one of `prompt` / `messages`
  messages    [{"role": "system"|"user"|"assistant", "content": str}, ...]
  completion  string, optional; if absent and `messages` ends with an assistant turn, that
              turn becomes the completion and is removed from `messages`.
  answer      string or number, optional; stored as a string.

Errors: a malformed row raises `DataError` with one line naming the file, the line (JSONL
and CSV, 1-based, the CSV header is line 1) or row (JSON and parquet, 1-based), the field
and what would be valid. With `skip_bad_rows=True` such rows are counted and skipped. An
empty file, or one whose rows were all skipped, is always an error.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from opd.errors import ConfigError, DataError, ModelError

FORMATS = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
# End-of-turn tokens of ChatML (Qwen, SmolLM), Llama 3 and Gemma, in the order tried.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")
MAX_SKIPPED_EXAMPLES = 5
_CHAT_HINT = 'valid: a list of {"role": "system"|"user"|"assistant", "content": "..."}'

T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    """One checked prompt row, as read from the file."""

    prompt: str | None
    """The plain prompt text; None when the row uses `messages`."""
    messages: tuple | None
    """The chat turns as {"role", "content"} dicts (no final assistant turn); or None."""
    completion: str | None
    """The reference completion, if the row has one."""
    answer: str | None
    """The reference answer for a verifier, as a string."""
    source: str
    """Where the row came from: "file.jsonl:7" or "file.json:row 3"."""


@dataclass(frozen=True)
class LoadResult:
    """What `load_rows` read."""

    rows: list[Row]
    """The good rows, in file order."""
    skipped: int
    """How many bad rows were skipped (only with `skip_bad_rows=True`)."""
    skipped_examples: list[str]
    """The error messages of the first five skipped rows."""


@dataclass(frozen=True)
class Example:
    """One encoded prompt, ready for generation."""

    prompt_ids: tuple[int, ...]
    """The prompt token ids, after the chat template and truncation."""
    completion_ids: tuple[int, ...] | None
    """The reference completion ids, ending with the end-of-turn (or eos) id; or None."""
    answer: str | None
    """The reference answer for a verifier."""
    source: str
    """The `Row.source` this example came from."""
    prompt_text: str
    """The rendered prompt string (what `prompt_ids` decode to), for display."""


@dataclass(frozen=True)
class EncodeResult:
    """What `encode_rows` produced."""

    examples: list[Example]
    """One example per row, in order."""
    truncated: int
    """How many prompts were cut to `max_prompt_tokens`."""


# ---------------------------------------------------------------------------- row checks


def _bad(source: str, field: str, must: str, value: Any, hint: str) -> DataError:
    got = repr(value[:30]) if isinstance(value, str) else type(value).__name__
    return DataError(f"{source}: field '{field}' must be {must}, got {got} ({hint})")


def _check_messages(value: Any, source: str) -> list[dict[str, str]]:
    """Check a chat list and return fresh {"role", "content"} dicts."""
    if not isinstance(value, (list, tuple)) or not value:
        raise _bad(source, "messages", "a non-empty chat list", value, _CHAT_HINT)
    turns = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            raise _bad(source, f"messages[{i}]", "an object", msg, _CHAT_HINT)
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            hint = "valid: " + ", ".join(repr(r) for r in ROLES)
            raise _bad(source, f"messages[{i}].role", "a chat role", role, hint)
        if not isinstance(content, str):
            raise _bad(source, f"messages[{i}].content", "a string", content, _CHAT_HINT)
        turns.append({"role": role, "content": content})
    return turns


def _parse_row(obj: Any, source: str) -> Row:
    """Check one raw record and turn it into a `Row`; raise `DataError` if it is malformed."""
    if not isinstance(obj, Mapping):
        got = type(obj).__name__
        raise DataError(f"{source}: row must be an object with 'prompt' or 'messages', got {got}")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    completion, answer = obj.get("completion"), obj.get("answer")
    if (prompt is None) == (messages is None):
        which = "both field 'prompt' and" if prompt is not None else "neither field 'prompt' nor"
        fields = ", ".join(repr(k) for k in obj) or "none"
        raise DataError(
            f"{source}: row has {which} field 'messages' (fields: {fields}; valid: exactly one)"
        )
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        hint = "valid: a string, or use 'messages' with a chat list"
        raise _bad(source, "prompt", "a non-empty string", prompt, hint)
    if completion is not None and not isinstance(completion, str):
        hint = "valid: the reference response text, or leave it out"
        raise _bad(source, "completion", "a string", completion, hint)
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float, type(None))):
        hint = 'valid: e.g. "42" or 42, or leave it out'
        raise _bad(source, "answer", "a string or number", answer, hint)
    chat = None
    if messages is not None:
        turns = _check_messages(messages, source)
        if completion is None and turns[-1]["role"] == "assistant":
            completion = turns.pop()["content"]
        if not turns:
            raise DataError(
                f"{source}: field 'messages' must have a user or system turn before the final "
                "assistant turn (valid: at least one prompt turn)"
            )
        chat = tuple(turns)
    answer = None if answer is None else str(answer)
    return Row(prompt, chat, completion, answer, source)


# ---------------------------------------------------------------------------- file readers
# Each reader yields (source, record) pairs; a record that cannot even be parsed is yielded
# as a DataError so that `skip_bad_rows` can skip it. File-level problems raise directly.


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path.name}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                hint = "valid: one JSON object per line"
                record = DataError(f"{source}: invalid JSON ({e.msg}, column {e.colno}) ({hint})")
            yield source, record


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path.name}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        hint = 'valid: a list of row objects, or {"data": [...]}'
        raise DataError(f"{path}: top level is {type(data).__name__} ({hint})")
    for i, obj in enumerate(data, start=1):
        yield f"{path.name}:row {i}", obj


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        while True:
            start = reader.line_num + 1  # a quoted cell may span lines; name the first
            cells = next(reader, None)
            if cells is None:
                return
            obj = {k: v for k, v in zip(header, cells) if v.strip()}
            if not obj:
                continue
            try:
                obj["messages"] = json.loads(obj["messages"])
            except (KeyError, json.JSONDecodeError):
                pass  # absent, or left a string that the row check reports
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


def load_rows(
    path: str | Path, *, skip_bad_rows: bool = False, limit: int | None = None
) -> LoadResult:
    """Read and check a prompt file.

    Args:
      path: a .jsonl, .json, .csv or .parquet file (schema in the module docstring).
      skip_bad_rows: skip and count malformed rows instead of raising on the first one.
      limit: stop after this many good rows; None reads the whole file.

    Returns:
      A `LoadResult` with the good rows in file order and the skip count.

    Raises:
      DataError: a missing, unreadable or empty file, an unknown extension, a bad row
        (unless skipped), or every row skipped.
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1 or None, got {limit}")
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        valid = ", ".join(FORMATS)
        raise DataError(f"{path}: unknown prompt file extension {path.suffix!r} (valid: {valid})")
    rows: list[Row] = []
    skipped, examples, seen = 0, [], 0
    try:
        for source, record in reader(path):
            seen += 1
            try:
                if isinstance(record, DataError):
                    raise record
                rows.append(_parse_row(record, source))
            except DataError as e:
                if not skip_bad_rows:
                    raise
                skipped += 1
                if len(examples) < MAX_SKIPPED_EXAMPLES:
                    examples.append(str(e))
            if limit is not None and len(rows) >= limit:
                break
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: unreadable ({e}) (valid: UTF-8 text)") from None
    if seen == 0:
        raise DataError(f"{path}: no rows (valid: at least one row with 'prompt' or 'messages')")
    if not rows:
        raise DataError(f"{path}: all {skipped} rows are malformed; first: {examples[0]}")
    return LoadResult(rows=rows, skipped=skipped, skipped_examples=examples)


# ---------------------------------------------------------------------------- encoding


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of `token` if it is in the vocabulary, else None."""
    tid = tokenizer.convert_tokens_to_ids(token)
    return None if tid is None or tid == tokenizer.unk_token_id else int(tid)


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The token ids that end a completion, for stopping generation.

    Args:
      tokenizer: a Hugging Face tokenizer.

    Returns:
      eos, then each of `END_OF_TURN_TOKENS` in the vocabulary; distinct, order stable,
      empty if the tokenizer has none of them.
    """
    ids: list[int] = []
    for tid in [tokenizer.eos_token_id] + [_token_id(tokenizer, t) for t in END_OF_TURN_TOKENS]:
        if tid is not None and int(tid) not in ids:
            ids.append(int(tid))
    return ids


def _turn_end_id(tokenizer: Any) -> int | None:
    """The id that ends a chat completion: the first end-of-turn token found, else eos."""
    found = (_token_id(tokenizer, t) for t in END_OF_TURN_TOKENS)
    return next((t for t in found if t is not None), tokenizer.eos_token_id)


def _as_ids(encoded: Any) -> list[int]:
    """Token ids from `apply_chat_template(tokenize=True)`: a list, or a dict/BatchEncoding."""
    if isinstance(encoded, Mapping):  # transformers 5 returns a BatchEncoding by default
        encoded = encoded["input_ids"]
    if encoded and isinstance(encoded[0], (list, tuple)):
        encoded = encoded[0]
    return [int(i) for i in encoded]


def _render(
    row: Row, tokenizer: Any, chat: bool, system_prompt: str | None
) -> tuple[str, list[int]]:
    """The prompt text and its token ids, with or without the chat template."""
    if chat:
        turns = list(row.messages or [{"role": "user", "content": row.prompt}])
        if system_prompt is not None and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": system_prompt})
        kw = {"add_generation_prompt": True}
        text = tokenizer.apply_chat_template(turns, tokenize=False, **kw)
        return text, _as_ids(tokenizer.apply_chat_template(turns, tokenize=True, **kw))
    if row.prompt is None:
        raise DataError(
            f"{row.source}: a 'messages' row needs a chat template, but use_chat_template is "
            "false or the tokenizer has none (valid: a 'prompt' row, or a chat tokenizer)"
        )
    text = row.prompt if system_prompt is None else f"{system_prompt}\n\n{row.prompt}"
    return text, list(tokenizer(text, add_special_tokens=True).input_ids)


def encode_rows(
    rows: Sequence[Row],
    tokenizer: Any,
    *,
    max_prompt_tokens: int = 512,
    truncation: str = "left",
    use_chat_template: bool | str = "auto",
    system_prompt: str | None = None,
) -> EncodeResult:
    """Turn checked rows into token ids.

    With a chat template a `prompt` row becomes one user turn, `system_prompt` becomes a
    leading system turn (unless the row starts with one), and the template adds the
    generation prompt. Without one the text is tokenized with the tokenizer's special tokens
    and `system_prompt` is joined in front with a blank line.

    Args:
      rows: rows from `load_rows`.
      tokenizer: a Hugging Face tokenizer.
      max_prompt_tokens: the longest prompt kept, in tokens.
      truncation: "left" keeps the last `max_prompt_tokens` tokens of a longer prompt (the
        start, template header included, is lost); "error" raises instead.
      use_chat_template: "auto" uses the tokenizer's chat template if it has one; True
        requires one; False always uses plain text.
      system_prompt: an optional system message for every row.

    Returns:
      An `EncodeResult`: one `Example` per row and the count of truncated prompts.

    Raises:
      ConfigError: a bad option. DataError: a required chat template is missing, a
        `messages` row without one, or an over-long prompt with truncation="error".
      ModelError: a row has a completion but the tokenizer has no end token.
    """
    if not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1:
        raise ConfigError(f"max_prompt_tokens must be an integer >= 1, got {max_prompt_tokens!r}")
    if truncation not in ("left", "error"):
        raise ConfigError(f"truncation must be 'left' or 'error', got {truncation!r}")
    if use_chat_template not in ("auto", True, False):
        raise ConfigError(
            f"use_chat_template must be 'auto', true or false, got {use_chat_template!r}"
        )
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is True and not has_template:
        raise DataError(
            "use_chat_template is true but the tokenizer has no chat_template "
            "(valid: a chat model's tokenizer, or use_chat_template 'auto' or false)"
        )
    chat = has_template and use_chat_template is not False
    end_id = _turn_end_id(tokenizer) if chat else tokenizer.eos_token_id

    examples, truncated = [], 0
    for row in rows:
        text, ids = _render(row, tokenizer, chat, system_prompt)
        if len(ids) > max_prompt_tokens:
            if truncation == "error":
                raise DataError(
                    f"{row.source}: prompt is {len(ids)} tokens, over max_prompt_tokens="
                    f"{max_prompt_tokens} (valid: raise max_prompt_tokens, shorten the "
                    "prompt, or use truncation='left')"
                )
            ids = ids[-max_prompt_tokens:]
            text = tokenizer.decode(ids)
            truncated += 1
        completion_ids = None
        if row.completion is not None:
            if end_id is None:
                raise ModelError(f"{row.source}: the tokenizer has no eos or end-of-turn token")
            body = tokenizer(row.completion, add_special_tokens=False).input_ids
            completion_ids = (*(int(i) for i in body), int(end_id))
        examples.append(Example(tuple(ids), completion_ids, row.answer, row.source, text))
    return EncodeResult(examples=examples, truncated=truncated)


# ---------------------------------------------------------------------------- batching


def __getattr__(name: str):
    """`PromptStream` and `split_rows` live in `opd.stream`; importable from here too."""
    if name in ("PromptStream", "split_rows"):
        from opd import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'opd.data' has no attribute {name!r}")
