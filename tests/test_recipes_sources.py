"""The recipes built on the token-level, prefix and replay sources: build, validate, train, resume."""

from __future__ import annotations

import math

import pytest
import torch

from opd.errors import ConfigError
from opd.method import Method
from opd.recipes import RECIPES, get_recipe
from opd.sampling import AdaSwitch, Mix, Prefix, Replay, Speculative
from opd.schedules import ByWriter
from opd.train import distill
from tests.helpers import fresh_models, tiny_cfg

NEW = {
    "skd": Speculative,
    "adaswitch": AdaSwitch,
    "fast_opd": Prefix,
    "distillm": Replay,
    "distillm2": Mix,
}
QUIET = dict(evaluate=False, log=lambda *_: None)


@pytest.mark.parametrize("name", sorted(NEW))
def test_recipe_builds_with_its_source(name):
    info = RECIPES[name]
    method = info.build()
    assert isinstance(method, Method) and isinstance(method.prefixes, NEW[name])
    assert info.citation and info.summary and info.granularity in ("token", "sequence", "hybrid")
    assert method.describe().count("\n") >= 4 and method.name == name


def test_recipe_compositions_and_argument_checks():
    assert get_recipe("skd").build(k=5).prefixes.k == 5
    assert get_recipe("fast_opd").build(length=3).signal.name == "reverse_kl"
    d1 = get_recipe("distillm").build()
    assert d1.signal.name == "skew_forward_kl" and d1.signal.params == {"alpha": 0.1}
    assert d1.prefixes.needs_completions
    d2 = get_recipe("distillm2").build()
    assert isinstance(d2.signal, ByWriter) and d2.prefixes.other == "teacher"
    assert dict((w, s.name) for w, s in d2.signal.parts) == {
        "teacher": "skew_forward_kl",
        "student": "skew_reverse_kl",
    }
    with pytest.raises(ConfigError, match="distillm"):
        get_recipe("distillm").build(divergence="forward_kl")
    with pytest.raises(ConfigError, match="tau"):
        get_recipe("adaswitch").build(tau=math.nan)


# Small enough that the buffer fills in one batch and the replay path runs within 2 steps.
ARGS = {
    "skd": ["method.args.k=20"],
    "adaswitch": ["method.args.tau=4.6"],  # about −log(1/105): some rows switch
    "fast_opd": ["method.args.length=3"],
    "distillm": ["method.args.capacity=4", "method.args.rho_start=1.0", "method.args.rho_end=1.0"],
    "distillm2": [],
}


@pytest.mark.parametrize("name", sorted(NEW))
def test_recipe_trains_two_steps(tmp_path, prompt_file, tok, name):
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=2", f"method.recipe={name}", *ARGS[name])
    res = distill(cfg, models=fresh_models(tok), **QUIET)
    assert len(res.losses) == 2 and all(math.isfinite(v) and v >= 0 for v in res.losses)
    rows = res.metrics
    assert [r["step"] for r in rows] == [1, 2] and all(r["tokens"] > 0 for r in rows)
    if name == "fast_opd":
        assert all(r["completion_length"] <= 3 and r["prefix_length"] == 3 for r in rows)
    if name in ("skd", "adaswitch", "distillm", "distillm2"):
        assert all(0.0 <= r["student_share"] <= 1.0 for r in rows)


def test_distillm_resume_restores_the_replay_buffer(tmp_path, prompt_file, tok):
    common = (
        "train.steps=4",
        "method.recipe=distillm",
        "sampling.temperature=1.0",
        *ARGS["distillm"],
    )
    straight = distill(
        tiny_cfg(tmp_path, prompt_file, *common, name="a"), models=fresh_models(tok), **QUIET
    )
    assert any(r["replayed"] for r in straight.metrics)  # the buffer is used before the end
    distill(
        tiny_cfg(tmp_path, prompt_file, *common, name="b"),
        models=fresh_models(tok),
        stop_after=2,
        **QUIET,
    )
    torch.manual_seed(1234)  # whatever happens in between must not matter
    resumed = distill(
        tiny_cfg(tmp_path, prompt_file, *common, name="b"),
        models=fresh_models(tok),
        resume=True,
        **QUIET,
    )
    assert len(resumed.losses) == 4
    for a, b in zip(straight.losses, resumed.losses):
        assert abs(a - b) <= 1e-6, (straight.losses, resumed.losses)
    assert [r["replayed"] for r in resumed.metrics] == [r["replayed"] for r in straight.metrics[2:]]
