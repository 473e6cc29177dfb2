"""Cross-tokenizer on-policy distillation with sampled span log-probs (opd's own recipe).

The student writes y; the teacher (any tokenizer, any chat template) scores its own
tokenisation of the same text after its own rendering of the prompt; both tokenisations are
grouped into spans that end on a shared byte boundary (`opd.crosstok`), and each student
token of span g gets the advantage A_g = Σ_g log p_teacher − Σ_g log q_student (detached):
loss_t = −A_g · log q(y_t). With identical tokenizers it is `sampled_rkl` exactly.
Needs only sampled-token log-probs of the teacher, so local, GGUF and served teachers serve.
Deviations:
- Span-level rather than token-level advantages (what makes differing tokenizers comparable);
  the teacher scores one tokenisation of the text, not the sum over all of them.
- Spans that cannot be aligned (a token with no bytes, text the teacher's tokenizer does not
  reproduce) are masked (loss 0) but still counted in the token mean; their count is logged
  as `xtok_unaligned`. Invalid UTF-8 is scored against the teacher's U+FFFD and a special the
  teacher lacks as its literal text, not masked (masking let the student escape the teacher's
  penalty by writing invalid bytes); `mask_invalid=true` masks invalid UTF-8 instead.
- No discount over future spans (tinker's default, γ = 0).
"""

from opd.crosstok.access import CrossTokenizerLogprobs
from opd.crosstok.signals import SpanSampledRKL
from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import student


@recipe(
    citation="opd (span alignment after Minixhofer et al. 2025 / Boizard et al. ULD 2024); "
    "objective of Lu & Thinking Machines Lab, On-Policy Distillation, 2025",
    summary="teacher with another tokenizer; span advantage Σ log p − Σ log q over byte spans",
    signal="sampled log-prob",
    access="sampled",
    granularity="token",
)
def xtok_sampled_rkl(mask_invalid: bool = False):
    """Tinker-style OPD across tokenizers: per-span advantages on shared byte boundaries."""
    return Method(
        prefixes=student(),
        teacher=CrossTokenizerLogprobs(mask_invalid=mask_invalid),
        signal=SpanSampledRKL(),
    )
