"""The chunked path (opd.losses.chunked) against its materialized reference twins."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opd.losses import (
    DIVERGENCES,
    chunked_divergence,
    chunked_token_logprobs,
    chunked_topk,
    divergence,
    token_logprobs,
)

# Parameters for registry entries whose defaults do not suit V = 11.
PARAMS = {"topk_reverse_kl": {"k": 4}, "generalized_jsd": {"beta": 0.3}}
N, D_S, D_T, V = 37, 6, 5, 11


def _inputs(dtype, n=N, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    student = dict(student_hidden=randn(n, D_S), student_head=randn(V, D_S))
    teacher = dict(teacher_hidden=randn(n, D_T), teacher_head=randn(V, D_T))
    if bias:
        student["student_bias"] = randn(V)
        teacher["teacher_bias"] = randn(V)
    return student, teacher


def _materialized(name, student, teacher, temperature, **params):
    logits_s = student["student_hidden"] @ student["student_head"].T
    logits_t = teacher["teacher_hidden"] @ teacher["teacher_head"].T
    if "student_bias" in student:
        logits_s = logits_s + student["student_bias"]
        logits_t = logits_t + teacher["teacher_bias"]
    return divergence(name, logits_s, logits_t, temperature, **params)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("chunk_size", [8, 64])  # 8 does not divide 37; 64 >= N
def test_values_match_materialized(name, chunk_size):
    params = PARAMS.get(name, {})
    for dtype, atol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        student, teacher = _inputs(dtype)
        got = chunked_divergence(
            name, **student, **teacher, temperature=1.3, chunk_size=chunk_size, **params
        )
        want = _materialized(name, student, teacher, 1.3, **params)
        assert got.shape == (N,) and got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("bias", [False, True])
def test_gradients_match_materialized(name, bias):
    params = PARAMS.get(name, {})
    student, teacher = _inputs(torch.float64, seed=1, bias=bias)
    for tensor in student.values():
        tensor.requires_grad_()
    grad_out = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = chunked_divergence(name, **student, **teacher, temperature=0.7, chunk_size=8, **params)
    got_grads = torch.autograd.grad(got, list(student.values()), grad_out)
    want = _materialized(name, student, teacher, 0.7, **params)
    want_grads = torch.autograd.grad(want, list(student.values()), grad_out)
    for g, w in zip(got_grads, want_grads):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8)


# These detach part of their own formula (weights or targets), so their autograd gradient is
# by design not the numerical derivative of their value; gradcheck does not apply. Their
# chunked gradients are pinned against the materialized reference above, and
# tests/test_adaptive.py checks them against a frozen-weight twin.
STOP_GRADIENT = {"akl", "todi", "bridge", "taid"}


@pytest.mark.parametrize("name", sorted(set(DIVERGENCES) - STOP_GRADIENT))
def test_gradcheck_custom_function(name):
    params = PARAMS.get(name, {})
    student, teacher = _inputs(torch.float64, n=5, seed=3, bias=True)
    hidden, head, bias = (t.requires_grad_() for t in student.values())

    def f(h, w, b):
        return chunked_divergence(name, h, w, **teacher, chunk_size=2, student_bias=b, **params)

    assert torch.autograd.gradcheck(f, (hidden, head, bias), fast_mode=True)


def test_teacher_is_constant():
    student, teacher = _inputs(torch.float64)
    teacher["teacher_hidden"].requires_grad_()
    student["student_hidden"].requires_grad_()
    chunked_divergence("forward_kl", **student, **teacher, chunk_size=8).sum().backward()
    assert teacher["teacher_hidden"].grad is None
    assert student["student_hidden"].grad is not None


def test_empty_batch():
    student, teacher = _inputs(torch.float32, n=0)
    for tensor in student.values():
        tensor.requires_grad_()
    values = chunked_divergence("reverse_kl", **student, **teacher)
    assert values.shape == (0,)
    values.sum().backward()
    assert student["student_hidden"].grad.shape == (0, D_S)
    assert torch.equal(student["student_head"].grad, torch.zeros(V, D_S))


def test_bf16_inputs():
    student, teacher = _inputs(torch.float32, seed=4)
    student16 = {k: v.bfloat16() for k, v in student.items()}
    teacher16 = {k: v.bfloat16() for k, v in teacher.items()}
    student16["student_head"].requires_grad_()
    got = chunked_divergence("generalized_jsd", **student16, **teacher16, chunk_size=8)
    assert got.dtype == torch.float32
    want = _materialized("generalized_jsd", student16, teacher16, 1.0)
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=0)
    got.sum().backward()
    assert student16["student_head"].grad.dtype == torch.bfloat16


def test_errors():
    student, teacher = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"V = 11.*V = 12"):
        chunked_divergence(
            "forward_kl",
            **student,
            teacher_hidden=teacher["teacher_hidden"],
            teacher_head=torch.randn(12, D_T),
        )
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_divergence("forward_kl", **student, **teacher, chunk_size=0)
    with pytest.raises(ValueError, match="reverse_kl"):
        chunked_divergence("kl", **student, **teacher)
    with pytest.raises(TypeError, match="beta"):
        chunked_divergence("forward_kl", **student, **teacher, beta=0.5)
    with pytest.raises(ValueError, match="rows"):
        chunked_divergence(
            "forward_kl",
            **student,
            teacher_hidden=teacher["teacher_hidden"][:5],
            teacher_head=teacher["teacher_head"],
        )
    with pytest.raises(ValueError, match="student_head"):
        chunked_divergence(
            "forward_kl",
            student_hidden=student["student_hidden"],
            student_head=torch.randn(V, D_S + 1),
            **teacher,
        )
    with pytest.raises(ValueError, match="student_bias"):
        chunked_divergence("forward_kl", **student, **teacher, student_bias=torch.randn(V + 1))


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in elements) produced by any op while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ["forward_kl", "generalized_jsd", "akl", "topk_reverse_kl"])
def test_no_tensor_of_n_by_v_is_built(name):
    n, vocab, d, chunk = 96, 64, 4, 16  # N·V = 6,144 > 2·chunk·V = 2,048 > V·D = 256
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    head = torch.randn(vocab, d, generator=gen, requires_grad=True)
    teacher_hidden, teacher_head = (
        torch.randn(n, d, generator=gen),
        torch.randn(vocab, d, generator=gen),
    )
    params = PARAMS.get(name, {})
    with _LargestAllocation() as mode:
        values = chunked_divergence(
            name, hidden, head, teacher_hidden, teacher_head, chunk_size=chunk, **params
        )
        values.sum().backward()
    assert mode.largest <= 2 * chunk * vocab  # sort indices etc. stay within a chunk
    with _LargestAllocation() as mode:
        divergence(
            name, hidden @ head.T, teacher_hidden @ teacher_head.T, **params
        ).sum().backward()
    assert mode.largest >= n * vocab  # the reference does build them: the probe works


# --- chunked_token_logprobs -----------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_token_logprobs_match_reference(chunk_size):
    student, _ = _inputs(torch.float64, seed=6, bias=True)
    hidden, head, bias = (t.requires_grad_() for t in student.values())
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(7))
    got = chunked_token_logprobs(
        hidden, head, targets, temperature=1.5, chunk_size=chunk_size, bias=bias
    )
    want = token_logprobs(hidden @ head.T + bias, targets, temperature=1.5)
    want_direct = torch.log_softmax((hidden @ head.T + bias) / 1.5, -1)[torch.arange(N), targets]
    torch.testing.assert_close(want, want_direct, atol=1e-12, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    grad_out = torch.randn(N, dtype=torch.float64)
    for g, w in zip(
        torch.autograd.grad(got, (hidden, head, bias), grad_out),
        torch.autograd.grad(want, (hidden, head, bias), grad_out),
    ):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8)
    assert chunked_token_logprobs(hidden.float(), head.float(), targets).dtype == torch.float32


def test_token_logprobs_gradcheck_and_errors():
    student, _ = _inputs(torch.float64, n=5, seed=8)
    hidden, head = (t.requires_grad_() for t in student.values())
    targets = torch.tensor([0, 3, 10, 3, 7])
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_token_logprobs(h, w, targets, chunk_size=2), (hidden, head)
    )
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        chunked_token_logprobs(hidden, head, torch.tensor([0, 1, 2, 3, 11]))
    with pytest.raises(ValueError, match="target_ids"):
        chunked_token_logprobs(hidden, head, targets[:4])
    assert chunked_token_logprobs(hidden[:0], head, targets[:0]).shape == (0,)


# --- chunked_topk ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [8, 64])
def test_topk_matches_reference(chunk_size):
    student, _ = _inputs(torch.float32, seed=9)
    hidden, head = student.values()
    got_lp, got_ids = chunked_topk(hidden, head, k=4, temperature=2.0, chunk_size=chunk_size)
    want_lp, want_ids = torch.log_softmax(hidden @ head.T / 2.0, -1).topk(4, dim=-1)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_lp, want_lp, atol=1e-5, rtol=0)
    assert got_lp.shape == (N, 4) and got_ids.dtype == torch.long


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_with_targets_equals_its_twin_chunked_token_logprobs(dtype):
    """The fused pass (top-k + the targets' log-probs) against the separate functions."""
    student, _ = _inputs(dtype, seed=4)
    hidden, head = student.values()
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    lp, ids, target_lp = chunked_topk(hidden, head, 5, 1.5, 16, target_ids=targets)
    want_lp, want_ids = chunked_topk(hidden, head, 5, 1.5, 16)
    assert torch.equal(ids, want_ids) and torch.equal(lp, want_lp)
    twin = chunked_token_logprobs(hidden, head, targets, 1.5, 16)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(target_lp, twin.detach(), atol=tol, rtol=0)
    assert target_lp.shape == (N,) and target_lp.dtype == twin.dtype


def test_topk_errors_and_empty():
    student, _ = _inputs(torch.float32)
    hidden, head = student.values()
    with pytest.raises(ValueError, match="k must"):
        chunked_topk(hidden, head, k=V + 1)
    with pytest.raises(ValueError, match="k must"):
        chunked_topk(hidden, head, k=0)
    lp, ids = chunked_topk(hidden[:0], head, k=3)
    assert lp.shape == (0, 3) and ids.shape == (0, 3)


def test_a_divergence_registered_later_works_chunked():
    from opd.losses import register_divergence

    def squared_distance(student_logits, teacher_logits, temperature=1.0, *, scale=1.0):
        """scale · Σ_v (p_v − q_v)²: a toy divergence the chunked path has never seen."""
        q = torch.softmax(student_logits / temperature, -1)
        p = torch.softmax(teacher_logits / temperature, -1)
        return scale * ((p - q) ** 2).sum(-1)

    register_divergence("_test_squared")(squared_distance)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_divergence("_test_squared")(squared_distance)
        student, teacher = _inputs(torch.float64, seed=10)
        hidden, head = (t.requires_grad_() for t in student.values())
        got = chunked_divergence("_test_squared", hidden, head, **teacher, chunk_size=8, scale=3.0)
        want = _materialized("_test_squared", student, teacher, 1.0, scale=3.0)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        for g, w in zip(
            torch.autograd.grad(got.sum(), (hidden, head)),
            torch.autograd.grad(want.sum(), (hidden, head)),
        ):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
    finally:
        DIVERGENCES.pop("_test_squared")


# ---------------------------------------------------------------- one-pass weighted loss


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("chunk_size", [8, 64])
def test_weighted_loss_matches_two_pass_reference(name, chunk_size):
    """Σ c_n D_n with the gradient taken in the forward equals the chunked path's weighted sum."""
    from opd.losses import chunked_weighted_divergence

    params = PARAMS.get(name, {})
    student, teacher = _inputs(torch.float64, seed=5)
    coef = torch.rand(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h, w = (t.requires_grad_() for t in student.values())
    ref = (chunked_divergence(name, h, w, **teacher, chunk_size=chunk_size, **params) * coef).sum()
    ref_grads = torch.autograd.grad(ref, (h, w))
    loss, values = chunked_weighted_divergence(name, h, w, teacher["teacher_hidden"],
                                               teacher["teacher_head"], coef,
                                               chunk_size=chunk_size, **params)
    grads = torch.autograd.grad(3.0 * loss, (h, w))  # the upstream gradient is applied
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-10)
    assert not values.requires_grad and values.shape == (N,)
    torch.testing.assert_close(
        values, chunked_divergence(name, h, w, **teacher, chunk_size=chunk_size, **params).detach()
    )
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, 3.0 * want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", ["reverse_kl", "generalized_jsd", "skew_forward_kl"])  # no stop-grads
def test_weighted_loss_gradcheck_and_errors(name):
    from opd.losses import chunked_weighted_divergence

    student, teacher = _inputs(torch.float64, n=5, seed=3)
    coef = torch.tensor([0.1, 0.0, 1.0, 0.5, 2.0], dtype=torch.float64)
    h, w = (t.requires_grad_() for t in student.values())
    t_h, t_w = teacher["teacher_hidden"], teacher["teacher_head"]

    def f(hh, ww):
        return chunked_weighted_divergence(name, hh, ww, t_h, t_w, coef, chunk_size=2,
                                           **PARAMS.get(name, {}))[0]

    assert torch.autograd.gradcheck(f, (h, w), fast_mode=True)
    with pytest.raises(ValueError, match=r"coef_N must be \(N,\) = \(5,\), got \(4,\)"):
        chunked_weighted_divergence(name, h, w, t_h, t_w, coef[:4])
    empty, _ = _inputs(torch.float32, n=0)
    loss, values = chunked_weighted_divergence(
        "reverse_kl", empty["student_hidden"], empty["student_head"].requires_grad_(),
        torch.zeros(0, D_T), torch.randn(V, D_T), torch.zeros(0))
    assert float(loss) == 0.0 and values.shape == (0,)
