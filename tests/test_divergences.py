"""Math tests for opd.losses.divergences (and the reductions in opd.losses.reduce)."""

from __future__ import annotations

import math

import pytest
import torch

from opd.losses import (
    DIVERGENCES,
    divergence,
    divergence_params,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    sequence_mean,
    skew_forward_kl,
    skew_reverse_kl,
    token_mean,
    total_variation,
)

BASE = [
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "total_variation",
    "skew_forward_kl",
    "skew_reverse_kl",
]


def _logits(*shape, scale=3.0, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=gen, dtype=dtype)


def test_registry_holds_the_base_divergences():
    assert set(BASE) <= set(DIVERGENCES)
    assert divergence_params("generalized_jsd") == ("beta",)
    assert divergence_params("forward_kl") == ()


@pytest.mark.parametrize("name", BASE)
def test_nonnegative_and_per_token_shape(name):
    s, t = _logits(4, 5, 13, seed=1), _logits(4, 5, 13, seed=2)
    values = divergence(name, s, t)
    assert values.shape == (4, 5)
    assert values.dtype == torch.float64
    assert (values >= -1e-12).all()
    assert (values > 1e-6).all()  # p != q here, so strictly positive


@pytest.mark.parametrize("name", BASE)
def test_zero_at_equality(name):
    s = _logits(6, 17, seed=3, dtype=torch.float32)
    assert divergence(name, s, s.clone()).abs().max() <= 1e-6


@pytest.mark.parametrize("name", BASE)
def test_temperature_applies_to_both_sides(name):
    s, t = _logits(3, 9, seed=4), _logits(3, 9, seed=5)
    expected = divergence(name, s / 2.5, t / 2.5)
    torch.testing.assert_close(divergence(name, s, t, temperature=2.5), expected)
    # Scaling only the student would be a different number.
    assert not torch.allclose(divergence(name, s / 2.5, t), expected)


@pytest.mark.parametrize("name", BASE)
def test_gradcheck_float64(name):
    s = _logits(3, 7, seed=6).requires_grad_()
    t = _logits(3, 7, seed=7)
    assert torch.autograd.gradcheck(lambda x: divergence(name, x, t, temperature=1.7), (s,))


@pytest.mark.parametrize("name", BASE)
def test_bf16_input_is_upcast(name):
    s, t = _logits(4, 11, seed=8, dtype=torch.float32), _logits(4, 11, seed=9, dtype=torch.float32)
    s16, t16 = s.bfloat16().requires_grad_(), t.bfloat16()
    values = divergence(name, s16, t16)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, divergence(name, s16.float(), t16.float()))
    values.sum().backward()
    assert s16.grad is not None and torch.isfinite(s16.grad.float()).all()


@pytest.mark.parametrize("name", BASE)
def test_underflowing_probabilities_give_no_nan(name):
    # exp(-1000) underflows to 0 in float32: a naive p·log p would be 0·(−inf) = NaN.
    s = torch.tensor([[0.0, -1000.0, -2000.0], [5.0, 0.0, -3000.0]], requires_grad=True)
    t = torch.tensor([[-2000.0, 0.0, -1000.0], [0.0, 5.0, -3000.0]])
    values = divergence(name, s, t)
    assert torch.isfinite(values).all()
    values.sum().backward()
    assert torch.isfinite(s.grad).all()


# Hand-computed example: p_teacher = [0.9, 0.1], q_student = [0.5, 0.5]. Every number below
# is written out so that swapping the teacher and the student fails.
P = torch.tensor([0.9, 0.1], dtype=torch.float64)
Q = torch.tensor([0.5, 0.5], dtype=torch.float64)
HAND = {
    # KL(p‖q) = 0.9·ln(0.9/0.5) + 0.1·ln(0.1/0.5) = 0.528998 − 0.160944
    "forward_kl": (0.9 * math.log(1.8) + 0.1 * math.log(0.2), 0.368064),
    # KL(q‖p) = 0.5·ln(0.5/0.9) + 0.5·ln(0.5/0.1) = −0.293893 + 0.804719
    "reverse_kl": (0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5.0), 0.510826),
    # ½·(|0.9 − 0.5| + |0.1 − 0.5|)
    "total_variation": (0.4, 0.4),
    # m = [0.7, 0.3]: ½·KL(p‖m) + ½·KL(q‖m) = ½·0.116322 + ½·0.087177
    "generalized_jsd": (
        0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3))
        + 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)),
        0.101749,
    ),
    # α = 0.1: m = 0.1·p + 0.9·q = [0.54, 0.46]; KL(p‖m)
    "skew_forward_kl": (0.9 * math.log(0.9 / 0.54) + 0.1 * math.log(0.1 / 0.46), 0.307137),
    # α = 0.1: m = 0.9·p + 0.1·q = [0.86, 0.14]; KL(q‖m)
    "skew_reverse_kl": (0.5 * math.log(0.5 / 0.86) + 0.5 * math.log(0.5 / 0.14), 0.365321),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_computed_two_entry_example(name):
    formula, written = HAND[name]
    assert formula == pytest.approx(written, abs=1e-6)
    value = divergence(name, Q.log(), P.log())  # (student_logits, teacher_logits)
    assert value.item() == pytest.approx(formula, abs=1e-12)


