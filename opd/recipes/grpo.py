"""GRPO (Shao et al., 2024, DeepSeekMath, arXiv 2402.03300): the RL baseline, no teacher.

The student writes G completions per prompt; each is rewarded by the task's verifier (1 if
its answer is right, else 0) or by a reward function given by import path (`reward`); its
tokens share the group-normalised advantage A = (r − mean_g r)/(std_g r + ε) (`scale=none`:
Dr. GRPO's r − mean_g r) in PPO's clipped surrogate, plus β·k3 KL to the initial student when
kl_coef > 0 (`opd.rl.grpo`). It is the shared core of the RL-integrated self-distillation
recipes; on its own it is the baseline that OPSD and SDPO compare against.

Deviations:
- One gradient step per rollout, so π_old = π_θ and the clip never binds (the paper allows
  several updates per batch).
- The loss is averaged over all counted tokens of the step (the loop's token mean), not per
  sequence first (the paper's 1/|o_i|).
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.rl.parts import GRPO, Grouped, NoTeacher
from opd.sampling import student


@recipe(
    citation="Shao et al., DeepSeekMath, 2024 (arXiv 2402.03300); Dr. GRPO: Liu et al., 2025",
    summary="student writes G samples per prompt; group-normalised verifier reward, clipped PG",
    signal="reward",
    access="none",
    granularity="sequence",
)
def grpo(
    group_size: int = 4,
    scale: str = "std",
    eps_low: float = 0.2,
    eps_high: float = 0.0,
    kl_coef: float = 0.0,
    reward: str = "",
):
    """GRPO with G = `group_size` samples per prompt and the task's verifier as reward."""
    return Method(
        prefixes=Grouped(student(), group_size),
        teacher=NoTeacher(),
        signal=GRPO(group_size, scale, eps_low, eps_high, kl_coef, reward),
    )
