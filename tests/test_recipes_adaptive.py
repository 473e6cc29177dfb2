"""The adaptive-divergence, curriculum and token-weight recipes: each builds with its paper's
parts, validates, and runs two training steps on tiny models; PACED resumes exactly."""

from __future__ import annotations

import math

import pytest

from opd.curriculum import Paced
from opd.errors import ConfigError
from opd.recipes import get_recipe
from opd.signals import ByProgress, Linear
from opd.train import distill
from opd.weights import SpecialTokenMask
from tests.helpers import fresh_models, tiny_cfg

ADAPTIVE = ("todi", "akl", "entropy_aware", "veto", "taid", "paced", "revisiting_opd")
# PACED on a tiny run: a small pool, 2 samples per pass rate, a refresh at every step
PACED_ARGS = ("method.args.pool=8", "method.args.n=2", "method.args.refresh_every=1")


def quiet(*_):
    pass


@pytest.mark.parametrize("name", ADAPTIVE)
def test_recipe_runs_two_steps(tmp_path, prompt_file, tok, name):
    extra = PACED_ARGS if name == "paced" else ()
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=2", f"method.recipe={name}", *extra)
    res = distill(cfg, models=fresh_models(tok), evaluate=False, log=quiet)
    assert len(res.losses) == 2 and all(math.isfinite(x) for x in res.losses)
    assert res.method.name == name
    assert all(r["tokens"] > 0 and math.isfinite(r["grad_norm"]) for r in res.metrics)


def test_recipes_carry_their_papers_parts():
    assert get_recipe("todi").build().signal.params == {"beta": 1.0}
    assert get_recipe("akl").build().signal.params == {"mu": 0.5, "boundary": "authors"}
    assert get_recipe("veto").build(gamma=0.7).signal.name == "bridge"
    taid = get_recipe("taid").build()
    lam = taid.signal.params["lam"]
    assert isinstance(lam, Linear) and (lam.start, lam.end) == (0.4, 1.0)
    paced = get_recipe("paced").build(split=0.25)
    assert isinstance(paced.prompts, Paced) and isinstance(paced.signal, ByProgress)
    assert (
        paced.signal.part_at(0.1).name == "forward_kl"
        and paced.signal.part_at(0.5).name == "reverse_kl"
    )
    rev = get_recipe("revisiting_opd").build(k=8)
    assert rev.signal.params == {"k": 8}
    assert rev.weights == (SpecialTokenMask(keep_stop=True),)
    assert get_recipe("revisiting_opd").build(mask_stop=True).weights[0].keep_stop is False


def test_prefixes_argument(tmp_path, prompt_file, tok):
    assert get_recipe("akl").build(prefixes="dataset").prefixes.needs_completions
    with pytest.raises(ConfigError, match="prefixes must be one of"):
        get_recipe("todi").build(prefixes="teachers")
    with pytest.raises(ConfigError, match="lam0"):
        get_recipe("taid").build(lam0=1.5)
    # the papers' off-policy setting runs too
    cfg = tiny_cfg(
        tmp_path, prompt_file, "train.steps=1", "method.recipe=todi", "method.args.prefixes=dataset"
    )
    res = distill(cfg, models=fresh_models(tok), evaluate=False, log=quiet)
    assert math.isfinite(res.losses[0])


def test_paced_resume_reproduces_uninterrupted_run(tmp_path, prompt_file, tok):
    common = (
        "train.steps=3",
        "method.recipe=paced",
        "sampling.temperature=1.0",
        "method.args.pool=6",
        "method.args.n=2",
        "method.args.refresh_every=2",
    )
    straight = distill(
        tiny_cfg(tmp_path, prompt_file, *common, name="a"),
        models=fresh_models(tok),
        evaluate=False,
        log=quiet,
    )
    distill(
        tiny_cfg(tmp_path, prompt_file, *common, name="b"),
        models=fresh_models(tok),
        stop_after=1,
        evaluate=False,
        log=quiet,
    )
    resumed = distill(
        tiny_cfg(tmp_path, prompt_file, *common, name="b"),
        models=fresh_models(tok),
        resume=True,
        evaluate=False,
        log=quiet,
    )
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6)
    assert resumed.method.prompts.rates == straight.method.prompts.rates
