"""Math tests for opd.losses.adaptive: shared identities and each method's defining property."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from opd.losses import (
    DIVERGENCES,
    akl,
    akl_head_mask,
    akl_weights,
    bridge,
    chunked_divergence,
    divergence,
    entropy_aware,
    entropy_gate,
    forward_kl,
    reverse_kl,
    taid,
    todi,
    todi_weights,
    topk_reverse_kl,
)

# name -> non-default parameters, so the tests exercise them
ADAPTIVE = {
    "akl": {"mu": 0.3},
    "todi": {"beta": 2.0},
    "entropy_aware": {"h_max": 1.5},
    "bridge": {"gamma": 0.4},
    "taid": {"lam": 0.6},
    "topk_reverse_kl": {"k": 5},
}
ADAPTIVE_CASES = [*ADAPTIVE.items(), ("taid", {"lam": 0.6, "space": "prob"})]


def _logits(*shape, scale=2.0, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=gen, dtype=dtype)


def _kl(log_a, log_b):
    """Independent twin: Σ a (log a − log b)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def test_all_registered():
    assert set(ADAPTIVE) <= set(DIVERGENCES)


@pytest.mark.parametrize(("name", "params"), ADAPTIVE_CASES)
def test_nonnegative_and_zero_at_equality(name, params):
    s, t = _logits(4, 6, 13, seed=1), _logits(4, 6, 13, seed=2)
    values = divergence(name, s, t, **params)
    assert values.shape == (4, 6) and (values >= -1e-12).all()
    same = _logits(5, 17, seed=3, dtype=torch.float32)
    assert divergence(name, same, same.clone(), **params).abs().max() <= 1e-6


@pytest.mark.parametrize(("name", "params"), ADAPTIVE_CASES)
def test_chunked_matches_reference(name, params):
    gen = torch.Generator().manual_seed(4)
    h_s = torch.randn(29, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(13, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(29, 7, generator=gen, dtype=torch.float64)
    w_t = torch.randn(13, 7, generator=gen, dtype=torch.float64)
    got = chunked_divergence(name, h_s, w_s, h_t, w_t, temperature=1.2, chunk_size=6, **params)
    want = divergence(name, h_s @ w_s.T, h_t @ w_t.T, temperature=1.2, **params)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    for g, w in zip(
        torch.autograd.grad(got.sum(), (h_s, w_s)), torch.autograd.grad(want.sum(), (h_s, w_s))
    ):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("name", ["entropy_aware", "topk_reverse_kl"])
def test_gradcheck_where_nothing_is_detached(name):
    # entropy_aware's gate and topk's support depend on the teacher only: the true gradient.
    s, t = _logits(3, 9, seed=5).requires_grad_(), _logits(3, 9, seed=6)
    assert torch.autograd.gradcheck(lambda x: divergence(name, x, t, 1.3, **ADAPTIVE[name]), (s,))


def _frozen_twin(name, s0, t, temperature, params):
    """The loss with its detached parts computed once at s0: a function of the student only."""
    log_p = F.log_softmax(t / temperature, -1)

    def log_q(x):
        return F.log_softmax(x / temperature, -1)

    if name == "akl":
        w_head, w_tail = akl_weights(s0, t, temperature, **params)
        return lambda x: w_head * _kl(log_p, log_q(x)) + w_tail * _kl(log_q(x), log_p)
    if name == "todi":
        a = todi_weights(s0, t, temperature, **params)
        return lambda x: (
            a * log_p.exp() * (log_p - log_q(x)) + (1 - a) * log_q(x).exp() * (log_q(x) - log_p)
        ).sum(-1)
    if name == "bridge":
        g = params["gamma"]
        log_r = F.log_softmax(((1 - g) * s0 + g * t) / temperature, -1)
        return lambda x: _kl(log_r, log_q(x))
    if name == "taid":
        lam = params["lam"]
        log_r = torch.log((1 - lam) * log_q(s0).exp() + lam * log_p.exp())
        return lambda x: _kl(log_r, log_q(x))
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("akl", {"mu": 0.5}),
        ("todi", {"beta": 1.0}),
        ("bridge", {"gamma": 0.4}),
        ("taid", {"lam": 0.3, "space": "prob"}),
    ],
)
def test_detached_losses_have_the_gradient_of_their_frozen_twin(name, params):
    s0, t = _logits(3, 9, seed=7), _logits(3, 9, seed=8)
    twin = _frozen_twin(name, s0, t, 1.3, {k: v for k, v in params.items() if k != "space"})
    s = s0.clone().requires_grad_()
    assert torch.autograd.gradcheck(twin, (s,))  # the twin's gradient is a true gradient
    torch.testing.assert_close(twin(s), divergence(name, s, t, 1.3, **params), atol=1e-12, rtol=0)
    (got,) = torch.autograd.grad(divergence(name, s, t, 1.3, **params).sum(), s)
    (want,) = torch.autograd.grad(twin(s).sum(), s)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


