"""Fast OPD: on-policy distillation on reasoning prefixes (Zhang et al., 2026).

Prefix source: `prefix(L, student())`: the student samples only the first L completion
tokens, and the loss covers only them. Signal: KL(q_student ‖ p_teacher) per token (reverse
KL, as in on-policy distillation). `length_end` grows L linearly over training (the paper's
prefix schedule).
Deviations: the paper uses the sampled-token OPD estimate of the reverse KL; opd uses the
exact reverse KL over the vocabulary (lower variance, same expectation). The paper's prefix
length default could not be confirmed; L = 512 is opd's choice (set it against your
`sampling.max_new_tokens`, which is the full-rollout length).
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import prefix, student
from opd.signals import Divergence


@recipe(
    citation="Zhang et al., Fast and Effective On-policy Distillation from Reasoning Prefixes, "
    "arXiv:2602.15260, 2026",
    summary="student samples only the first L tokens; KL(q_student ‖ p_teacher) on that prefix",
    signal="logit",
    access="white-box",
    granularity="hybrid",
)
def fast_opd(length: int = 512, length_end: int | None = None, temperature: float = 1.0):
    """On-policy reverse KL on the first `length` completion tokens."""
    return Method(
        prefixes=prefix(length, student(), length_end=length_end),
        signal=Divergence("reverse_kl", {}, temperature),
    )
