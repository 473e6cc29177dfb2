"""Cross-tokenizer on-policy distillation: bytes of tokens, span alignment, teacher access.

See docs/cross-tokenizer.md. `align_spans` is the entry point other signals build on.
"""

from opd.crosstok.align import Span, align_offsets, align_spans

__all__ = ["Span", "align_offsets", "align_spans"]
