"""REOPOLD: Relaxed On-Policy Distillation (Ko et al., 2026, arXiv 2603.11137).

The student writes y; the teacher returns log p(y_t). Token reward r_t = log p(y_t) − log q(y_t)
clipped from below (mixture-based clipping): r̂_t = max(r_t, log(λ/(1−λ))), loss −r̂_t · log q(y_t)
on the tokens with the highest student entropy (entropy-based token selection); after an
optional switch point the clipping and selection stop (exploration → refinement).
Deviations: the floor's form comes from a secondary summary of the paper, and λ = 0.2, the
kept fraction 0.2 and the switch point (off by default) are our defaults, not verified.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import student
from opd.signals import Reopold
from opd.teachers import SampledLogprobs


@recipe(
    citation="Ko et al., Scaling Reasoning Efficiently via Relaxed On-Policy Distillation, "
    "2026 (arXiv 2603.11137)",
    summary="student writes y; clipped log-ratio reward on high-entropy tokens (relaxed OPD)",
    signal="sampled log-prob",
    access="sampled",
    granularity="token",
)
def reopold(lam: float = 0.2, top_entropy: float = 0.2, refine_after: float = 1.0):
    """REOPOLD with clip floor log(λ/(1−λ)), entropy fraction and refinement switch."""
    return Method(
        prefixes=student(),
        teacher=SampledLogprobs(),
        signal=Reopold(lam=lam, top_entropy=top_entropy, refine_after=refine_after),
    )
