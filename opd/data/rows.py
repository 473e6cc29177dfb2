"""Row checks: turn one raw record (a dict from any reader) into a checked `Row`.

Accepted shapes (unknown extra fields are ignored; null or an empty CSV cell counts as absent):
  prompt      a non-empty string, or a chat list (TRL's conversational prompt-only format,
              treated exactly like `messages`)       exactly one of `prompt` / `messages`
  messages    [{"role": "system"|"user"|"assistant", "content": str}, ...]
  completion  optional: a string, or a list holding one assistant message
              (TRL's conversational completion: [{"role": "assistant", "content": ...}]).
              If absent and the chat list ends with an assistant turn, that turn becomes the
              completion and is removed from the prompt turns.
  answer      optional string or number; stored as a string.
  context, solution, feedback, demonstration
              optional strings (or numbers): privileged text that only a self-teacher sees
              (`opd.selfdistill`); kept in `Row.privileged` [self-distillation].

Every string field must be encodable as UTF-8: JSON's `"\\ud800"` (a lone surrogate) decodes
to a Python string that no tokenizer can encode, so it is refused here, row by row (and so
skippable with `skip_bad_rows`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opd.errors import DataError

ROLES = ("system", "user", "assistant")
CHAT_HINT = 'valid: a list of {"role": "system"|"user"|"assistant", "content": "..."}'
_COMPLETION_HINT = (
    'valid: the reference response text, or [{"role": "assistant", "content": "..."}], '
    "or leave it out"
)


@dataclass(frozen=True)
class Row:
    """One checked prompt row, as read from the file."""

    prompt: str | None
    """The plain prompt text; None when the row is a chat list."""
    messages: tuple | None
    """The chat turns as {"role", "content"} dicts (no final assistant turn); or None."""
    completion: str | None
    """The reference completion, if the row has one."""
    answer: str | None
    """The reference answer for a verifier, as a string."""
    source: str
    """Where the row came from: "file.jsonl:7" or "file.json:row 3"."""
    privileged: dict = field(default_factory=dict, hash=False)
    """[self-distillation] The row's privileged fields present (name -> text), see
    `PRIVILEGED_FIELDS`; only a self-teacher's prompt shows them."""


PRIVILEGED_FIELDS = ("context", "solution", "feedback", "demonstration")
"""[self-distillation] Row fields a self-teacher can be conditioned on (`opd.selfdistill`)."""


def bad_field(source: str, field: str, must: str, value: Any, hint: str) -> DataError:
    """A one-line error naming the row, the field, what it must be and what it was."""
    got = repr(value[:30]) if isinstance(value, str) else type(value).__name__
    return DataError(f"{source}: field '{field}' must be {must}, got {got} ({hint})")


def _check_text(value: str, source: str, field: str) -> str:
    """`value` unchanged if it encodes as UTF-8; else a DataError naming the field."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start : e.end].encode("unicode_escape").decode("ascii")
        raise DataError(
            f"{source}: field '{field}' holds a lone surrogate '{bad}' at character {e.start}, "
            "which is not text (valid: a JSON \\u escape only as a full surrogate pair, "
            "or plain UTF-8)"
        ) from None
    return value


def check_messages(value: Any, source: str, field: str = "messages") -> list[dict[str, str]]:
    """Check a chat list and return fresh {"role", "content"} dicts."""
    if not isinstance(value, (list, tuple)) or not value:
        raise bad_field(source, field, "a non-empty chat list", value, CHAT_HINT)
    turns = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            raise bad_field(source, f"{field}[{i}]", "an object", msg, CHAT_HINT)
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            hint = "valid: " + ", ".join(repr(r) for r in ROLES)
            raise bad_field(source, f"{field}[{i}].role", "a chat role", role, hint)
        if not isinstance(content, str):
            raise bad_field(source, f"{field}[{i}].content", "a string", content, CHAT_HINT)
        turns.append({"role": role, "content": _check_text(content, source, f"{field}[{i}]")})
    return turns


def _completion_text(value: Any, source: str) -> str | None:
    """The completion as text: a string, or the content of one assistant message."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        turns = check_messages(value, source, "completion")
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            roles = ", ".join(t["role"] for t in turns)
            raise DataError(
                f"{source}: field 'completion' as a chat list must hold exactly one assistant "
                f"message, got roles [{roles}] ({_COMPLETION_HINT})"
            )
        return turns[0]["content"]
    raise bad_field(source, "completion", "a string", value, _COMPLETION_HINT)


def parse_row(obj: Any, source: str) -> Row:
    """Check one raw record and turn it into a `Row`; raise `DataError` if it is malformed."""
    if not isinstance(obj, Mapping):
        got = type(obj).__name__
        raise DataError(f"{source}: row must be an object with 'prompt' or 'messages', got {got}")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    answer = obj.get("answer")
    if (prompt is None) == (messages is None):
        which = "both field 'prompt' and" if prompt is not None else "neither field 'prompt' nor"
        fields = ", ".join(repr(k) for k in obj) or "none"
        raise DataError(
            f"{source}: row has {which} field 'messages' (fields: {fields}; valid: exactly one)"
        )
    chat_field = "messages" if messages is not None else "prompt"
    if isinstance(prompt, (list, tuple)):  # TRL conversational prompt-only format
        messages, prompt = prompt, None
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        hint = "valid: a string, or a chat list of role/content messages"
        raise bad_field(source, "prompt", "a non-empty string", prompt, hint)
    if prompt is not None:
        _check_text(prompt, source, "prompt")
    completion = _completion_text(obj.get("completion"), source)
    if completion is not None:
        _check_text(completion, source, "completion")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float, type(None))):
        hint = 'valid: e.g. "42" or 42, or leave it out'
        raise bad_field(source, "answer", "a string or number", answer, hint)
    if isinstance(answer, str):
        _check_text(answer, source, "answer")
    chat = None
    if messages is not None:
        turns = check_messages(messages, source, chat_field)
        if completion is None and turns[-1]["role"] == "assistant":
            completion = turns.pop()["content"]
        if not turns:
            raise DataError(
                f"{source}: field '{chat_field}' must have a user or system turn before the "
                "final assistant turn (valid: at least one prompt turn)"
            )
        chat = tuple(turns)
    answer = None if answer is None else str(answer)
    return Row(prompt, chat, completion, answer, source, _privileged(obj, source))


def _privileged(obj: Mapping, source: str) -> dict:
    """[self-distillation] The privileged fields of a raw record, as checked text."""
    out = {}
    for name in PRIVILEGED_FIELDS:
        value = obj.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            hint = "valid: text a self-teacher sees in its prompt, or leave it out"
            raise bad_field(source, name, "a string", value, hint)
        out[name] = _check_text(str(value), source, name)
    return out
