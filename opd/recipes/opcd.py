"""OPCD: On-Policy Context Distillation — the student learns to act as if it had the context.

The teacher is the model itself with the row's `context` field in its prompt (template
"{prompt}\n\n{context}", `opd.selfdistill.context`); the student sees the prompt alone and
writes y; the loss is the reverse KL per token on the student's tokens,

    D_t = KL(q_θ(·|x, y<t) ‖ p_T(·|x, c, y<t))     (full vocabulary, k = 0)

or, with k > 0, the same KL on the teacher's top-k + tail buckets (`topk_rkl`'s form).
The self-teacher is `frozen` (the initial model, default), `live` or `ema`
(`opd.selfdistill.teachers`). Any external teacher the config names is never asked.

Deviation: the top-k form keeps the tail bucket (as `topk_rkl`) rather than renormalising
on the top-k support.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import student
from opd.selfdistill import TEMPLATE, PrivilegedPrompts, SelfAccess
from opd.signals import Divergence, TopKDivergence
from opd.teachers import TopK


@recipe(
    citation="On-policy context distillation: reverse KL to the context-conditioned self "
    "(survey, self-distillation family)",
    summary="student writes y; KL(q_student ‖ p_self(·|context)), full vocabulary or top-k",
    signal="logit",
    access="self",
    granularity="token",
)
def opcd(
    k: int = 0,
    teacher: str = "frozen",
    ema_decay: float = 0.99,
    field: str = "context",
    template: str = TEMPLATE,
    temperature: float = 1.0,
):
    """OPCD: reverse KL to the context-conditioned self (k = 0: full vocabulary)."""
    prefixes = PrivilegedPrompts(student(), field=field, template=template, who="recipe 'opcd'")
    if k:
        access = SelfAccess(teacher, ema_decay, TopK(k=k, temperature=temperature))
        signal = TopKDivergence("reverse_kl", k=None, temperature=temperature)
    else:
        access = SelfAccess(teacher, ema_decay)
        signal = Divergence("reverse_kl", temperature=temperature)
    return Method(prefixes=prefixes, teacher=access, signal=signal)
