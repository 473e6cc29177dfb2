"""A tokenizer fingerprint: one hex string that two processes compare to know that token ids
mean the same tokens on both sides (a served teacher and the trainer's student).

    fingerprint = sha256( canonical JSON of {"vocab": sorted [(token, id), ...],
                                             "special": {name: token, ...}} )

The vocabulary is `get_vocab()`, added tokens included; the special-token map is
`special_tokens_map` (bos, eos, unk, additional special tokens, ...). Deviation: the pad token
is left out of the map. It changes no id's meaning, and opd's loader sets one itself (eos or
unk) when a tokenizer has none, so leaving it in would make one tokenizer's fingerprint depend
on how it was loaded. Merges, normalisers and chat templates are not hashed: a served teacher
receives token ids, never text, so only the id → token map must agree.
"""

from __future__ import annotations

import hashlib
import json


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 hex digest of the tokenizer's (token, id) vocabulary and special-token map.

    Stable across processes and reloads (no hashing of Python objects, sorted keys).
    """
    vocab = sorted((str(token), int(idx)) for token, idx in tokenizer.get_vocab().items())
    special = {
        name: [str(t) for t in value] if isinstance(value, (list, tuple)) else str(value)
        for name, value in (tokenizer.special_tokens_map or {}).items()
        if name != "pad_token"
    }
    canonical = json.dumps(
        {"vocab": vocab, "special": special},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