def test_kl_directions_differ_on_the_hand_example():
    assert forward_kl(Q.log(), P.log()).item() == pytest.approx(HAND["forward_kl"][0])
    assert reverse_kl(Q.log(), P.log()).item() == pytest.approx(HAND["reverse_kl"][0])
    # Swapped arguments exchange the two directions.
    assert forward_kl(P.log(), Q.log()).item() == pytest.approx(HAND["reverse_kl"][0])


def test_generalized_jsd_ends_are_the_plain_kls_exactly():
    s, t = _logits(5, 9, seed=10), _logits(5, 9, seed=11)
    assert torch.equal(generalized_jsd(s, t, beta=0.0), forward_kl(s, t))
    assert torch.equal(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t))


def test_generalized_jsd_near_the_ends_tends_to_zero_not_to_the_kl():
    # The mixture form at β → 0 is β·KL(p‖q) + O(β²) and at β → 1 is (1−β)·KL(q‖p) + O((1−β)²):
    # it vanishes, so the exact ends (special-cased to the plain KLs) are a discontinuity.
    # The O(β²) coefficient grows like Σ p²/q, so keep the logits mild and β small.
    s, t = _logits(5, 9, scale=1.0, seed=12), _logits(5, 9, scale=1.0, seed=13)
    eps = 1e-6
    near_zero = generalized_jsd(s, t, beta=eps)
    near_one = generalized_jsd(s, t, beta=1 - eps)
    torch.testing.assert_close(near_zero / eps, forward_kl(s, t), rtol=1e-3, atol=0)
    torch.testing.assert_close(near_one / eps, reverse_kl(s, t), rtol=1e-3, atol=0)
    assert (near_zero < 1e-3 * forward_kl(s, t)).all()


def test_jsd_is_at_most_log2_and_tvd_at_most_1():
    s, t = _logits(8, 20, scale=30.0, seed=14), _logits(8, 20, scale=30.0, seed=15)
    jsd = generalized_jsd(s, t, beta=0.5)
    assert (jsd <= math.log(2) + 1e-9).all()
    tvd = total_variation(s, t)
    assert ((tvd >= 0) & (tvd <= 1 + 1e-12)).all()
    # Disjoint one-hot distributions reach both bounds.
    big = torch.tensor([[200.0, 0.0]], dtype=torch.float64)
    other = torch.tensor([[0.0, 200.0]], dtype=torch.float64)
    assert generalized_jsd(big, other).item() == pytest.approx(math.log(2), abs=1e-9)
    assert total_variation(big, other).item() == pytest.approx(1.0, abs=1e-9)


