"""PACED: distillation at the frontier of student competence (Xu et al., arXiv 2603.11178, 2026).

Each prompt's student pass rate s (n samples, task verifier) sets its weight

    w(s) = s^a · (1 − s)^b + floor        a = b = 1: peak at s = ½, ~0 at s = 0 and s = 1

and batches are drawn ∝ w (`opd.curriculum.Paced`). The signal follows PACED's two-stage
schedule: KL(p_teacher ‖ q_student) (mode coverage) until progress `split`, then
KL(q_student ‖ p_teacher) (consolidation) (`opd.curriculum.two_stage_kl`).

Needs an `answer` field in every training row (the verifier compares against it).

Deviations (details in `opd.curriculum`): prompts are sampled ∝ w instead of weighting each
problem's loss by w (same expected gradient up to a constant); a small floor keeps every
prompt drawable; pass rates are refreshed every `refresh_every` steps over a pool drawn from
the stream; the FKL→RKL split point (½) is not verified. Prefixes: the paper's distillation
runs train on teacher-written reference responses and its self-distillation runs on the
student's own; opd defaults to the student (`prefixes="teacher"` is the distillation setting).
"""

from opd.curriculum import Paced
from opd.method import Method
from opd.recipes.registry import recipe
from opd.signals import prefix_source, two_stage_kl


@recipe(
    citation="Xu et al., PACED: Distillation and On-Policy Self-Distillation at the Frontier of "
    "Student Competence, arXiv 2603.11178, 2026",
    summary="prompts drawn ∝ s^a(1−s)^b of the student pass rate; KL(p‖q) then KL(q‖p)",
    signal="logit",
    access="white-box",
    granularity="hybrid",
)
def paced(
    a: float = 1.0,
    b: float = 1.0,
    n: int = 4,
    pool: int = 64,
    refresh_every: int = 10,
    split: float = 0.5,
    temperature: float = 1.0,
    prefixes: str = "student",
    lmbda: float = 0.5,
):
    """PACED with Beta-kernel exponents (a, b), n samples per pass rate, FKL→RKL at `split`."""
    return Method(
        prefixes=prefix_source(prefixes, lmbda),
        signal=two_stage_kl(split, temperature),
        prompts=Paced(a=a, b=b, n=n, pool=pool, refresh_every=refresh_every),
    )
