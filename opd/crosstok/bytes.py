"""The bytes each token stands for, for the tokenizer families in use today.

    byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM)   token string → bytes through the GPT-2
        byte↔unicode table (every byte 0..255 is one printable character: 'Ġ' = 0x20, ...)
    SentencePiece / Metaspace (Llama 2, Mistral, Gemma)   '▁' → b' ', '<0xNN>' byte-fallback
        tokens → the single byte 0xNN, anything else → its UTF-8
    anything else (character-level, WordPiece without '##')   the token string's UTF-8

Special tokens (the tokenizer's `all_special_ids`: pad, bos, eos, end-of-turn, ...) stand for
no bytes: `TokenBytes.of(id)` returns None for them and the aligner treats each as its own span.
The student's end of a completion (eos, or an end-of-turn such as '<|im_end|>') maps to the
teacher's (`TokenBytes.map_special`): same token string first, else the teacher's end-of-turn
(or eos); a special with no counterpart maps to None (masked, counted).

The family is read from the fast tokenizer's decoder (`ByteLevel` / `Metaspace` or the
`Replace('▁', ' ') + ByteFallback` sequence of Llama-style tokenizers), so a tokenizer
built in code is detected as one loaded from the Hub is.
Deviation: tokenizers with a normaliser that changes text (NFKC, lower-casing) still get the
UTF-8 of their token strings; text they do not reproduce is masked by the aligner.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache

from opd.data.encode import END_OF_TURN_TOKENS, end_of_turn_ids

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPIECE_SPACE = "\u2581"  # '▁'


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable character → byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decoder_types(spec: dict) -> set[str]:
    """The type names in a fast tokenizer's decoder spec (a Sequence is flattened)."""
    found, todo = set(), [spec]
    while todo:
        d = todo.pop()
        if isinstance(d, dict):
            found.add(d.get("type", ""))
            todo.extend(d.get("decoders") or [])
    return found


def tokenizer_family(tokenizer) -> str:
    """'byte_level', 'sentencepiece' or 'plain' (see the module docstring)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: SentencePiece if it has a model, else plain
        return "sentencepiece" if getattr(tokenizer, "sp_model", None) is not None else "plain"
    spec = json.loads(backend.to_str()).get("decoder") or {}
    types = _decoder_types(spec)
    if "ByteLevel" in types:
        return "byte_level"
    if types & {"Metaspace", "ByteFallback"} or SPIECE_SPACE in json.dumps(
        spec, ensure_ascii=False
    ):
        return "sentencepiece"
    return "plain"


def token_string_bytes(token: str, family: str) -> bytes | None:
    """The bytes of one (non-special) token string; None when it is not representable."""
    if family == "byte_level":
        table = unicode_to_byte()
        try:
            return bytes(table[c] for c in token)
        except KeyError:  # an added (non-byte-level) token: its text as is
            return token.encode("utf-8")
    if family == "sentencepiece":
        m = _BYTE_FALLBACK.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace(SPIECE_SPACE, " ").encode("utf-8")
    return token.encode("utf-8")


@dataclass
class TokenBytes:
    """Per-id bytes of one tokenizer (computed lazily, cached).

    Attributes:
      tokenizer: a Hugging Face tokenizer.
    """

    tokenizer: object
    family: str = ""
    special_ids: frozenset = frozenset()
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.family = self.family or tokenizer_family(self.tokenizer)
        self.special_ids = frozenset(int(i) for i in self.tokenizer.all_special_ids)

    def of(self, token_id: int) -> bytes | None:
        """The bytes of `token_id`; None for a special token."""
        token_id = int(token_id)
        if token_id in self.special_ids:
            return None
        if token_id not in self._cache:
            token = self.tokenizer.convert_ids_to_tokens(token_id)
            self._cache[token_id] = b"" if token is None else token_string_bytes(token, self.family)
        return self._cache[token_id]

    def end_ids(self) -> list[int]:
        """The ids that end a completion: eos and the end-of-turn tokens in the vocabulary."""
        return end_of_turn_ids(self.tokenizer)

    def turn_end_id(self) -> int | None:
        """The id that ends a chat turn: the first end-of-turn token found, else eos."""
        for name in END_OF_TURN_TOKENS:
            tid = self.tokenizer.convert_tokens_to_ids(name)
            if tid is not None and tid != self.tokenizer.unk_token_id:
                return int(tid)
        eos = self.tokenizer.eos_token_id
        return None if eos is None else int(eos)

    def map_special(self, token_id: int, target: TokenBytes) -> int | None:
        """The id in `target` for this tokenizer's special `token_id`, or None.

        Same token string first ('<|im_end|>' in both); else an end of a completion (eos or
        end-of-turn) maps to the target's end-of-turn (or eos); else None.
        """
        name = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if name is not None:
            tid = target.tokenizer.convert_tokens_to_ids(name)
            if tid is not None and int(tid) in target.special_ids:
                return int(tid)
        if int(token_id) in self.end_ids():
            return target.turn_end_id()
        return None
