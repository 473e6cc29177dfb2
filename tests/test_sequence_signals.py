"""Sampled-token and sequence-level signals: defining properties on tiny exact problems.

The tabular problem: V tokens, sequences of length T, a student and a teacher whose next-token
logits depend on (position, previous token) only. All V**T sequences are enumerated, so
expectations over y ~ q are exact sums and the sequence-level reverse KL
KL(q(y) ‖ p(y)) = Σ_y q(y) (log q(y) − log p(y)) has an exact autograd gradient.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from opd.build import finish_models
from opd.context import StepContext
from opd.errors import ConfigError
from opd.evaluate import generic_verify
from opd.losses import divergence
from opd.models import decoder_and_head
from opd.parts import LogsMetrics
from opd.sampling import make_rollout
from opd.signals import (
    GOPD,
    Ketchup,
    MiniLLMPolicyGradient,
    Reopold,
    RewardWeighted,
    SampledRKL,
)
from opd.signals.tokens import discounted_returns, future_returns, pack_rows, student_entropy
from opd.teachers import SampledLogprobs
from opd.tiny import tiny_llama
from opd.train import student_rows
from opd.types import StudentRows, TeacherScores

V, T = 3, 3


def tabular(seed=0, same=False):
    """(student rows, teacher scores with full logits, sequences) for all V**T sequences."""
    g = torch.Generator().manual_seed(seed)
    d = T * (V + 1)  # one feature per (position, previous token or BOS)
    seqs = list(itertools.product(range(V), repeat=T))
    feats, targets, rows = [], [], []
    for b, y in enumerate(seqs):
        for t in range(T):
            prev = y[t - 1] if t else V
            feats.append(torch.nn.functional.one_hot(torch.tensor(t * (V + 1) + prev), d))
            targets.append(y[t])
            rows.append(b)
    hidden_ND = torch.stack(feats).double()
    theta_VD = torch.randn(V, d, generator=g, dtype=torch.float64).requires_grad_()
    phi_VD = (
        theta_VD.detach().clone()
        if same
        else 2 * torch.randn(V, d, generator=g, dtype=torch.float64)
    )
    student = StudentRows(hidden_ND, theta_VD, torch.tensor(targets), torch.tensor(rows))
    return student, TeacherScores(hidden_ND=hidden_ND, head_VD=phi_VD), seqs


def token_logprobs_of(rows: StudentRows, head_VD):
    return (rows.hidden_ND @ head_VD.T).log_softmax(-1).gather(-1, rows.target_ids_N[:, None])[:, 0]


def exact_gradient_pair(signal, seed=0):
    """(∇ E_q[Σ_t signal_t], ∇ KL(q(y) ‖ p(y))) w.r.t. the student's table."""
    student, teacher, seqs = tabular(seed)
    logq_N = token_logprobs_of(student, student.head_VD)
    logp_N = token_logprobs_of(student, teacher.head_VD)
    B = len(seqs)
    logq_B = torch.zeros(B, dtype=torch.float64).index_add(0, student.row_index_N, logq_N)
    logp_B = torch.zeros(B, dtype=torch.float64).index_add(0, student.row_index_N, logp_N)
    kl = (logq_B.exp() * (logq_B - logp_B)).sum()
    (g_exact,) = torch.autograd.grad(kl, student.head_VD)
    values_N = signal(student, teacher, StepContext(chunk_size=5))
    q_B = logq_B.detach().exp()
    surrogate = (q_B[student.row_index_N] * values_N).sum()  # E_{y~q} Σ_t value_t, exactly
    (g_signal,) = torch.autograd.grad(surrogate, student.head_VD)
    return g_signal, g_exact


# --- returns -----------------------------------------------------------------------------------


