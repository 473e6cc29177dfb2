"""Exact matches between two vocabularies: the tokens that stand for the same bytes.

GOLD's hybrid loss (opd.crosstok.uld) takes a direct divergence on the tokens both models
can emit as the same string. TRL compares the raw vocabulary strings (`get_vocab()` keys),
which never match across a byte-level BPE ("Ġthe") and a SentencePiece ("▁the")
vocabulary although both mean b" the". Here a token's string is the bytes it decodes to:

    byte-level BPE    each character of the token string through the inverse of GPT-2's
                      bytes↔unicode table ("Ġ" → 0x20)
    SentencePiece     "▁" → b" ", a byte-fallback token "<0xNN>" → the byte 0xNN, anything
                      else its UTF-8 encoding
    other             the token string's UTF-8 encoding (e.g. opd.tiny's character vocabulary)
    special tokens    no bytes; they match only a special token of the same spelling
                      ("<|im_end|>" ↔ "<|im_end|>"), so identical tokenizers match every id

    matches = { (s, t) : key_s(s) == key_t(t) }, key = the bytes (or the special token's
              name), made one-to-one by keeping the
              lowest id on each side when several ids decode to the same bytes (e.g. "A" and
              its byte-fallback twin "<0x41>"); the others stay in the unmatched remainder.

`vocab_matches(student_tok, teacher_tok, V, U) -> (ids_s_M, ids_t_M)` sorted by student id.
Ids past the tokenizer's vocabulary (a model's padded rows) never match.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache

import torch

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the other 68
    bytes to code points 256, 257, ... in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def tokenizer_kind(tokenizer) -> str:
    """ "byte_level", "sentencepiece" or "plain", from the fast tokenizer's decoder/model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "plain"
    spec = json.loads(backend.to_str())
    text = json.dumps([spec.get("decoder"), spec.get("pre_tokenizer")])
    if '"ByteLevel"' in text:
        return "byte_level"
    if '"Metaspace"' in text or (spec.get("model") or {}).get("byte_fallback"):
        return "sentencepiece"
    return "plain"


def piece_bytes(piece: str, kind: str) -> bytes:
    """The bytes one vocabulary entry stands for (module docstring)."""
    if kind == "byte_level":
        table = _unicode_to_byte()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return piece.encode("utf-8")
    if kind == "sentencepiece":
        m = _BYTE_FALLBACK.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("▁", " ").encode("utf-8")
    return piece.encode("utf-8")


def special_ids(tokenizer) -> set[int]:
    """Ids of the special tokens (eos, pad, chat markers, added special tokens)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            special.add(int(tid))
    return special


def vocab_bytes(tokenizer, size: int) -> list[bytes | None]:
    """Bytes of ids 0..size-1 (None for special tokens and ids the tokenizer does not know)."""
    kind = tokenizer_kind(tokenizer)
    special = special_ids(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        out.append(None if i in special or piece is None else piece_bytes(piece, kind))
    return out


def vocab_keys(tokenizer, size: int) -> list:
    """The matching key of ids 0..size-1: the bytes, ("special", name) for a special token,
    None for ids the tokenizer does not know."""
    keys: list = list(vocab_bytes(tokenizer, size))
    pieces = tokenizer.convert_ids_to_tokens(sorted(i for i in special_ids(tokenizer) if i < size))
    for i, piece in zip(sorted(i for i in special_ids(tokenizer) if i < size), pieces):
        keys[i] = ("special", piece)
    return keys


def exact_matches(
    student_keys: Sequence, teacher_keys: Sequence
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_s_M, ids_t_M): one-to-one pairs of ids with equal keys (bytes; None and b"" never
    match), sorted by student id; the lowest id wins on each side when keys repeat."""
    first_t: dict = {}
    for t, b in enumerate(teacher_keys):
        if b is not None and b != b"" and b not in first_t:
            first_t[b] = t
    seen: set = set()
    ids_s, ids_t = [], []
    for s, b in enumerate(student_keys):
        if b is None or b == b"" or b in seen or b not in first_t:
            continue
        seen.add(b)
        ids_s.append(s)
        ids_t.append(first_t[b])
    return torch.tensor(ids_s, dtype=torch.long), torch.tensor(ids_t, dtype=torch.long)


def vocab_matches(
    student_tokenizer, teacher_tokenizer, student_size: int, teacher_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact matches of the first `student_size` / `teacher_size` ids of two tokenizers."""
    return exact_matches(
        vocab_keys(student_tokenizer, student_size), vocab_keys(teacher_tokenizer, teacher_size)
    )