# --- AKL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mu", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_akl_inclusive_head_is_the_smallest_prefix_holding_mu(mu):
    t = _logits(8, 20, seed=9)
    p = F.softmax(t, -1)
    head = akl_head_mask(t, mu=mu, boundary="inclusive")
    head_mass = torch.where(head, p, 0.0).sum(-1)
    smallest_in_head = torch.where(head, p, math.inf).min(-1).values
    assert (head_mass >= mu - 1e-12).all()
    # Dropping the head's smallest entry would fall below μ: the prefix is the smallest.
    nonempty = head.any(-1)
    assert (head_mass[nonempty] - smallest_in_head[nonempty] < mu).all()
    # The head is a prefix of p sorted descending: every head entry beats every tail entry.
    largest_in_tail = torch.where(head, -math.inf, p).max(-1).values
    assert (smallest_in_head[nonempty] >= largest_in_tail[nonempty]).all()


@pytest.mark.parametrize("mu", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_akl_authors_head_is_the_largest_prefix_within_mu_and_never_empty(mu):
    t = _logits(8, 20, seed=9)
    p = F.softmax(t, -1)
    head = akl_head_mask(t, mu=mu)  # boundary="authors" is the default
    top1 = F.one_hot(p.argmax(-1), 20).bool()
    assert (head & top1).any(-1).all()  # the top-1 entry is always head
    head_mass = torch.where(head, p, 0.0).sum(-1)
    several = head.sum(-1) > 1
    assert (head_mass[several] <= mu + 1e-12).all()  # beyond top-1, the head stays within μ
    largest_in_tail = torch.where(head, -math.inf, p).max(-1).values
    smallest_in_head = torch.where(head, p, math.inf).min(-1).values
    assert (smallest_in_head >= largest_in_tail).all()  # a prefix of p sorted descending
    # Adding the largest tail entry would take the head above μ: the prefix is the largest.
    has_tail = ~head.all(-1)
    assert (head_mass[has_tail] + largest_in_tail[has_tail] > mu).all()
    if mu == 1.0:  # every entry fits within μ = 1, whatever the cumsum's rounding
        assert head.all()


def test_akl_boundary_rules_on_the_issue_example():
    # p = [.4, .3, .2, .1], q = [.1, .6, .2, .1], μ = .5 (AKL's default). Cumulative teacher
    # mass .4, .7, ...: the second entry crosses μ. Gaps |p − q| = .3, .3, 0, 0.
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.1, 0.6, 0.2, 0.1], dtype=torch.float64)
    fkl, rkl = forward_kl(q.log(), p.log()).item(), reverse_kl(q.log(), p.log()).item()
    # The authors' rule: the crossing entry is tail -> head {0}, w_head = .3/.6 = ½.
    assert akl_head_mask(p.log()).tolist() == [True, False, False, False]
    w_head, w_tail = akl_weights(q.log(), p.log())
    assert (w_head.item(), w_tail.item()) == pytest.approx((0.5, 0.5), abs=1e-12)
    assert akl(q.log(), p.log()).item() == pytest.approx(0.5 * fkl + 0.5 * rkl, abs=1e-12)
    assert akl(q.log(), p.log()).item() == pytest.approx(0.3119, abs=5e-5)
    # The inclusive rule (opd's earlier default): head {0, 1}, w_head = 1, AKL = KL(p‖q).
    assert akl_head_mask(p.log(), boundary="inclusive").tolist() == [True, True, False, False]
    w_head, _ = akl_weights(q.log(), p.log(), boundary="inclusive")
    assert w_head.item() == pytest.approx(1.0, abs=1e-12)
    assert akl(q.log(), p.log(), boundary="inclusive").item() == pytest.approx(fkl, abs=1e-12)
    assert fkl == pytest.approx(0.3466, abs=5e-5)
    # Through the registry and the chunked path too.
    assert divergence("akl", q.log(), p.log(), mu=0.5).item() == pytest.approx(0.3119, abs=5e-5)
    with pytest.raises(ValueError, match="boundary"):
        akl(q.log(), p.log(), boundary="exclusive")


