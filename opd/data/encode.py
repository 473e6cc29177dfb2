"""Encoding: checked rows to token ids (chat template, system prompt, bounded truncation).

Truncation is from the left: a prompt over `max_prompt_tokens` keeps its last
`max_prompt_tokens` tokens (the start, template header included, is lost).

Bounded work per row. Tokenising a whole 50 MB line to keep its last 256 tokens costs minutes
and gigabytes, so before tokenising, a long text field (a plain prompt, or each chat turn's
content) is cut: the tail starts at the first whitespace run that begins after the last
W characters, W = (max_prompt_tokens + MARGIN_TOKENS) × CHARS_PER_TOKEN, and is tokenised
alone. If it yields at least max_prompt_tokens + MARGIN_TOKENS tokens the cut is kept;
otherwise W grows fourfold and the check repeats (so the work is a few times what the kept
tokens need, whatever the tokenizer's characters per token). Pre-tokenizers split words at
whitespace, so the words after the cut tokenise exactly as in the whole text; the few tokens
a cut can still change (e.g. newlines that Llama 3's pattern joins to the punctuation before
them) lie ≥ MARGIN_TOKENS tokens before the kept ones. So the kept ids equal full
tokenisation followed by left truncation (tested against full tokenisation with a trained
BPE, and on a multi-megabyte line). A last word longer than the window is kept whole (the
tail starts where it starts). The deviation: a stretch without whitespace longer than
MAX_WORD_CHARS (a 50 MB "word") is cut inside; BPE may then split the kept end of that
stretch differently from full tokenisation. Completions are not cut (their length is the user's choice).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opd.data.rows import Row
from opd.errors import ConfigError, DataError, ModelError

# End-of-turn tokens of ChatML (Qwen, SmolLM), Llama 3 and Gemma, in the order tried.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")
CHARS_PER_TOKEN = 8
"""Characters per token assumed for the first cut window (grown fourfold when too few)."""
MARGIN_TOKENS = 16
"""Tokens beyond max_prompt_tokens that a cut must yield, so the cut's edge is never kept."""
MAX_WORD_CHARS = 100_000
"""A stretch without whitespace longer than this is cut inside (the one inexact case)."""
_WORD_END = re.compile(r"(?<=\S)\s")
"""The start of a whitespace run: pre-tokenizers (GPT-2/Llama 3 regexes, SentencePiece's
whitespace split) never merge across it, so a cut there leaves every later word intact."""


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
    raw_prompt: object = None
    """[crosstok] the prompt before the chat template: a tuple of (("role", r), ("content", c))
    messages (chat) or the prompt string (plain); None when the prompt was truncated. A
    teacher with another tokenizer renders it with its own template (`opd.crosstok`)."""
    privileged: dict = field(default_factory=dict, hash=False, repr=False)
    """[self-distillation] The row's privileged fields (name -> text, `Row.privileged`)."""
    view: PromptView | None = field(default=None, hash=False, repr=False)
    """[self-distillation] How this prompt was rendered, so that a self-teacher's prompt
    (the same prompt with privileged text added) is rendered the same way."""


@dataclass(frozen=True)
class PromptView:
    """[self-distillation] The inputs of `_render` for one row: `render_prompt` renders it
    again with other text (`opd.selfdistill.context`)."""

    row: Row
    chat: bool
    system_prompt: str | None
    max_prompt_tokens: int


def render_prompt(view: PromptView, row: Row, tokenizer: Any) -> list[int]:
    """[self-distillation] The ids of `row` rendered as `view` rendered its own row (chat
    template, system prompt), left-truncated to twice the student's max_prompt_tokens (the
    privileged text may be long)."""
    budget = 2 * view.max_prompt_tokens
    _text, ids, _cut, _raw = _render(row, tokenizer, view.chat, view.system_prompt, budget)
    return ids[-budget:]


@dataclass(frozen=True)
class EncodeResult:
    """What `encode_rows` produced."""

    examples: list[Example]
    """One example per row, in order."""
    truncated: int
    """How many prompts were cut to `max_prompt_tokens`."""


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


