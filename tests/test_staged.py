"""The staged recipe walks through its three stages in one run."""

from __future__ import annotations

import math

import pytest

from opd.errors import ConfigError
from opd.recipes import get_recipe
from opd.sampling.sources import DatasetPrefixes, StudentPrefixes
from opd.signals import Divergence, RewardWeighted
from opd.train import distill
from tests.helpers import fresh_models, tiny_cfg


def test_stage_boundaries():
    m = get_recipe("staged").build()
    assert isinstance(m.prefixes.part_at(0.0), DatasetPrefixes)
    assert isinstance(m.prefixes.part_at(0.7), StudentPrefixes)
    assert m.signal.part_at(0.5) == Divergence("forward_kl")
    assert m.signal.part_at(0.7).name == "reverse_kl"
    assert isinstance(m.signal.part_at(0.95), RewardWeighted)
    with pytest.raises(ConfigError, match="warmup"):
        get_recipe("staged").build(warmup=0.95, on_policy=0.9)


def test_staged_run_reaches_the_reward_stage(tmp_path, prompt_file, tok):
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=10", "method.recipe=staged")
    res = distill(cfg, models=fresh_models(tok), evaluate=False, log=lambda *_: None)
    assert len(res.losses) == 10 and all(math.isfinite(x) for x in res.losses)
    rows = [r for r in res.metrics if "loss" in r]
    assert "reward_mean" in rows[-1] and 0.0 <= rows[-1]["reward_mean"] <= 1.0
    assert all("reward_mean" not in r for r in rows[:9])
