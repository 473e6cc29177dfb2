"""Every recipe builds and validates; Method rejects incompatible parts."""

from __future__ import annotations

import pytest

from opd.context import StepContext
from opd.errors import ConfigError
from opd.method import Method
from opd.recipes import RECIPES, get_recipe
from opd.sampling import student
from opd.signals import Divergence
from tests.helpers import assert_describes


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds(name):
    info = RECIPES[name]
    method = info.build()
    assert isinstance(method, Method)
    assert info.citation and info.summary
    assert_describes(method)


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

    student, teacher = _rows()
    ctx = StepContext(chunk_size=4, materialize=materialize)
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
    signal = get_recipe("supervised_kd").build(temperature=2.0).signal
    assert signal.describe() == "forward_kl(temperature=2.0) × τ²"  # shown in the run's log
    assert get_recipe("gkd").build().signal.describe() == "generalized_jsd(beta=0.5)"


def test_requires_is_a_frozenset_on_every_part():
    from opd.signals import (
        GOPD,
        ByProgress,
        ByWriter,
        Reopold,
        RewardWeighted,
        SampledRKL,
        TopKDivergence,
    )
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
    from opd.signals import ByProgress, ByWriter, SampledRKL, TopKDivergence
    from opd.teachers import TopK

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


def test_recipe_arguments_are_checked_against_their_types():
    with pytest.raises(ConfigError, match=r"method\.args\.beta expects a number.*'abc'"):
        get_recipe("gkd").build(beta="abc")
    with pytest.raises(ConfigError, match=r"method\.args\.whiten expects true or false"):
        get_recipe("minillm").build(whiten="maybe")
    with pytest.raises(ConfigError, match=r"method\.args\.capacity expects an integer"):
        get_recipe("distillm").build(capacity=2.5)
    with pytest.raises(ConfigError, match=r"method\.args\.lmbda expects a finite number"):
        get_recipe("gkd").build(lmbda=float("nan"))
    with pytest.raises(ConfigError, match=r"method\.args\.prefixes expects text"):
        get_recipe("akl").build(prefixes=3)
    # Strings that spell a value of the right type are accepted.
    assert get_recipe("gkd").build(beta="0.25").signal.params == {"beta": 0.25}
    assert get_recipe("minillm").build(whiten="false").signal.whiten is False
    assert get_recipe("minillm").build(whiten="True").signal.whiten is True
    assert get_recipe("distillm").build(capacity=8.0).prefixes.capacity == 8
    assert get_recipe("gkd").build(beta=1).signal.params == {"beta": 1}  # an int is a number


def test_unknown_recipe_and_argument_suggest_the_nearest_names():
    with pytest.raises(ConfigError, match=r"unknown recipe 'distilm'; did you mean 'distillm'"):
        get_recipe("distilm")
    with pytest.raises(ConfigError, match=r"no argument 'lambda'; did you mean lmbda"):
        get_recipe("gkd").build(**{"lambda": 0.5})


def test_recipe_name_is_written_once():
    import inspect
    import sys

    for name, info in RECIPES.items():
        assert info.build().name == name
        assert info.fn().name == name  # calling the function directly names it too
        source = inspect.getsource(sys.modules[info.fn.__module__])
        assert f'name="{name}"' not in source, name


def test_every_recipe_declares_its_deviations_and_the_docs_list_them():
    from pathlib import Path

    from opd.recipes.registry import deviations_markdown

    for name, info in RECIPES.items():
        assert info.deviations.strip(), f"{name}: no 'Deviations:' paragraph in its docstring"
    docs = (Path(__file__).parents[1] / "docs" / "methods.md").read_text(encoding="utf-8")
    start, end = "<!-- deviations:start -->\n", "<!-- deviations:end -->"
    listed = docs[docs.index(start) + len(start) : docs.index(end)].strip()
    assert listed == deviations_markdown(), "regenerate the list in docs/methods.md"
    assert "METHODS.md" not in docs


def test_smaller_differences_are_documented():
    # issue 9 item 7: tinker sums, DistiLLM's LM term, MiniLLM's whitening statistics.
    assert "tinker sums" in get_recipe("sampled_rkl").deviations
    assert "language-modelling loss" in get_recipe("distillm").deviations
    assert "whitened" in get_recipe("minillm").deviations
    assert "counted completion tokens" in get_recipe("minillm").deviations
    assert "SKL + SRKL" in get_recipe("distillm2").deviations
    assert "τ²" not in get_recipe("gkd").deviations  # only supervised_kd scales by τ²


def test_opd_recipes_name_prints_the_deviations():
    from tests.helpers import run_opd

    res = run_opd(["recipes", "sampled_rkl"])
    assert res.code == 0, res.err
    assert "deviations from the paper:" in res.out
    assert "tinker sums the per-token losses" in res.out


def test_every_recipes_parts_satisfy_the_declared_interfaces():
    from opd.parts import (
        OnePassSignal,
        Preparable,
        PromptSelector,
        Signal,
        Stateful,
        TokenWeight,
        missing_members,
    )
    from opd.signals import GOPD, leaf_parts

    for name, info in RECIPES.items():
        m = info.build()
        assert isinstance(m.signal, Signal), (name, missing_members(m.signal, Signal))
        for _, leaf in leaf_parts(m.signal):
            assert isinstance(leaf, Signal), (name, leaf)
            assert isinstance(leaf.requires, frozenset), (name, leaf)
        for w in m.weights:
            assert isinstance(w, TokenWeight), (name, missing_members(w, TokenWeight))
        assert m.prompts is None or isinstance(m.prompts, PromptSelector), name
        for attr in ("rollout", "describe", "needs_completions", "needs_teacher_model"):
            assert hasattr(m.prefixes, attr), (name, attr)  # opd.parts.PrefixSource
        for attr in ("score", "describe", "provides"):
            assert hasattr(m.teacher, attr), (name, attr)  # opd.parts.TeacherAccess
        for part in (m.prompts, m.prefixes, m.signal, *m.weights):
            if hasattr(part, "state_dict"):
                assert isinstance(part, Stateful), (name, part)
    assert isinstance(get_recipe("gkd").build().signal, OnePassSignal)
    assert isinstance(get_recipe("g_opd").build().signal, Preparable)
    assert isinstance(GOPD(), Preparable) and not isinstance(Divergence(), Preparable)


def test_method_refuses_a_part_that_is_not_its_interface():
    class NoRequires:
        def __call__(self, student, teacher, ctx):
            return None

        def describe(self):
            return "no requires"

    with pytest.raises(ConfigError, match=r"signal .* is not a Signal: it has no requires"):
        Method(prefixes=student(), signal=NoRequires())
    with pytest.raises(ConfigError, match=r"token weight .* is not a TokenWeight"):
        Method(prefixes=student(), weights=(object(),))
    with pytest.raises(
        ConfigError, match=r"prompts .* is not a PromptSelector: it has no .*select"
    ):
        Method(prefixes=student(), prompts=object())


def test_cli_says_a_recipe_argument_expects_a_number(tmp_path, prompt_file):
    from tests.helpers import assert_clean_error, run_opd, save_tiny_models, small_cli_args

    dirs = save_tiny_models(tmp_path / "models")
    args = small_cli_args(tmp_path, dirs, prompt_file, "recipe=gkd", "method.args.beta=abc")
    res = run_opd(["distill", *args])
    assert_clean_error(res, "method.args.beta", "expects a number", "'abc'")
    res = run_opd(["distill", *small_cli_args(tmp_path, dirs, prompt_file, "recipe=gdk")])
    assert_clean_error(res, "unknown recipe 'gdk'", "did you mean 'gkd'")
