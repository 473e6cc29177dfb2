"""SDPO: Self-Distillation Policy Optimization (Hübotter et al., 2026, "Reinforcement
Learning via Self-Distillation", arXiv 2601.20802), as GRPO plus a distillation term.

The student writes G completions per prompt (`opd.rl.parts.Grouped`), rewarded by the task's
verifier (or `reward`). The self-teacher is an EMA of the student (decay `ema_decay`) shown
the row's `feedback` field (template "{prompt}\n\n{context}", `opd.selfdistill.context`).
Per student token t of completion i:

    L_t = −min(ρ_t·A_i, clip(ρ_t, 1 − ε_low, 1 + ε_high)·A_i) + β·k3_t          (GRPO core)
          + λ · KL(q_θ(·|x, y<t) ‖ p_T(·|x, feedback, y<t))                      (full vocab)

A_i = (r_i − mean_g r)/(std_g r + ε) (`scale=none`: r_i − mean_g r), λ = `coef`, averaged
over the step's tokens. With λ = 0 the loss is exactly the `grpo` recipe's (tested); the
EMA teacher is still scored and updated, so the logged kl is KL(student ‖ that teacher).
With `sibling=True` the teacher is instead shown a successful sibling: another completion
of the same group whose reward is ≥ 1 (the first such, in group order), after the row's
feedback when the row has one (`opd.selfdistill.siblings`); a row with no successful sibling
shows the teacher its feedback alone (or nothing).

Deviations:
- One gradient step per rollout, so π_old = π_θ: the importance ratio ρ_t is 1 and its clip
  never binds, for the GRPO term and for the distillation term alike (the paper reuses a
  rollout for several updates and clips the ratio).
- The loss is a plain sum of the GRPO loss and λ times the full-vocabulary reverse KL to the
  self-teacher (issue 11's formulation). A secondary summary reports the paper blending
  advantages, A = λ·A_GRPO + (1 − λ)·A_SDPO, and distilling on the top-k (not verified
  against the paper); neither is offered here.
- With `sibling=True`, rows without a successful sibling are not dropped from the
  distillation term: their teacher sees the feedback alone, or the student's prompt (the EMA
  teacher then only damps the update). A row's own completion is never its sibling. How
  the paper treats such rows was not verified.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.rl.parts import GRPO, Grouped
from opd.sampling import student
from opd.selfdistill import TEMPLATE, PrivilegedPrompts, SelfAccess
from opd.selfdistill.combined import PlusDistillation
from opd.signals import Divergence


@recipe(
    citation="Hübotter et al., Reinforcement Learning via Self-Distillation (SDPO), 2026 "
    "(arXiv 2601.20802)",
    summary="GRPO on G samples per prompt + λ·KL(q_student ‖ p_EMA-self(·|feedback))",
    signal="reward",
    access="self",
    granularity="token",
)
def sdpo(
    group_size: int = 4,
    coef: float = 1.0,
    teacher: str = "ema",
    ema_decay: float = 0.99,
    field: str = "feedback",
    template: str = TEMPLATE,
    sibling: bool = False,
    scale: str = "std",
    eps_low: float = 0.2,
    eps_high: float = 0.0,
    kl_coef: float = 0.0,
    reward: str = "",
    temperature: float = 1.0,
):
    """SDPO: GRPO plus λ = `coef` times the reverse KL to the feedback-conditioned EMA self."""
    who = "recipe 'sdpo'"
    rl = GRPO(group_size, scale, eps_low, eps_high, kl_coef, reward)
    grouped = Grouped(student(), group_size)
    if sibling:
        from opd.selfdistill.siblings import SiblingPrompts

        prefixes = SiblingPrompts(grouped, group_size, field, template, reward, who)
    else:
        prefixes = PrivilegedPrompts(grouped, field=field, template=template, who=who)
    return Method(
        prefixes=prefixes,
        teacher=SelfAccess(teacher, ema_decay),
        signal=PlusDistillation(rl, Divergence("reverse_kl", temperature=temperature), coef),
    )
