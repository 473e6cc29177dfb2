"""Every recipe builds and validates; Method rejects incompatible parts."""

from __future__ import annotations

import pytest

from opd.errors import ConfigError
from opd.method import Method
from opd.recipes import RECIPES, get_recipe
from opd.sampling import student
from opd.signals import Divergence


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds(name):
    info = RECIPES[name]
    method = info.build()
    assert isinstance(method, Method)
    assert info.citation and info.summary
    assert method.describe().count("\n") >= 4


def test_core_recipes_present():
    assert {"gkd", "seqkd", "supervised_kd", "on_policy_rkl"} <= set(RECIPES)


def test_gkd_composition():
    m = get_recipe("gkd").build(lmbda=1.0, beta=0.0)
    assert m.prefixes.student == 1.0 and m.signal.name == "generalized_jsd"
    assert m.signal.params == {"beta": 0.0}


def test_recipe_argument_errors():
    with pytest.raises(ConfigError, match="no argument 'betta'.*valid: lmbda, beta"):
        get_recipe("gkd").build(betta=0.1)
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        get_recipe("nope")
    with pytest.raises(ConfigError, match="beta"):
        get_recipe("gkd").build(beta=2.0)


def test_method_rejects_signal_the_teacher_cannot_serve():
    class SampledOnly:
        provides = frozenset({"token_logprobs"})

        def describe(self):
            return "sampled log-probs"

    with pytest.raises(ConfigError, match="needs the teacher's 'full_logits'.*sampled log-probs"):
        Method(prefixes=student(), teacher=SampledOnly(), signal=Divergence("forward_kl"))


def test_bad_divergence_and_reduction():
    with pytest.raises(ConfigError, match="unknown divergence 'kl'"):
        Divergence("kl")
    with pytest.raises(ConfigError, match="reduction"):
        Method(prefixes=student(), reduction="sum")


def _rows(seed=0, n=6, d=4, v=9):
    import torch

    from opd.types import StudentRows, TeacherScores

    g = torch.Generator().manual_seed(seed)
    student = StudentRows(
        torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_(),
        torch.randn(v, d, generator=g, dtype=torch.float64),
        torch.zeros(n, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
    )
    teacher = TeacherScores(
        torch.randn(n, d, generator=g, dtype=torch.float64),
        torch.randn(v, d, generator=g, dtype=torch.float64),
    )
    return student, teacher


@pytest.mark.parametrize("materialize", [False, True])
def test_tau_squared_scales_the_loss_by_tau_squared_exactly(materialize):
    import torch

    from opd.signals import SignalContext

    student, teacher = _rows()
    ctx = SignalContext(chunk_size=4, materialize=materialize)
    tau = 2.5
    plain = Divergence("forward_kl", {}, tau)
    scaled = Divergence("forward_kl", {}, tau, tau_squared=True)
    v_plain, v_scaled = plain(student, teacher, ctx), scaled(student, teacher, ctx)
    torch.testing.assert_close(v_scaled, tau**2 * v_plain, atol=1e-13, rtol=1e-13)
    (g_plain,) = torch.autograd.grad(v_plain.sum(), student.hidden_ND)
    (g_scaled,) = torch.autograd.grad(v_scaled.sum(), student.hidden_ND)
    torch.testing.assert_close(g_scaled, tau**2 * g_plain, atol=1e-13, rtol=1e-12)
    if not materialize:  # the one-pass path scales the same way
        coef_N = torch.linspace(0.1, 1.0, 6, dtype=torch.float64)
        loss, values = scaled.weighted_loss(student, teacher, ctx, coef_N)
        torch.testing.assert_close(loss, (coef_N * v_scaled).sum(), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(values, v_scaled.detach(), atol=1e-12, rtol=1e-12)
        (g_one,) = torch.autograd.grad(loss, student.hidden_ND)
        v_again = scaled(student, teacher, ctx)
        (g_two,) = torch.autograd.grad((coef_N * v_again).sum(), student.hidden_ND)
        torch.testing.assert_close(g_one, g_two, atol=1e-12, rtol=1e-10)


def test_tau_squared_defaults_per_recipe():
    # Hinton's recipe multiplies by τ²; the recipes that follow GKD/DistiLLM/MiniLLM/TRL don't.
    assert get_recipe("supervised_kd").build(temperature=2.0).signal.tau_squared
    assert not get_recipe("supervised_kd").build(tau_squared=False).signal.tau_squared
    for name in ("gkd", "distillm", "seqkd", "on_policy_rkl"):
        assert not get_recipe(name).build().signal.tau_squared, name
    assert "τ²" in get_recipe("supervised_kd").build(temperature=2.0).signal.describe()


def test_requires_is_a_frozenset_on_every_part():
    from opd.schedules import ByProgress, ByWriter
    from opd.sequence_signals import GOPD, Reopold, RewardWeighted, SampledRKL
    from opd.topk_signals import TopKDivergence
    from opd.weights import AdaKD, EntropyBand, SpecialTokenMask

    parts = [
        Divergence(),
        SampledRKL(),
        GOPD(),
        Reopold(),
        RewardWeighted(),
        TopKDivergence(k=2),
        AdaKD(),
        SpecialTokenMask(),
        EntropyBand(0, 1),
    ]
    for part in parts:
        assert isinstance(part.requires, frozenset), part
    staged = ByProgress(((0.5, SampledRKL()), (1.0, TopKDivergence(k=2))))
    assert staged.requires == frozenset({"token_logprobs", "topk_logprobs"})
    by_writer = ByWriter((("teacher", Divergence()), ("student", SampledRKL())))
    assert by_writer.requires == frozenset({"full_logits", "token_logprobs"})
    for name in RECIPES:
        method = get_recipe(name).build()
        assert isinstance(method.signal.requires, frozenset), name
        assert method.signal.requires <= method.teacher.provides, name


def test_method_checks_every_stage_of_a_scheduled_signal():
    from opd.schedules import ByProgress, ByWriter
    from opd.sequence_signals import SampledRKL
    from opd.teachers import TopK
    from opd.topk_signals import TopKDivergence

    # The first stage is servable by top-k access; the later one needs full logits.
    staged = ByProgress(((0.5, TopKDivergence(k=4)), (1.0, Divergence("reverse_kl"))))
    with pytest.raises(ConfigError) as err:
        Method(prefixes=student(), teacher=TopK(k=4), signal=staged)
    message = str(err.value)
    assert "stage [50%–100%)" in message and "reverse_kl" in message
    assert "'full_logits'" in message and TopK(k=4).describe() in message
    # Both stages servable: accepted. Nested combinators are walked too.
    Method(
        prefixes=student(),
        teacher=TopK(k=4),
        signal=ByProgress(((0.5, TopKDivergence(k=4)), (1.0, SampledRKL()))),
    )
    nested = ByWriter((("student", staged),))
    with pytest.raises(ConfigError, match=r"writer 'student', stage \[50%–100%\)"):
        Method(prefixes=student(), teacher=TopK(k=4), signal=nested)
