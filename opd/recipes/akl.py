"""AKL: Adaptive Kullback-Leibler divergence (Wu et al., "Rethinking Kullback-Leibler
Divergence in Knowledge Distillation for Large Language Models", COLING 2025).

Sort the teacher's p descending; the head H is the largest prefix holding ≤ μ of the mass and
at least the top-1 token (the authors' code: the token that crosses μ is tail;
`boundary="inclusive"` puts it in the head instead).
With g_head = Σ_{v∈H} |p_v − q_v| and g_tail = Σ_{v∉H} |p_v − q_v| (detached):

    AKL_t = g_head/(g_head+g_tail) · KL(p_teacher ‖ q_student)
          + g_tail/(g_head+g_tail) · KL(q_student ‖ p_teacher)

forward KL learns the head first, reverse KL the tail; the gaps allocate the two. Computed by
`opd.losses.akl`.

Deviations: AKL was evaluated off-policy (dataset responses); opd defaults to student
rollouts (`prefixes="student"`), the paper's setting is `prefixes="dataset"`.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.signals import Divergence, prefix_source


@recipe(
    citation="Wu et al., Rethinking Kullback-Leibler Divergence in Knowledge Distillation for "
    "Large Language Models, COLING 2025",
    summary="head/tail-gap weighted mix of KL(p‖q) and KL(q‖p), on student rollouts",
    signal="logit",
    access="white-box",
    granularity="token",
)
def akl(
    mu: float = 0.5,
    temperature: float = 1.0,
    prefixes: str = "student",
    lmbda: float = 0.5,
    boundary: str = "authors",
):
    """AKL with head mass `mu` (μ=0.5, the paper's) and the authors' head/tail boundary."""
    return Method(
        prefixes=prefix_source(prefixes, lmbda),
        signal=Divergence("akl", {"mu": mu, "boundary": boundary}, temperature),
    )
