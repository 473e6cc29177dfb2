"""The survey's staged budget (§8): off-policy warm-up, on-policy logits, reward refinement.

    progress [0, 0.65)   dataset writes y;  KL(p_teacher ‖ q_student)       (off-policy warm-up)
    progress [0.65, 0.9) student writes y;  KL(q_student ‖ p_teacher)       (on-policy logits)
    progress [0.9, 1.0]  student writes y;  −(R − mean R)·log q(y_t) + β·KL(q_t ‖ p_t)
                                            (reward-guided, R from the task's verifier)

The survey recommends 60–70 % / 20–30 % / 10 %; the boundaries are arguments. Deviations:
the stages switch at fixed fractions of the step budget (the survey gives no switching rule);
the reward stage uses the batch-mean reward as its baseline. Needs `completion` fields for
the warm-up and `answer` fields (or a shipped task) for the reward stage.
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import dataset, student
from opd.signals import ByProgress, Divergence, RewardWeighted


@recipe(
    citation="Survey of on-policy distillation, §8 (staged training budget)",
    summary="65% off-policy FKL warm-up, 25% on-policy RKL, 10% reward-guided refinement",
    signal="logit + reward",
    access="white-box",
    granularity="hybrid",
)
def staged(
    warmup: float = 0.65, on_policy: float = 0.9, beta: float = 1.0, temperature: float = 1.0
):
    """Staged distillation; `warmup` and `on_policy` are the stage boundaries in [0, 1]."""
    if not 0 < warmup < on_policy < 1:
        raise ValueError(
            f"need 0 < warmup < on_policy < 1, got warmup={warmup}, on_policy={on_policy}"
        )
    return Method(
        prefixes=ByProgress(((warmup, dataset()), (1.0, student()))),
        signal=ByProgress(
            (
                (warmup, Divergence("forward_kl", {}, temperature)),
                (on_policy, Divergence("reverse_kl", {}, temperature)),
                (1.0, RewardWeighted(beta=beta)),
            )
        ),
    )