def test_akl_weights_hand_example():
    # p = [0.5, 0.3, 0.2], μ = 0.5: head = {0}. q = [0.3, 0.2, 0.5]:
    # g_head = |0.5 − 0.3| = 0.2, g_tail = |0.3 − 0.2| + |0.2 − 0.5| = 0.4 -> (1/3, 2/3).
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64)
    assert akl_head_mask(p.log(), mu=0.5).tolist() == [True, False, False]
    assert akl_head_mask(p.log(), mu=0.75, boundary="inclusive").tolist() == [True, True, False]
    assert akl_head_mask(p.log(), mu=0.75).tolist() == [True, False, False]  # .8 > .75: tail
    w_head, w_tail = akl_weights(q.log(), p.log(), mu=0.5)
    assert (w_head.item(), w_tail.item()) == pytest.approx((1 / 3, 2 / 3), abs=1e-12)
    expected = w_head * forward_kl(q.log(), p.log()) + w_tail * reverse_kl(q.log(), p.log())
    assert akl(q.log(), p.log(), mu=0.5).item() == pytest.approx(expected.item(), abs=1e-12)


def test_akl_weights_are_detached_and_sum_to_one():
    s, t = _logits(6, 15, seed=10).requires_grad_(), _logits(6, 15, seed=11).requires_grad_()
    w_head, w_tail = akl_weights(s, t, mu=0.5)
    assert not w_head.requires_grad and not w_tail.requires_grad
    torch.testing.assert_close(w_head + w_tail, torch.ones(6, dtype=torch.float64))
    assert ((w_head >= 0) & (w_head <= 1)).all()
    # p = q: g_head + g_tail = 0, guarded to ½ each.
    w_head, w_tail = akl_weights(t.detach(), t.detach())
    assert torch.equal(w_head, torch.full((6,), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"mu.*\[0, 1\]"):
        akl(s, t, mu=1.5)


# --- ToDi -----------------------------------------------------------------------------------


def test_todi_weights_favour_fkl_where_the_student_underestimates():
    s, t = _logits(5, 12, seed=12).requires_grad_(), _logits(5, 12, seed=13)
    a = todi_weights(s, t)
    assert not a.requires_grad
    p, q = F.softmax(t, -1), F.softmax(s.detach(), -1)
    assert (a[p > q] > 0.5).all() and (a[p < q] < 0.5).all()
    # β = 1: a_v = p_v / (p_v + q_v).
    torch.testing.assert_close(a, p / (p + q))


def test_todi_values_at_beta_one_and_zero():
    s, t = _logits(5, 12, seed=14).requires_grad_(), _logits(5, 12, seed=15)
    # β = 1: Σ (p − q)(log p − log q) = KL(p‖q) + KL(q‖p) in value.
    torch.testing.assert_close(todi(s, t, beta=1.0), forward_kl(s, t) + reverse_kl(s, t))
    # β = 0: a = ½ everywhere, so value and gradient are those of ½(KL(p‖q) + KL(q‖p)).
    half = 0.5 * (forward_kl(s, t) + reverse_kl(s, t))
    torch.testing.assert_close(todi(s, t, beta=0.0), half)
    (got,) = torch.autograd.grad(todi(s, t, beta=0.0).sum(), s)
    (want,) = torch.autograd.grad(half.sum(), s)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="beta"):
        todi(s, t, beta=-1.0)


# --- Entropy-aware --------------------------------------------------------------------------


