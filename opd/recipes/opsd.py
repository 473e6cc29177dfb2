"""OPSD: On-Policy Self-Distillation (Zhao et al., 2026, "Self-Distilled Reasoner",
arXiv 2601.18734).

One model is both student and teacher. The student q_θ(·|x) writes y for the question x; the
teacher is the same model conditioned on the row's reference solution y*, p_T(·|x, y*); the
loss is the per-token generalized JSD between them on the student's own tokens:

    D_t = β·KL(p_T ‖ m) + (1 − β)·KL(q_θ ‖ m),   m = β·p_T + (1 − β)·q_θ     (β = 0.5: JSD)

with gradients through the student only. The teacher prompt is `template` with {prompt} and
{context} = the row's `solution` field (`opd.selfdistill.context`). `clip` > 0 clips each
token's divergence above at `clip` (`opd.selfdistill.signals.Clipped`).

The self-teacher is a view of the student (`opd.selfdistill.teachers`): `frozen` (the initial
student, default), `live` (the current weights, no gradient) or `ema` (decay `ema_decay`).
Any external teacher the config names (model.teacher) is loaded but never asked.

Deviations:
- The paper's teacher prompt wording differs by dataset; here it is the `template` argument.
- The default view (`frozen`) is our choice for stability; `live` is also offered.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import student
from opd.selfdistill import TEMPLATE, PrivilegedPrompts, SelfAccess
from opd.selfdistill.signals import Clipped
from opd.signals import Divergence


@recipe(
    citation="Zhao et al., Self-Distilled Reasoner: On-Policy Self-Distillation for Large "
    "Language Models, 2026 (arXiv 2601.18734)",
    summary="student writes y; JSD_β to itself conditioned on the row's solution (self-teacher)",
    signal="logit",
    access="self",
    granularity="token",
)
def opsd(
    beta: float = 0.5,
    teacher: str = "frozen",
    ema_decay: float = 0.99,
    field: str = "solution",
    template: str = TEMPLATE,
    clip: float = 0.0,
    temperature: float = 1.0,
):
    """OPSD: JSD_β(solution-conditioned self ‖ student) on student rollouts."""
    signal = Divergence("generalized_jsd", {"beta": beta}, temperature=temperature)
    return Method(
        prefixes=PrivilegedPrompts(student(), field=field, template=template, who="recipe 'opsd'"),
        teacher=SelfAccess(teacher, ema_decay),
        signal=Clipped(signal, clip) if clip else signal,
    )
