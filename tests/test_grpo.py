"""The GRPO core (issue 11, item 3): advantages, clipped surrogate, k3 KL and rewards, against
hand computations in float64."""

from __future__ import annotations

import math

import pytest
import torch

from opd.context import StepContext
from opd.errors import ConfigError
from opd.evaluate import generic_verify
from opd.rl import (
    clipped_surrogate,
    group_advantages,
    grpo_token_loss,
    k3_kl,
    load_reward_fn,
    rollout_rewards,
)
from opd.sampling.sources import make_rollout

F64 = torch.float64


def length_reward(completions, answers):
    """A reward function for the import-path test: the completion's length."""
    return [len(c) for c in completions]


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0], dtype=F64)
    adv = group_advantages(r, 4)
    s1 = math.sqrt((4 * 0.25) / 3)  # sample std (divisor G − 1) of [1, 0, 0, 1]
    a1 = 0.5 / (s1 + 1e-4)
    s3 = math.sqrt((3 * 0.25**2 + 0.75**2) / 3)  # [0, 0, 0, 1]: mean 0.25
    want = [a1, -a1, -a1, a1, 0, 0, 0, 0] + [-0.25 / (s3 + 1e-4)] * 3 + [0.75 / (s3 + 1e-4)]
    assert torch.allclose(adv, torch.tensor(want, dtype=F64), rtol=0, atol=1e-12)
    dr = group_advantages(r, 4, scale="none")  # Dr. GRPO: centred only
    want_dr = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.25, -0.25, -0.25, 0.75]
    assert torch.equal(dr, torch.tensor(want_dr, dtype=F64))
    assert torch.equal(group_advantages(r, 1), torch.zeros_like(r))  # a group of one
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(r, 5)
    with pytest.raises(ConfigError, match="valid: std, none"):
        group_advantages(r, 4, scale="max")


def test_clipped_surrogate_values_and_gradient_by_hand():
    # (ratio, advantage): inside the band, above it, below it, for A > 0 and A < 0
    ratios = [1.1, 1.5, 0.5, 1.5, 0.5, 0.9]
    advs = [2.0, 2.0, 2.0, -1.0, -1.0, -3.0]
    old = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0, -0.7], dtype=F64)
    logp = (old + torch.log(torch.tensor(ratios, dtype=F64))).requires_grad_(True)
    A = torch.tensor(advs, dtype=F64)
    loss = clipped_surrogate(logp, old, A, eps_low=0.2)
    # min(ρA, clip(ρ, 0.8, 1.2)A), by hand
    want = [-(1.1 * 2), -(1.2 * 2), -(0.5 * 2), -(1.5 * -1), -(0.8 * -1), -(0.9 * -3)]
    assert torch.allclose(loss, torch.tensor(want, dtype=F64), rtol=0, atol=1e-12)
    loss.sum().backward()
    # unclipped: d(−ρA)/d log π = −ρA; clipped: 0
    grad = [-1.1 * 2, 0.0, -0.5 * 2, -1.5 * -1, 0.0, -0.9 * -3]
    assert torch.allclose(logp.grad, torch.tensor(grad, dtype=F64), rtol=0, atol=1e-12)


def test_clip_higher_and_on_policy_gradient():
    old = torch.zeros(2, dtype=F64)
    logp = torch.log(torch.tensor([1.25, 1.25], dtype=F64)).requires_grad_(True)
    A = torch.tensor([1.0, 1.0], dtype=F64)
    loss = clipped_surrogate(logp, old, A, eps_low=0.2, eps_high=0.28)  # 1.25 < 1.28: inside
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([-1.25, -1.25], dtype=F64))
    # one update per rollout: π_old = π_θ detached, ratio 1, gradient −A
    logp = torch.tensor([-0.3, -2.0], dtype=F64, requires_grad=True)
    A = torch.tensor([0.7, -1.3], dtype=F64)
    loss = clipped_surrogate(logp, logp.detach(), A)
    assert torch.allclose(loss, -A)
    loss.sum().backward()
    assert torch.allclose(logp.grad, -A, rtol=0, atol=1e-15)


