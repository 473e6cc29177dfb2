"""Teacher access modes (TopK, SampledLogprobs) and the top-k bucket divergence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opd.build import finish_models
from opd.context import StepContext
from opd.errors import ConfigError
from opd.losses import divergence
from opd.method import Method
from opd.sampling import make_rollout, student
from opd.signals import Divergence, MiniLLMPolicyGradient, SampledRKL
from opd.signals.topk import TopKDivergence, bucket_logprobs, chunked_bucket_logprobs
from opd.teachers import TAIL_ID, FullLogits, SampledLogprobs, TopK
from opd.teachers.topk import TAIL_FLOOR, log1mexp, teacher_topk_buckets, with_tail
from opd.tiny import tiny_llama
from opd.types import StudentRows, TeacherScores, completion_rows


@pytest.fixture
def models(tok):
    teacher = tiny_llama(len(tok), hidden=32, layers=2, seed=11)
    stud = tiny_llama(len(tok), hidden=24, layers=1, seed=12)
    return finish_models(teacher, stud, tok)


@pytest.fixture
def rollout():
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    completions = [[20, 21, 22, 23], [24], [25, 26, 27]]
    return make_rollout(prompts, completions, pad_id=0, writer="student")


def reference_logprobs(model, rollout, vocab):
    """(N, V) log-softmax of the model's own logits at the counted completion positions."""
    with torch.no_grad():
        logits_BLV = model(rollout.input_ids_BL, attention_mask=rollout.attention_mask_BL).logits
    return F.log_softmax(completion_rows(logits_BLV[..., :vocab].float(), rollout), dim=-1)


def test_topk_scores_match_the_full_distribution(models, rollout):
    k = 5
    scores = TopK(k).score(models.teacher, rollout, models.vocab_size)
    ref_NV = reference_logprobs(models.teacher, rollout, models.vocab_size)
    n = rollout.num_tokens
    assert scores.topk_ids_NK.shape == scores.topk_logprobs_NK.shape == (n, k + 1)
    assert (scores.topk_ids_NK[:, -1] == TAIL_ID).all()
    values, ids = ref_NV.topk(k, dim=-1)
    torch.testing.assert_close(scores.topk_logprobs_NK[:, :k], values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.topk_ids_NK[:, :k], ids)
    # the tail bucket holds the rest of the mass: the k + 1 buckets sum to 1
    torch.testing.assert_close(
        scores.topk_logprobs_NK.exp().sum(-1), torch.ones(n), atol=1e-5, rtol=0
    )
    targets = rollout.completion_ids_BT[rollout.completion_mask_BT.bool()]
    torch.testing.assert_close(
        scores.token_logprobs_N, ref_NV.gather(-1, targets[:, None])[:, 0], atol=1e-5, rtol=1e-5
    )
    assert scores.hidden_ND is None  # no full logits leak through


def test_sampled_scores_are_the_written_tokens_logprobs(models, rollout):
    scores = SampledLogprobs().score(models.teacher, rollout, models.vocab_size)
    ref_NV = reference_logprobs(models.teacher, rollout, models.vocab_size)
    targets = rollout.completion_ids_BT[rollout.completion_mask_BT.bool()]
    torch.testing.assert_close(
        scores.token_logprobs_N, ref_NV.gather(-1, targets[:, None])[:, 0], atol=1e-5, rtol=1e-5
    )
    assert scores.hidden_ND is None and scores.topk_logprobs_NK is None


def test_tail_bucket_and_log1mexp():
    x = torch.tensor([-1e-12, -1e-3, -0.5, -0.7, -3.0, -50.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), torch.log(-torch.expm1(x)))
    logp_NV = torch.randn(4, 9, dtype=torch.float64).log_softmax(-1)
    topk_NK = logp_NV.topk(3, dim=-1).values
    full_NK = with_tail(topk_NK)
    rest = 1 - topk_NK.exp().sum(-1)
    torch.testing.assert_close(full_NK[:, -1].exp(), rest)
    # k = V: the tail is empty: zero mass, yet a finite log-mass (floored, never −inf)
    tail_N = with_tail(logp_NV)[:, -1]
    assert (
        torch.isfinite(tail_N).all()
        and (tail_N >= TAIL_FLOOR).all()
        and (tail_N.exp() < 1e-12).all()
    )
    assert (with_tail(torch.zeros(2, 1))[:, -1] == TAIL_FLOOR).all()  # top-1 of a one-token V


def test_access_modes_validate():
    with pytest.raises(ValueError, match="k must be"):
        TopK(0)
    with pytest.raises(ValueError, match="temperature"):
        TopK(4, temperature=0.0)


@pytest.mark.parametrize("access", [TopK(8), SampledLogprobs()])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_method_refuses_full_divergence_without_full_logits(access, name):
    with pytest.raises(ConfigError) as err:
        Method(prefixes=student(), teacher=access, signal=Divergence(name))
    msg = str(err.value)
    assert name in msg and access.describe() in msg and "'full_logits'" in msg


