"""The RL core shared by RL-integrated recipes (`opd.rl.grpo`)."""

from opd.rl.grpo import (
    clipped_surrogate,
    group_advantages,
    grpo_token_loss,
    k3_kl,
    load_reward_fn,
    rollout_rewards,
    verifier_rewards,
)

__all__ = [
    "clipped_surrogate",
    "group_advantages",
    "grpo_token_loss",
    "k3_kl",
    "load_reward_fn",
    "rollout_rewards",
    "verifier_rewards",
]
