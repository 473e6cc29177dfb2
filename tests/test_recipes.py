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