def test_method_accepts_what_each_access_serves():
    Method(prefixes=student(), teacher=TopK(8), signal=TopKDivergence("reverse_kl", k=8))
    Method(prefixes=student(), teacher=FullLogits(), signal=TopKDivergence("forward_kl", k=8))
    for access in (TopK(8), SampledLogprobs(), FullLogits()):
        Method(prefixes=student(), teacher=access, signal=SampledRKL())
    with pytest.raises(ConfigError, match="'topk_logprobs'.*sampled-token"):
        Method(prefixes=student(), teacher=SampledLogprobs(), signal=TopKDivergence(k=8))
    with pytest.raises(ConfigError, match="'full_logits'.*top-8"):
        Method(prefixes=student(), teacher=TopK(8), signal=MiniLLMPolicyGradient())


def _rows(n=7, d=5, v=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    w_s = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    h_t = torch.randn(n, d + 2, generator=g, dtype=dtype)
    w_t = torch.randn(v, d + 2, generator=g, dtype=dtype)
    rows = StudentRows(h_s, w_s, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))
    return rows, TeacherScores(hidden_ND=h_t, head_VD=w_t)


def test_bucket_logprobs_chunked_matches_plain_values_and_grads():
    rows, _ = _rows()
    ids_NK = torch.stack(
        [torch.randperm(11, generator=torch.Generator().manual_seed(i))[:4] for i in range(7)]
    )
    weights = torch.randn(7, 5, dtype=torch.float64)
    outs, grads = [], []
    for chunked in (True, False):
        rows.hidden_ND.grad = rows.head_VD.grad = None
        if chunked:
            out = chunked_bucket_logprobs(rows.hidden_ND, rows.head_VD, ids_NK, 0.7, chunk_size=3)
        else:
            out = bucket_logprobs(rows.hidden_ND @ rows.head_VD.T, ids_NK, 0.7)
        (out * weights).sum().backward()
        outs.append(out.detach())
        grads.append((rows.hidden_ND.grad.clone(), rows.head_VD.grad.clone()))
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0].exp().sum(-1), torch.ones(7, dtype=torch.float64))
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "generalized_jsd", "total_variation"])
def test_topk_divergence_with_k_equal_v_is_the_full_divergence(name):
    rows, teacher = _rows()
    full = divergence(name, rows.hidden_ND @ rows.head_VD.T, teacher.hidden_ND @ teacher.head_VD.T)
    topk = TopKDivergence(name, k=11)(rows, teacher, StepContext(chunk_size=3))
    torch.testing.assert_close(topk, full)
    # and the gradient is the full divergence's gradient
    g_topk = torch.autograd.grad(topk.sum(), rows.head_VD)[0]
    g_full = torch.autograd.grad(full.sum(), rows.head_VD)[0]
    torch.testing.assert_close(g_topk, g_full)


def test_topk_divergence_paths_agree_and_bound_the_full_kl():
    rows, teacher = _rows()
    ids_NK, lp_NK = teacher_topk_buckets(teacher.hidden_ND, teacher.head_VD, 4)
    topk_scores = TeacherScores(topk_ids_NK=ids_NK, topk_logprobs_NK=lp_NK)
    sig = TopKDivergence("forward_kl", k=4)
    chunked = sig(rows, topk_scores, StepContext(chunk_size=2))
    plain = sig(rows, topk_scores, StepContext(materialize=True))
    from_full = sig(rows, teacher, StepContext(chunk_size=5))
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(chunked, from_full)
    g_c = torch.autograd.grad(chunked.sum(), [rows.hidden_ND, rows.head_VD])
    g_p = torch.autograd.grad(plain.sum(), [rows.hidden_ND, rows.head_VD])
    for a, b in zip(g_c, g_p):
        torch.testing.assert_close(a, b)
    full = divergence(
        "forward_kl", rows.hidden_ND @ rows.head_VD.T, teacher.hidden_ND @ teacher.head_VD.T
    )
    assert (chunked <= full + 1e-12).all() and (
        chunked >= 0
    ).all()  # KL chain rule: coarser ≤ finer
    with pytest.raises(ConfigError, match="same k"):
        TopKDivergence("forward_kl", k=3)(rows, topk_scores, StepContext())


def test_topk_divergence_runs_on_a_tiny_teacher(models, rollout):
    scores = TopK(6).score(models.teacher, rollout, models.vocab_size)
    s_logprobs_NV = reference_logprobs(models.student, rollout, models.vocab_size)
    n = rollout.num_tokens
    rows = StudentRows(
        s_logprobs_NV,
        torch.eye(models.vocab_size),
        torch.zeros(n, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
    )
    values = TopKDivergence("reverse_kl")(rows, scores, StepContext(chunk_size=4))
    assert values.shape == (n,) and torch.isfinite(values).all() and (values >= -1e-6).all()
