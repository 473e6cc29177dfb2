"""Cross-tokenizer on-policy distillation: bytes of tokens, span alignment, teacher access.

    bytes.py    the bytes of each token (byte-level BPE, SentencePiece byte fallback), specials
    align.py    `align_spans` (spans ending on shared byte boundaries), `align_completion`
    access.py   `CrossTokenizerLogprobs`: span log-probs of a teacher with its own tokenizer
    signals.py  `SpanSampledRKL`: span-level sampled reverse KL (= sampled_rkl when identical)
    models.py   the build-time rule: which methods may pair differing tokenizers
    evaluate.py held-out teacher NLL per byte of greedy student completions

See docs/cross-tokenizer.md.
"""

from opd.crosstok.access import CrossTokenizerLogprobs
from opd.crosstok.align import Alignment, Span, align_completion, align_offsets, align_spans
from opd.crosstok.bytes import TokenBytes, tokenizer_family
from opd.crosstok.signals import SpanSampledRKL

__all__ = [
    "Alignment",
    "CrossTokenizerLogprobs",
    "Span",
    "SpanSampledRKL",
    "TokenBytes",
    "align_completion",
    "align_offsets",
    "align_spans",
    "tokenizer_family",
]
