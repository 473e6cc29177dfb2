"""KETCHUP (Fan et al., Findings of EACL 2026): MiniLLM with K-step returns.

Identical to `minillm` except that the long-term advantage uses the K-step return
mean_{t < t' ≤ t+K} r_t' (r_t = log p(y_t) − log q(y_t)) instead of the full reward-to-go,
trading bias for lower gradient variance.
Deviations: the paper induces its K-step return from the Bellman optimality equation
(possibly with a teacher-derived value at t+K); we use the plain truncated sum of MiniLLM's
rewards (no bootstrap). The default K = 8 is ours (not verified). Otherwise as `minillm`.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling.token_level import token_mix
from opd.signals import Ketchup
from opd.teachers import FullLogits


@recipe(
    citation="Fan et al., KETCHUP: K-Step Return Estimation for Sequential Knowledge "
    "Distillation, Findings of EACL 2026 (arXiv 2504.19024)",
    summary="MiniLLM policy gradient with K-step returns instead of the full reward-to-go",
    signal="logit + sampled log-prob",
    access="white-box",
    granularity="sequence",
)
def ketchup(k: int = 8, alpha: float = 0.2, clip: float = 0.2):
    """KETCHUP with horizon `k` and MiniLLM's teacher-mixed sampling."""
    return Method(
        prefixes=token_mix(alpha=alpha, clip=None),
        teacher=FullLogits(),
        signal=Ketchup(k=k, clip=clip),
    )