def test_k3_and_the_full_token_loss_by_hand():
    logp = torch.tensor([-1.0, -0.2], dtype=F64, requires_grad=True)
    ref = torch.tensor([-0.5, -0.2], dtype=F64)
    k3 = k3_kl(logp, ref)
    d = 0.5  # log π_ref − log π_θ of the first token
    assert torch.allclose(k3, torch.tensor([math.exp(d) - d - 1, 0.0], dtype=F64))
    A = torch.tensor([1.0, -2.0], dtype=F64)
    loss = grpo_token_loss(logp, logp.detach(), A, ref, kl_coef=0.1)
    loss.sum().backward()
    # d/dlogp: −A + 0.1·(1 − exp(Δ))
    want = [-1.0 + 0.1 * (1 - math.exp(d)), 2.0 + 0.0]
    assert torch.allclose(logp.grad, torch.tensor(want, dtype=F64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="ref_logp_N"):
        grpo_token_loss(logp, logp, A, kl_coef=0.1)


def test_rewards_from_the_verifier_and_from_an_import_path(tok):
    prompts = [tok("1+1=").input_ids] * 2
    comps = [
        tok("2", add_special_tokens=False).input_ids,
        tok("35", add_special_tokens=False).input_ids,
    ]
    rollout = make_rollout(prompts, comps, 0, "student", answers=["2", "2"])
    ctx = StepContext(tokenizer=tok, verify=generic_verify)
    assert rollout_rewards(rollout, ctx).tolist() == [1.0, 0.0]
    fn = load_reward_fn("tests.test_grpo:length_reward")
    assert rollout_rewards(rollout, ctx, fn).tolist() == [1.0, 2.0]
    assert load_reward_fn("tests.test_grpo.length_reward") is fn
    with pytest.raises(ConfigError, match="has no 'nope'"):
        load_reward_fn("tests.test_grpo:nope")
    with pytest.raises(ConfigError, match="cannot import"):
        load_reward_fn("no_such_module_xyz:f")


# ---------------------------------------------------------------- GRPO in the loop


def digit_reward(completions, answers):
    """1.0 for a completion that starts with '1', else 0.0."""
    return [float(c.startswith("1")) for c in completions]


def test_grpo_signal_values_and_gradient_by_hand(tok):
    from opd.rl.parts import GRPO
    from opd.types import StudentRows

    torch.manual_seed(0)
    prompts = [tok("1+1=").input_ids] * 4
    comps = [tok(c, add_special_tokens=False).input_ids for c in ("1", "22", "13", "4")]
    rollout = make_rollout(prompts, comps, 0, "student")
    mask_BT = rollout.completion_mask_BT.bool()
    V, D = len(tok), 8
    hidden = torch.randn(int(mask_BT.sum()), D, dtype=F64, requires_grad=True)
    head = torch.randn(V, D, dtype=F64)
    rows = StudentRows(hidden, head, rollout.completion_ids_BT[mask_BT], mask_BT.nonzero()[:, 0])
    ctx = StepContext(tokenizer=tok, rollout=rollout, chunk_size=4)
    signal = GRPO(group_size=2, reward="tests.test_grpo:digit_reward")
    values = signal(rows, None, ctx)
    # groups (1, 22) and (13, 4): rewards (1, 0), (1, 0): A = ±0.5/(std + ε), std = √0.5
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    A_N = torch.tensor([a, -a, -a, a, a, -a], dtype=F64)  # tokens 1 | 2 2 | 1 3 | 4
    assert torch.allclose(values, -A_N, rtol=0, atol=1e-12)  # ratio 1: −A per token
    assert ctx.metrics["reward_mean"] == 0.5
    values.sum().backward()
    logq = torch.log_softmax(hidden.detach() @ head.T, -1).gather(1, rows.target_ids_N[:, None])
    logq = logq.squeeze(1)
    # d(−A·log q)/dh = −A·(W[y] − Σ_v q_v W[v])
    probs = torch.softmax(hidden.detach() @ head.T, -1)
    want = -A_N[:, None] * (head[rows.target_ids_N] - probs @ head)
    assert torch.allclose(hidden.grad, want, rtol=0, atol=1e-10)
    assert torch.isfinite(logq).all()


def test_grpo_recipe_runs_from_the_cli(tmp_path):
    import json

    from tests.helpers import (
        assert_clean_error,
        run_opd,
        save_tiny_models,
        small_cli_args,
        write_prompts,
    )

    dirs = save_tiny_models(tmp_path)
    data = write_prompts(tmp_path / "d.jsonl", n=8)
    args = small_cli_args(
        tmp_path, dirs, data, "recipe=grpo", "method.args.group_size=2", "method.args.kl_coef=0.1"
    )
    res = run_opd(["distill", "--no-report", *args])
    assert res.code == 0, res.err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all("reward_mean" in r for r in steps)
    more = ("recipe=grpo", "method.args.reward=nowhere_xyz:f", f"output_dir={tmp_path / 'b'}")
    bad = run_opd(["distill", *small_cli_args(tmp_path, dirs, data, *more)])
    assert_clean_error(bad, "cannot import 'nowhere_xyz'")
