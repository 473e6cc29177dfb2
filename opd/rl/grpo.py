"""GRPO core: group-normalised advantages, the clipped surrogate and the k3 KL penalty.

G completions are sampled per prompt; rows b·G .. b·G + G − 1 of a rollout belong to prompt b.
Each completion i gets a scalar reward r_i (the task's verifier: 1 if correct else 0, or a
reward function given by import path). Its advantage, shared by all of its tokens, is

    A_i = (r_i − mean_g(r)) / (std_g(r) + ε)        scale="std"  (GRPO, Shao et al. 2024)
    A_i =  r_i − mean_g(r)                           scale="none" (Dr. GRPO, Liu et al. 2025)

std_g is the SAMPLE standard deviation of the group (Bessel's correction, divisor G − 1, as
`torch.std` and TRL's GRPO trainer compute it); a group of one has advantage 0. ε = 1e-4.
Dr. GRPO also drops the per-sequence length normalisation: use the loop's "token_mean"
reduction (or a constant normaliser), not "sequence_mean".

Per token t of completion i, with ratio ρ_t = π_θ(y_t) / π_old(y_t) = exp(log π_θ − log π_old):

    L_t = −min(ρ_t·A_i, clip(ρ_t, 1 − ε_low, 1 + ε_high)·A_i) + β·k3_t
    k3_t = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1   (≥ 0; unbiased estimate of
           KL(π_θ ‖ π_ref) on tokens sampled from π_θ; Schulman 2020)

ε_low = ε_high = 0.2 by default (ε_high > ε_low is DAPO's "clip higher"). With one gradient
step per rollout (opd's loop) π_old = π_θ detached, so ρ_t = 1 in value and the gradient is
A_i·∇log π_θ(y_t): clipping binds only when a rollout is reused for several updates.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch

from opd.errors import ConfigError

EPS = 1e-4
SCALES = ("std", "none")


def group_advantages(
    rewards_B: torch.Tensor, group_size: int, scale: str = "std", eps: float = EPS
) -> torch.Tensor:
    """(B,) advantages of (B,) rewards in consecutive groups of `group_size` (module doc)."""
    if scale not in SCALES:
        raise ConfigError(f"advantage scale {scale!r}; valid: {', '.join(SCALES)}")
    B = rewards_B.shape[0]
    if group_size < 1 or B % group_size:
        raise ValueError(f"{B} rewards do not split into groups of {group_size}")
    r_bG = rewards_B.reshape(-1, group_size)
    centred_bG = r_bG - r_bG.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred_bG.reshape(B)
    if group_size == 1:
        return torch.zeros_like(rewards_B)
    std_b1 = r_bG.std(dim=1, correction=1, keepdim=True)
    return (centred_bG / (std_b1 + eps)).reshape(B)


def clipped_surrogate(
    logp_N: torch.Tensor,
    old_logp_N: torch.Tensor,
    adv_N: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float | None = None,
) -> torch.Tensor:
    """(N,) PPO's per-token loss −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A)."""
    eps_high = eps_low if eps_high is None else eps_high
    ratio_N = torch.exp(logp_N - old_logp_N.detach())
    clipped_N = torch.clamp(ratio_N, 1 - eps_low, 1 + eps_high)
    return -torch.minimum(ratio_N * adv_N, clipped_N * adv_N)


def k3_kl(logp_N: torch.Tensor, ref_logp_N: torch.Tensor) -> torch.Tensor:
    """(N,) k3 = exp(Δ) − Δ − 1 with Δ = log π_ref − log π_θ (≥ 0, module doc)."""
    delta_N = ref_logp_N.detach() - logp_N
    return torch.exp(delta_N) - delta_N - 1


def grpo_token_loss(
    logp_N: torch.Tensor,
    old_logp_N: torch.Tensor,
    adv_N: torch.Tensor,
    ref_logp_N: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float | None = None,
) -> torch.Tensor:
    """(N,) per-token GRPO loss: clipped surrogate + kl_coef·k3 (a reference is needed when
    kl_coef > 0); reduce with the loop's reduction."""
    loss_N = clipped_surrogate(logp_N, old_logp_N, adv_N, eps_low, eps_high)
    if kl_coef:
        if ref_logp_N is None:
            raise ValueError("kl_coef > 0 needs the reference's log-probs (ref_logp_N)")
        loss_N = loss_N + kl_coef * k3_kl(logp_N, ref_logp_N)
    return loss_N


RewardFn = Callable[[Sequence[str], Sequence], Sequence[float]]


def verifier_rewards(texts: Sequence[str], answers: Sequence, verify) -> torch.Tensor:
    """(B,) 1.0 where `verify(text, answer)` holds, else 0.0 (0.0 where a row has no answer)."""
    return torch.tensor(
        [float(a is not None and bool(verify(t, a))) for t, a in zip(texts, answers)],
        dtype=torch.float32,
    )


def load_reward_fn(path: str) -> RewardFn:
    """The reward function named "package.module:function" (or "package.module.function"):
    called as fn(completions: list[str], answers: list) -> list[float], one per completion."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise ConfigError(f"reward function {path!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise ConfigError(f"reward function {path!r}: cannot import {module!r} ({err})") from None
    except AttributeError:
        raise ConfigError(f"reward function {path!r}: module {module!r} has no {name!r}") from None
    if not callable(fn):
        raise ConfigError(f"reward function {path!r} is not callable")
    return fn


def rollout_rewards(rollout, ctx, reward_fn: RewardFn | None = None) -> torch.Tensor:
    """(B,) rewards of a rollout's completions (decoded up to the mask) by `reward_fn`, else
    by the task's verifier `ctx.verify` against `rollout.answers`."""
    mask_BT = rollout.completion_mask_BT.bool()
    ids_BT = rollout.completion_ids_BT
    texts = [
        ctx.tokenizer.decode(ids_BT[b][mask_BT[b]].tolist(), skip_special_tokens=True)
        for b in range(len(ids_BT))
    ]
    answers = list(rollout.answers) or [None] * len(texts)
    if reward_fn is None:
        return verifier_rewards(texts, answers, ctx.verify)
    values = list(reward_fn(texts, answers))
    if len(values) != len(texts):
        raise ConfigError(f"reward function returned {len(values)} rewards for {len(texts)} rows")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)
