"""OPSDC: On-Policy Self-Distillation for Reasoning Compression (Sang et al., 2026,
arXiv 2603.05433).

The teacher is the model itself with a "be concise" instruction added to every prompt (the
same constant text for every row, `instruction`, joined by `template`); the student sees the
prompt alone and writes y; the loss is the per-token reverse KL on the student's tokens,

    D_t = KL(q_θ(·|x, y<t) ‖ p_T(·|x, concise, y<t))      (full vocabulary)

No answers, solutions or rewards are needed. The self-teacher is `frozen` (the initial model,
default), `live` or `ema` (`opd.selfdistill.teachers`).

Deviations:
- The instruction's wording is ours (argument `instruction`); the paper's prompt differs.
- Default teacher view `frozen` is our choice; `ema` and `live` are offered.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import student
from opd.selfdistill import TEMPLATE, PrivilegedPrompts, SelfAccess
from opd.signals import Divergence

CONCISE = "Be concise: answer directly, without unnecessary steps."


@recipe(
    citation="Sang et al., On-Policy Self-Distillation for Reasoning Compression, 2026 "
    "(arXiv 2603.05433)",
    summary="student writes y; KL(q_student ‖ p_self(·|'be concise')) per token",
    signal="logit",
    access="self",
    granularity="token",
)
def opsdc(
    instruction: str = CONCISE,
    teacher: str = "frozen",
    ema_decay: float = 0.99,
    template: str = TEMPLATE,
    temperature: float = 1.0,
):
    """OPSDC: reverse KL to the self conditioned on a "be concise" instruction."""
    prefixes = PrivilegedPrompts(
        student(), field=None, constant=instruction, template=template, who="recipe 'opsdc'"
    )
    return Method(
        prefixes=prefixes,
        teacher=SelfAccess(teacher, ema_decay),
        signal=Divergence("reverse_kl", temperature=temperature),
    )