def test_skew_kls_at_the_ends():
    s, t = _logits(4, 10, seed=16), _logits(4, 10, seed=17)
    assert torch.equal(skew_forward_kl(s, t, alpha=0.0), forward_kl(s, t))
    assert torch.equal(skew_reverse_kl(s, t, alpha=0.0), reverse_kl(s, t))
    assert torch.equal(skew_forward_kl(s, t, alpha=1.0), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(skew_reverse_kl(s, t, alpha=1.0), torch.zeros(4, dtype=torch.float64))
    # Skewing shrinks the divergence.
    assert (skew_forward_kl(s, t, alpha=0.3) < forward_kl(s, t)).all()


def test_params_pass_through_divergence():
    s, t = _logits(3, 6, seed=18), _logits(3, 6, seed=19)
    assert torch.equal(
        divergence("generalized_jsd", s, t, beta=0.2), generalized_jsd(s, t, beta=0.2)
    )
    assert torch.equal(
        divergence("skew_reverse_kl", s, t, 2.0, alpha=0.3), skew_reverse_kl(s, t, 2.0, alpha=0.3)
    )


def test_errors_name_what_is_wrong():
    s, t = _logits(2, 5), _logits(2, 5)
    with pytest.raises(ValueError, match="forward_kl"):  # lists the valid names
        divergence("kl_forward", s, t)
    with pytest.raises(TypeError, match="gamma"):
        divergence("generalized_jsd", s, t, gamma=0.5)
    with pytest.raises(TypeError, match="alpha"):
        divergence("forward_kl", s, t, alpha=0.1)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 6\)"):
        forward_kl(s, _logits(2, 6))
    with pytest.raises(ValueError, match=r"beta.*\[0, 1\]"):
        generalized_jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match=r"alpha.*\[0, 1\]"):
        skew_forward_kl(s, t, alpha=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        reverse_kl(s, t, temperature=0.0)


# --- opd.losses.reduce ---------------------------------------------------------------------


def test_token_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert token_mean(values, mask).item() == pytest.approx((1 + 2 + 4) / 3)
    assert token_mean(values, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="shape"):
        token_mean(values, mask[:, :2])


def test_sequence_mean_weighs_sequences_equally_and_skips_empty_ones():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # ((1 + 2)/2 + 4/1) / 2 sequences with tokens
    assert sequence_mean(values, mask).item() == pytest.approx((1.5 + 4.0) / 2)
    assert sequence_mean(values, torch.zeros_like(mask)).item() == 0.0
    values.requires_grad_()
    sequence_mean(values, mask).backward()
    expected = torch.tensor([[0.25, 0.25, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(values.grad, expected)


def test_skew_reverse_kl_stop_grad_mixture_matches_the_hand_gradient():
    # DistiLLM-2: m = (1−α)p + α·sg(q). L = Σ_v q_v (log q_v − log m_v); treating m as a
    # constant, ∂L/∂q_v = d_v + 1 with d = log q − log m, and through the softmax (q = softmax(z/τ))
    # ∂L/∂z_j = q_j (d_j − Σ_v q_v d_v) / τ (the +1 cancels).
    alpha, tau = 0.1, 1.7
    g = torch.Generator().manual_seed(3)
    z = (2 * torch.randn(5, 11, generator=g, dtype=torch.float64)).requires_grad_()
    t = 2 * torch.randn(5, 11, generator=g, dtype=torch.float64)
    value = divergence("skew_reverse_kl", z, t, tau, alpha=alpha, stop_grad_mix=True)
    (got,) = torch.autograd.grad(value.sum(), z)
    with torch.no_grad():
        q, p = torch.softmax(z / tau, -1), torch.softmax(t / tau, -1)
        m = (1 - alpha) * p + alpha * q
        d = q.log() - m.log()
        want = q * (d - (q * d).sum(-1, keepdim=True)) / tau
        torch.testing.assert_close(value, (q * d).sum(-1), atol=1e-13, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-13, rtol=1e-11)
    # Same value as the plain SRKL, a different gradient (the student share is not detached).
    plain = divergence("skew_reverse_kl", z, t, tau, alpha=alpha)
    torch.testing.assert_close(plain, value, atol=1e-13, rtol=0)
    (plain_grad,) = torch.autograd.grad(plain.sum(), z)
    assert (plain_grad - got).norm() / got.norm() > 0.01
    # The chunked path (custom autograd over row chunks) agrees.
    from opd.losses import chunked_divergence

    h = torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(11, 3, generator=g, dtype=torch.float64)
    ht, wt = (
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randn(11, 3, generator=g, dtype=torch.float64),
    )
    kw = dict(temperature=tau, alpha=alpha, stop_grad_mix=True)
    ref = divergence("skew_reverse_kl", h @ w.T, ht @ wt.T, **kw)
    (ref_grad,) = torch.autograd.grad(ref.sum(), h)
    chunked = chunked_divergence("skew_reverse_kl", h, w, ht, wt, chunk_size=2, **kw)
    (chunk_grad,) = torch.autograd.grad(chunked.sum(), h)
    torch.testing.assert_close(chunked, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(chunk_grad, ref_grad, atol=1e-12, rtol=1e-10)
