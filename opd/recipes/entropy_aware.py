"""Entropy-aware on-policy distillation (Jin et al., arXiv 2603.07079, 2026).

A detached gate a_t = clamp(H(p_t) / h_max, 0, 1) rises with the teacher's entropy:

    L_t = (1 − a_t) · KL(q_student ‖ p_teacher) + a_t · KL(p_teacher ‖ q_student)

a confident teacher gives reverse KL (precise imitation), an uncertain one forward KL (keep
all plausible continuations). The student writes y (on-policy, as in the paper). Computed by
`opd.losses.entropy_aware`.

Deviations: the paper's exact gate g(H) is not verified (its abstract says it "augments
reverse KL with forward KL when teacher entropy is high"); we use the continuous gate of
docs/methods.md §2 with h_max = log V by default. See `opd.losses.adaptive` for the details.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.signals import Divergence, prefix_source


@recipe(
    citation="Jin et al., Entropy-Aware On-Policy Distillation of Language Models, "
    "arXiv 2603.07079, 2026",
    summary="teacher-entropy gate from KL(q‖p) (confident) to KL(p‖q) (uncertain), on-policy",
    signal="logit",
    access="white-box",
    granularity="token",
)
def entropy_aware(
    h_max: float | None = None,
    temperature: float = 1.0,
    prefixes: str = "student",
    lmbda: float = 0.5,
):
    """Entropy-gated KL mix; `h_max` is the entropy (nats) where the gate saturates (None: log V)."""
    params = {} if h_max is None else {"h_max": h_max}
    return Method(
        prefixes=prefix_source(prefixes, lmbda),
        signal=Divergence("entropy_aware", params, temperature),
    )
