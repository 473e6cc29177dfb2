"""Sampled-token on-policy distillation (Lu & Thinking Machines Lab, tinker-cookbook, 2025).

The student writes y; the teacher returns only log p(y_t) of the written tokens. Each token's
advantage is the negative sampled reverse KL, A_t = −(log q(y_t) − log p(y_t)) (detached),
optionally summed over the future with discount γ, and the loss is −A_t · log q(y_t): one
REINFORCE step of the RL loop with the teacher as a dense per-token reward. Its expected
gradient (γ = 1) is the gradient of the sequence KL(q_student ‖ p_teacher).
Deviations:
- tinker's loss is −A_t · q/q_old (importance sampling against the sampler); with fresh
  samples every step this has the same gradient as −A_t · log q, used here.
- Reduction: tinker sums the per-token losses over the batch; opd takes the token mean (the
  loop's `token_mean`). The gradient direction is the same; its scale differs by the number
  of counted tokens N, so a learning rate tuned for tinker's sum is N times too small here.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import student
from opd.signals import SampledRKL
from opd.teachers import SampledLogprobs


@recipe(
    citation="Lu & Thinking Machines Lab, On-Policy Distillation, 2025 (tinker-cookbook)",
    summary="student writes y; advantage −(log q − log p)(y_t), policy gradient per token",
    signal="sampled log-prob",
    access="sampled",
    granularity="token",
)
def sampled_rkl(discount: float = 0.0):
    """Tinker-style OPD with per-token (discount 0) or discounted-future advantages."""
    return Method(
        prefixes=student(),
        teacher=SampledLogprobs(),
        signal=SampledRKL(discount=discount),
    )