def brute_returns(r_BT, mask_BT, gamma, horizon, exclude, norm):
    B, L = r_BT.shape
    out = torch.zeros_like(r_BT)
    for b in range(B):
        n = int(mask_BT[b].sum())
        for t in range(n):
            lo = t + 1 if exclude else t
            hi = n if horizon is None else min(n, lo + horizon)
            terms = [gamma ** (u - lo) * r_BT[b, u] for u in range(lo, hi)]
            s = sum(terms) if terms else 0.0
            out[b, t] = s / max(len(terms), 1) if norm else s
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("horizon", [None, 1, 2, 10])
@pytest.mark.parametrize("exclude,norm", [(False, False), (True, False), (True, True)])
def test_future_returns_match_brute_force(gamma, horizon, exclude, norm):
    lengths = [4, 1, 3, 5]
    row_index_N = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    r_N = torch.randn(
        len(row_index_N), dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    r_BT, mask_BT, index = pack_rows(r_N, row_index_N)
    assert r_BT.shape == (4, 5) and int(mask_BT.sum()) == len(r_N)
    got = future_returns(r_N, row_index_N, gamma, horizon, exclude, norm)
    want = brute_returns(r_BT, mask_BT, gamma, horizon, exclude, norm)[index]
    torch.testing.assert_close(got, want)


def test_discounted_returns_edge_cases():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(discounted_returns(r, 0.0), r)  # γ = 0: the reward itself
    torch.testing.assert_close(discounted_returns(r, 1.0), torch.tensor([[6.0, 5.0, 3.0]]))
    torch.testing.assert_close(discounted_returns(r, 1.0, horizon=1), r)


# --- SampledRKL ------------------------------------------------------------------------------


def test_sampled_rkl_per_token_form():
    student, teacher, _ = tabular()
    values = SampledRKL()(student, teacher, StepContext(chunk_size=4))
    logq = token_logprobs_of(student, student.head_VD)
    a = -(logq.detach() - token_logprobs_of(student, teacher.head_VD))
    torch.testing.assert_close(values, -a * logq)
    # sampled-only scores give the same values as full-logits scores
    sampled = TeacherScores(token_logprobs_N=token_logprobs_of(student, teacher.head_VD))
    torch.testing.assert_close(SampledRKL()(student, sampled, StepContext()), values)
    torch.testing.assert_close(
        SampledRKL()(student, sampled, StepContext(materialize=True)), values
    )


def test_sampled_rkl_is_zero_when_teacher_equals_student():
    student, teacher, _ = tabular(same=True)
    for discount in (0.0, 1.0):
        values = SampledRKL(discount)(student, teacher, StepContext())
        torch.testing.assert_close(values, torch.zeros_like(values))
        (grad,) = torch.autograd.grad(values.sum(), student.head_VD)
        torch.testing.assert_close(grad, torch.zeros_like(grad))


def test_sampled_rkl_expected_gradient_is_the_sequence_reverse_kl_gradient():
    g_signal, g_exact = exact_gradient_pair(SampledRKL(discount=1.0))
    torch.testing.assert_close(g_signal, g_exact)
    # the per-token advantage (γ = 0) is biased but still points the same way here
    g0, _ = exact_gradient_pair(SampledRKL(discount=0.0))
    assert torch.nn.functional.cosine_similarity(g0.flatten(), g_exact.flatten(), dim=0) > 0.5


# --- MiniLLM and KETCHUP ---------------------------------------------------------------------


def test_minillm_expected_gradient_is_the_sequence_reverse_kl_gradient():
    sig = MiniLLMPolicyGradient(discount=1.0, length_norm=False, whiten=False)
    g_signal, g_exact = exact_gradient_pair(sig)
    torch.testing.assert_close(g_signal, g_exact)


def test_minillm_chunked_and_materialized_agree():
    student, teacher, _ = tabular(seed=3)
    sig = MiniLLMPolicyGradient()
    a = sig(student, teacher, StepContext(chunk_size=4))
    b = sig(student, teacher, StepContext(materialize=True))
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a.sum(), student.head_VD)[0]
    gb = torch.autograd.grad(b.sum(), student.head_VD)[0]
    torch.testing.assert_close(ga, gb)