def test_entropy_gate_rises_as_the_teacher_flattens():
    t = _logits(1, 30, seed=16)
    gates = [entropy_gate(t * scale).item() for scale in (8.0, 4.0, 2.0, 1.0, 0.5, 0.1)]
    assert all(a < b for a, b in zip(gates, gates[1:]))
    assert entropy_gate(torch.zeros(2, 30)).tolist() == pytest.approx([1.0, 1.0])
    one_hot = torch.tensor([[100.0] + [0.0] * 29])
    assert entropy_gate(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    # h_max: gate = clamp(H / h_max, 0, 1)
    p = F.softmax(t, -1)
    entropy = -(p * p.log()).sum(-1)
    assert entropy_gate(t, h_max=10.0).item() == pytest.approx(entropy.item() / 10.0)
    with pytest.raises(ValueError, match="h_max"):
        entropy_gate(t, h_max=0.0)


def test_entropy_aware_moves_from_rkl_to_fkl():
    s = _logits(1, 30, seed=17)
    uniform = torch.zeros(1, 30, dtype=torch.float64)
    torch.testing.assert_close(entropy_aware(s, uniform), forward_kl(s, uniform))
    peaked = torch.tensor([[40.0] + [0.0] * 29], dtype=torch.float64)
    torch.testing.assert_close(entropy_aware(s, peaked), reverse_kl(s, peaked), rtol=1e-6, atol=0)


# --- Bridge and TAID ------------------------------------------------------------------------


def test_bridge_ends_and_gradient():
    s, t = _logits(4, 10, seed=18).requires_grad_(), _logits(4, 10, seed=19)
    torch.testing.assert_close(bridge(s, t, gamma=1.0), forward_kl(s, t), atol=1e-12, rtol=0)
    assert torch.equal(bridge(s, t, gamma=0.0), torch.zeros(4, dtype=torch.float64))
    # d KL(r ‖ q) / d z_S = (q − r)/τ with r held fixed.
    tau, gamma = 1.5, 0.3
    (grad,) = torch.autograd.grad(bridge(s, t, tau, gamma=gamma).sum(), s)
    q = F.softmax(s.detach() / tau, -1)
    r = F.softmax(((1 - gamma) * s.detach() + gamma * t) / tau, -1)
    torch.testing.assert_close(grad, (q - r) / tau)
    with pytest.raises(ValueError, match="gamma"):
        bridge(s, t, gamma=2.0)


@pytest.mark.parametrize("space", ["logit", "prob"])
def test_taid_ends(space):
    s, t = _logits(4, 10, seed=20).requires_grad_(), _logits(4, 10, seed=21)
    torch.testing.assert_close(
        taid(s, t, lam=1.0, space=space), forward_kl(s, t), atol=1e-12, rtol=0
    )
    at_zero = taid(s, t, lam=0.0, space=space)
    assert torch.equal(at_zero.detach(), torch.zeros(4, dtype=torch.float64))
    (grad,) = torch.autograd.grad(at_zero.sum(), s)
    assert grad.abs().max() <= 1e-15


def test_taid_spaces():
    s, t = _logits(4, 10, seed=22), _logits(4, 10, seed=23)
    # The paper's logit interpolation is the bridge.
    assert torch.equal(taid(s, t, 1.2, lam=0.4), bridge(s, t, 1.2, gamma=0.4))
    # The probability mixture r = (1−λ)·q + λ·p.
    log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
    log_r = torch.log(0.6 * log_q.exp() + 0.4 * log_p.exp())
    torch.testing.assert_close(taid(s, t, lam=0.4, space="prob"), _kl(log_r, log_q))
    with pytest.raises(ValueError, match="space"):
        taid(s, t, lam=0.4, space="logits")


def test_topk_reverse_kl_support():
    s, t = _logits(4, 10, seed=24), _logits(4, 10, seed=25)
    torch.testing.assert_close(topk_reverse_kl(s, t, k=10), reverse_kl(s, t), atol=1e-12, rtol=0)
    torch.testing.assert_close(topk_reverse_kl(s, t, k=50), reverse_kl(s, t), atol=1e-12, rtol=0)
    assert topk_reverse_kl(s, t, k=1).abs().max() <= 1e-12
    # Only the teacher's top-k entries matter: change the student elsewhere, same value.
    support = t.topk(3, -1).indices
    outside = torch.ones_like(s, dtype=torch.bool).scatter_(-1, support, False)
    moved = torch.where(outside, s + 5 * torch.randn_like(s), s)
    torch.testing.assert_close(topk_reverse_kl(moved, t, k=3), topk_reverse_kl(s, t, k=3))
    # Renormalised on S: the value is the reverse KL of the restricted distributions.
    log_q_s = F.log_softmax(s.gather(-1, support), -1)
    log_p_s = F.log_softmax(t.gather(-1, support), -1)
    torch.testing.assert_close(topk_reverse_kl(s, t, k=3), _kl(log_q_s, log_p_s))
    with pytest.raises(ValueError, match="k must"):
        topk_reverse_kl(s, t, k=0)
