"""Veto: a geometric bridge target for stable on-policy distillation (Jang et al., "Stable
On-Policy Distillation through Adaptive Target Reformulation", arXiv 2601.07155, 2026).

The target interpolates in logit space between the detached student and the teacher,

    z_r = (1 − γ) · z_student.detach() + γ · z_teacher,   r = softmax(z_r / τ)  ∝ q^(1−γ) p^γ
    L_t = KL(r ‖ q_student)

so γ = 1 is KL(p_teacher ‖ q_student) and smaller γ pulls the target toward the student,
suppressing the large gradients of tokens the student finds unlikely. On-policy (student
writes y), as in the paper. Computed by `opd.losses.bridge`.

Deviations: the paper's default γ and its reverse-direction variant and adaptive gradient
clipping are not verified / not implemented; γ = 0.5 is our default.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.signals import Divergence, prefix_source


@recipe(
    citation="Jang et al., Stable On-Policy Distillation through Adaptive Target "
    "Reformulation, arXiv 2601.07155, 2026",
    summary="KL(r‖q) to a logit-space bridge r ∝ q^(1−γ) p^γ between student and teacher",
    signal="logit",
    access="white-box",
    granularity="token",
)
def veto(
    gamma: float = 0.5, temperature: float = 1.0, prefixes: str = "student", lmbda: float = 0.5
):
    """Veto with bridge weight `gamma` (1 = plain forward KL)."""
    return Method(
        prefixes=prefix_source(prefixes, lmbda),
        signal=Divergence("bridge", {"gamma": gamma}, temperature),
    )
