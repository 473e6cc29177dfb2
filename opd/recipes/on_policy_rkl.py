"""On-policy reverse KL: the student writes y, and minimises KL(q_student ‖ p_teacher).

This is GKD with λ=1, β=1 (Agarwal et al., ICLR 2024) and the full-vocabulary form of the
on-policy distillation recipe of Lu & Thinking Machines (2025), which uses the sampled-token
estimate of the same reverse KL as a per-token advantage. Deviations: the exact reverse KL
over the whole vocabulary is used (lower variance than the one-sample estimate).
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import student
from opd.signals import Divergence


@recipe(
    citation="Agarwal et al., ICLR 2024 (λ=1, β=1); Lu & Thinking Machines Lab, "
    "On-Policy Distillation, 2025",
    summary="student writes y; KL(q_student ‖ p_teacher) per token (pure on-policy)",
    signal="logit",
    access="white-box",
    granularity="token",
)
def on_policy_rkl(temperature: float = 1.0):
    """Pure on-policy reverse KL."""
    return Method(
        prefixes=student(),
        signal=Divergence("reverse_kl", {}, temperature),
    )