def test_ketchup_with_k_at_least_t_is_minillm_and_k1_is_one_step():
    student, teacher, _ = tabular(seed=2)
    ctx = StepContext(chunk_size=7)
    full = MiniLLMPolicyGradient(whiten=False)(student, teacher, ctx)
    torch.testing.assert_close(Ketchup(k=T, whiten=False)(student, teacher, ctx), full)
    torch.testing.assert_close(Ketchup(k=100, whiten=False)(student, teacher, ctx), full)
    # k = 1: the advantage is the next token's reward alone
    sig = Ketchup(k=1, whiten=False, single_step=False)
    values = sig(student, teacher, ctx)
    r = (
        token_logprobs_of(student, teacher.head_VD) - token_logprobs_of(student, student.head_VD)
    ).detach()
    r_next = torch.cat([r[1:], r[:1] * 0]).view(-1, T)
    r_next[:, -1] = 0
    torch.testing.assert_close(values.detach(), -r_next.flatten())
    with pytest.raises(ConfigError, match="k must be"):
        Ketchup(k=0)


def test_minillm_clips_the_importance_ratio_like_ppo():
    student, teacher, seqs = tabular(seed=4)
    B = len(seqs)
    ro = make_rollout([[1]] * B, [list(y) for y in seqs], pad_id=0, writer="student")
    sig = MiniLLMPolicyGradient(whiten=False, single_step=False, clip=0.2)
    adv = future_returns(
        (
            token_logprobs_of(student, teacher.head_VD)
            - token_logprobs_of(student, student.head_VD)
        ).detach(),
        student.row_index_N,
        1.0,
        None,
        exclude_current=True,
        length_norm=True,
    )
    logq = token_logprobs_of(student, student.head_VD)
    c_N = torch.rand(len(logq), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for w in (1.1, 2.0, 0.3):
        ctx = StepContext(rollout=dataclasses.replace(ro, token_weight_BT=torch.full((B, T), w)))
        loss_N = sig(student, teacher, ctx) * w  # the loop multiplies by the sampler weight
        (g,) = torch.autograd.grad((c_N * loss_N).sum(), student.head_VD)
        # PPO: a token's gradient vanishes when its ratio w is clipped in its advantage's direction
        clipped_N = ((w > 1.2) & (adv > 0)) | ((w < 0.8) & (adv < 0))
        coef_N = torch.where(clipped_N, torch.zeros_like(adv), -adv * w)
        (g_ref,) = torch.autograd.grad(
            (c_N * coef_N * logq).sum(), student.head_VD, retain_graph=True
        )
        torch.testing.assert_close(g, g_ref)
        assert 0 < int(clipped_N.sum()) < len(adv) or w == 1.1


# --- G-OPD -----------------------------------------------------------------------------------


def test_gopd_lambda_one_is_sampled_rkl():
    student, teacher, _ = tabular(seed=5)
    ctx = StepContext()
    torch.testing.assert_close(
        GOPD(lam=1.0)(student, teacher, ctx), SampledRKL()(student, teacher, ctx)
    )
    torch.testing.assert_close(
        GOPD(lam=1.0, discount=1.0)(student, teacher, ctx), SampledRKL(1.0)(student, teacher, ctx)
    )


@pytest.fixture
def tiny_pair(tok):
    teacher = tiny_llama(len(tok), hidden=32, layers=2, seed=11)
    stud = tiny_llama(len(tok), hidden=24, layers=1, seed=12)
    models = finish_models(teacher, stud, tok)
    ro = make_rollout([[5, 6, 7], [8, 9]], [[20, 21, 22], [24, 25]], pad_id=0, writer="student")
    dec, head, _ = decoder_and_head(models.student, verify=False)
    rows = student_rows(dec, head[: models.vocab_size], ro, "cpu")
    scores = SampledLogprobs().score(models.teacher, ro, models.vocab_size)
    return models, ro, rows, scores


def test_gopd_with_the_current_student_as_reference(tiny_pair):
    models, ro, rows, scores = tiny_pair
    ctx = StepContext(rollout=ro, models=models)
    base = SampledRKL()(rows, scores, ctx)
    # π_ref = π_θ: A = λ (log p − log q), i.e. λ × the OPD advantage
    got = GOPD(lam=2.0, reference=models.student)(rows, scores, ctx)
    torch.testing.assert_close(got, 2.0 * base, atol=1e-5, rtol=1e-5)
    # default reference: a frozen copy made once, at the first call
    sig = GOPD(lam=1.5)
    first = sig(rows, scores, ctx)
    ref = sig._cache["model"]
    assert ref is not models.student and not any(p.requires_grad for p in ref.parameters())
    torch.testing.assert_close(first, 1.5 * base, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for p in models.student.parameters():
            p.add_(0.1)
    sig(rows, scores, ctx)
    assert sig._cache["model"] is ref  # not re-copied after the student moved
    assert hash(sig) == hash(GOPD(lam=1.5))


# --- REOPOLD ---------------------------------------------------------------------------------


def test_reopold_clips_rewards_from_below_and_keeps_high_entropy_tokens():
    student, teacher, _ = tabular(seed=6)
    ctx = StepContext()
    logq = token_logprobs_of(student, student.head_VD)
    r = token_logprobs_of(student, teacher.head_VD) - logq.detach()
    all_tokens = Reopold(lam=0.2, top_entropy=1.0)(student, teacher, ctx)
    torch.testing.assert_close(all_tokens, -r.clamp_min(torch.log(torch.tensor(0.25))) * logq)
    assert (r < Reopold(lam=0.2).floor).any()  # the clip is exercised
    some = Reopold(lam=0.2, top_entropy=0.25)(student, teacher, ctx)
    n = len(some)
    kept = some != 0
    n_keep = -(-n // 4)
    assert int(kept.sum()) <= n_keep
    entropy = student_entropy(student)
    assert entropy[kept].min() >= entropy[~kept].max() - 1e-12
    torch.testing.assert_close(some[kept], all_tokens[kept] * n / n_keep)
    # refinement: after the switch point it is plain sampled-token OPD
    late = StepContext(step=9, total_steps=10)
    torch.testing.assert_close(
        Reopold(refine_after=0.5)(student, teacher, late), SampledRKL()(student, teacher, late)
    )
    with pytest.raises(ConfigError, match="lam"):
        Reopold(lam=1.0)


# --- reward-weighted -------------------------------------------------------------------------


def test_reward_weighted_uses_the_verifier_and_the_kl(tok):
    ro = make_rollout(
        [[5], [6], [7]],
        [tok.encode("7"), tok.encode("12"), tok.encode("x")],
        pad_id=0,
        writer="student",
        answers=("7", "12", "3"),
    )
    n = ro.num_tokens
    g = torch.Generator().manual_seed(0)
    rows = StudentRows(
        torch.randn(n, 4, generator=g, dtype=torch.float64),
        torch.randn(len(tok), 4, generator=g, dtype=torch.float64, requires_grad=True),
        ro.completion_ids_BT[ro.completion_mask_BT.bool()],
        ro.completion_mask_BT.nonzero()[:, 0],
    )
    teacher = TeacherScores(hidden_ND=rows.hidden_ND * 2, head_VD=rows.head_VD.detach().flip(0))
    ctx = StepContext(rollout=ro, tokenizer=tok, verify=generic_verify)
    values = RewardWeighted(beta=0.5)(rows, teacher, ctx)
    R = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    logq = token_logprobs_of(rows, rows.head_VD)
    kl = divergence(
        "reverse_kl", rows.hidden_ND @ rows.head_VD.T, teacher.hidden_ND @ teacher.head_VD.T
    )
    torch.testing.assert_close(values, -(R - R.mean())[rows.row_index_N] * logq + 0.5 * kl)
    # the mean reward is reported to the context for the step row, not written into the rollout
    assert ctx.metrics == {"reward_mean": pytest.approx(2 / 3)} and ro.info == {}
    assert isinstance(RewardWeighted(), LogsMetrics) and set(ctx.metrics) <= RewardWeighted.logs
    assert RewardWeighted(kl="sampled").requires == frozenset({"token_logprobs"})
    sampled = RewardWeighted(beta=0.5, kl="sampled")(rows, teacher, ctx)
    logits_t = teacher.hidden_ND @ teacher.head_VD.T
    logp = logits_t.log_softmax(-1).gather(-1, rows.target_ids_N[:, None])[:, 0]
    torch.testing.assert_close(
        sampled, -(R - R.mean())[rows.row_index_N] * logq + 0.5 * (logq.detach() - logp) * logq
    )
    bad = dataclasses.replace(ro, answers=(None, "1", "2"))
    with pytest.raises(ConfigError, match="answer"):
        RewardWeighted()(rows, teacher, dataclasses.replace(ctx, rollout=bad))
