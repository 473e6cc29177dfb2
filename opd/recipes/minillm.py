"""MiniLLM (Gu et al., ICLR 2024): sequence-level KL(q_student ‖ p_teacher) by policy gradient.

y is drawn token by token from α·p + (1−α)·q (α = 0.2, `token_mix`) with importance weight
w_t = q/(α p + (1−α) q). Per token, with r_t = log p(y_t) − log q(y_t):

    loss_t = KL(q_t ‖ p_t)  +  max(−A_t ρ_t, −A_t clip(ρ_t, 0.8, 1.2)) / w_t,
    A_t = whiten(mean_{t' > t} r_t'),   ρ_t = w_t · q/sg(q)

(the loop multiplies by w_t: single step weighted, PPO-clipped long-term part).
Deviations (details in `opd.signals.policy_gradient`):
- R_{t+1} and the w-weighted single step follow the paper (the official code uses R_t and
  an unweighted single step).
- γ = 1 (code: 0.95); one pass per rollout (code: 4 PPO epochs); no reward scaling or
  clipping; no pre-training language-modelling loss.
- Whitening: the advantages are whitened with the mean and standard deviation over the
  counted completion tokens of the micro-batch only (padding never enters the statistics);
  the outside review of the authors' code found their statistics are taken differently.
- The sampler's own weight clip is off (`clip=None`) so clipping happens PPO-style in the
  signal, as in MiniLLM.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling.token_level import token_mix
from opd.signals import MiniLLMPolicyGradient
from opd.teachers import FullLogits


@recipe(
    citation="Gu et al., MiniLLM: Knowledge Distillation of Large Language Models, ICLR 2024",
    summary="teacher-mixed sampling; sequence KL(q ‖ p) by policy gradient + exact single step",
    signal="logit + sampled log-prob",
    access="white-box",
    granularity="sequence",
)
def minillm(alpha: float = 0.2, clip: float = 0.2, discount: float = 1.0, whiten: bool = True):
    """MiniLLM with teacher-mix α, ratio clip ε, reward-to-go discount γ."""
    return Method(
        prefixes=token_mix(alpha=alpha, clip=None),
        teacher=FullLogits(),
        signal=MiniLLMPolicyGradient(discount=discount, whiten=whiten, clip=clip),
    )
