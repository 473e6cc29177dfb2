"""GKD: Generalized Knowledge Distillation (Agarwal et al., ICLR 2024).

With probability λ the student writes y, else the dataset does; the per-token signal is the
generalized JSD with mixture m = (1−β)·q + β·p:  β·KL(p‖m) + (1−β)·KL(q‖m), where β=0 is
KL(p_teacher ‖ q_student) and β=1 is KL(q_student ‖ p_teacher) (special-cased).
Deviations from the paper: none in the objective; the coin is drawn per batch as in the
paper's Algorithm 1 (per-batch choice of on-policy data).
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import mix
from opd.signals import Divergence


@recipe(
    citation="Agarwal et al., On-Policy Distillation of Language Models: Learning from "
    "Self-Generated Mistakes, ICLR 2024",
    summary="mix student and dataset completions (λ), generalized JSD(β) per token",
    signal="logit",
    access="white-box",
    granularity="token",
)
def gkd(lmbda: float = 0.5, beta: float = 0.5, temperature: float = 1.0, other: str = "dataset"):
    """GKD with student-data fraction `lmbda` and JSD interpolation `beta`."""
    return Method(
        prefixes=mix(student=lmbda, other=other),
        signal=Divergence("generalized_jsd", {"beta": beta}, temperature),
    )