def _cut_point(text: str, start: int) -> int:
    """Where a tail starting near `start` may begin without splitting a word (see above)."""
    boundary = _WORD_END.search(text, start)
    if boundary is not None:
        return boundary.start()
    back = max(0, start - MAX_WORD_CHARS)  # the last word is longer than the window
    earlier = [m.start() for m in _WORD_END.finditer(text, back, start)]
    if earlier:
        return earlier[-1]
    return 0 if back == 0 else start  # a word over MAX_WORD_CHARS is cut inside


def cut_to_budget(text: str, tokenizer: Any, max_tokens: int) -> tuple[str, bool]:
    """The end of `text` whose tokens end like the whole text's last `max_tokens` tokens.

    Returns:
      (text, False) when `text` is short enough to tokenise whole; else (tail, True), where
      the tail alone yields at least `max_tokens + MARGIN_TOKENS` tokens.
    """
    need = max_tokens + MARGIN_TOKENS
    window = need * CHARS_PER_TOKEN
    while window < len(text):
        tail = text[_cut_point(text, len(text) - window) :]
        if len(tokenizer(tail, add_special_tokens=False).input_ids) >= need:
            return tail, True
        window *= 4
    return text, False


def _render(
    row: Row, tokenizer: Any, chat: bool, system_prompt: str | None, max_tokens: int
) -> tuple[str, list[int], bool, object]:
    """The prompt text, its token ids, whether a text field was cut to bound the work, and
    the raw prompt (messages or string, before the template; [crosstok])."""
    if chat:
        turns, cut = [], False
        for turn in row.messages or [{"role": "user", "content": row.prompt}]:
            content, was_cut = cut_to_budget(turn["content"], tokenizer, max_tokens)
            turns.append({"role": turn["role"], "content": content})
            cut = cut or was_cut
        if system_prompt is not None and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": system_prompt})
        kw = {"add_generation_prompt": True}
        text = tokenizer.apply_chat_template(turns, tokenize=False, **kw)
        ids = _as_ids(tokenizer.apply_chat_template(turns, tokenize=True, **kw))
        return text, ids, cut, tuple(tuple(t.items()) for t in turns)  # hashable
    if row.prompt is None:
        raise DataError(
            f"{row.source}: a chat-list row needs a chat template, but data.chat_template is "
            "false or the tokenizer has none (valid: data.chat_template=auto with a chat "
            "model's tokenizer, or plain 'prompt' strings)"
        )
    prompt, cut = cut_to_budget(row.prompt, tokenizer, max_tokens)
    text = prompt if system_prompt is None else f"{system_prompt}\n\n{prompt}"
    return text, list(tokenizer(text, add_special_tokens=True).input_ids), cut, text


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
        requires one; False always uses plain text (the config key `data.chat_template`).
      system_prompt: an optional system message for every row.

    Returns:
      An `EncodeResult`: one `Example` per row and the count of truncated prompts.

    Raises:
      ConfigError: a bad option. DataError: a required chat template is missing, a
        chat-list row without one, or an over-long prompt with truncation="error".
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
            "data.chat_template=true but the tokenizer has no chat_template (valid: "
            "data.chat_template=auto or false, or a chat model's tokenizer)"
        )
    chat = has_template and use_chat_template is not False
    end_id = _turn_end_id(tokenizer) if chat else tokenizer.eos_token_id

    examples, truncated = [], 0
    for row in rows:
        text, ids, cut, raw = _render(row, tokenizer, chat, system_prompt, max_prompt_tokens)
        if cut or len(ids) > max_prompt_tokens:
            raw = None  # [crosstok] the teacher re-tokenises the kept text instead
            if truncation == "error":
                size = f"at least {len(ids)}" if cut else f"{len(ids)}"
                raise DataError(
                    f"{row.source}: prompt is {size} tokens, over max_prompt_tokens="
                    f"{max_prompt_tokens} (valid: raise data.max_prompt_tokens, shorten the "
                    "prompt, or data.truncation=left)"
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
        example = Example(tuple(ids), completion_ids, row.answer, row.source, text, raw)
        # [self-distillation] the privileged fields and how to render the teacher's prompt
        view = PromptView(row, chat, system_prompt, max_prompt_tokens)
        examples.append(dataclasses.replace(example, privileged=row.privileged, view=view))
    return EncodeResult(examples=examples, truncated=truncated)
