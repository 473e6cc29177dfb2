"""Multi-teacher ensembles: the mixture divergence, its chunked path, and a run end to end."""

from __future__ import annotations

import math

import pytest
import torch

from opd.build import finish_models
from opd.errors import ConfigError
from opd.losses import divergence
from opd.losses.mixture import chunked_mixture_divergence, mixture_logits
from opd.teachers.ensemble import TeacherEnsemble
from opd.tiny import tiny_llama
from opd.train import distill
from tests.helpers import tiny_cfg


def test_mixture_logits_is_the_weighted_mixture():
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    for tau in (1.0, 2.0):
        p = 0.3 * torch.softmax(z1 / tau, -1) + 0.7 * torch.softmax(z2 / tau, -1)
        got = torch.softmax(mixture_logits([z1, z2], [3, 7], tau) / tau, -1)
        torch.testing.assert_close(got, p)
    # one-hot weights recover that teacher; identical teachers recover it too
    same = mixture_logits([z1, z1], [1, 1])
    torch.testing.assert_close(torch.log_softmax(same, -1), torch.log_softmax(z1, -1))


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "generalized_jsd", "total_variation"])
def test_chunked_mixture_matches_reference(name):
    torch.manual_seed(1)
    N, V = 13, 11
    h_s = torch.randn(N, 5, dtype=torch.float64, requires_grad=True)
    W_s = torch.randn(V, 5, dtype=torch.float64, requires_grad=True)
    teachers = [(torch.randn(N, 6, dtype=torch.float64), torch.randn(V, 6, dtype=torch.float64)) for _ in range(3)]
    w = [0.2, 0.5, 0.3]
    got = chunked_mixture_divergence(name, h_s, W_s, teachers, w, temperature=1.5, chunk_size=4)
    ref = divergence(name, h_s @ W_s.T, mixture_logits([h @ W.T for h, W in teachers], w, 1.5), temperature=1.5)
    torch.testing.assert_close(got, ref)
    g = torch.randn(N, dtype=torch.float64)
    ga = torch.autograd.grad((got * g).sum(), (h_s, W_s))
    gb = torch.autograd.grad((ref * g).sum(), (h_s, W_s))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_chunked_mixture_gradcheck():
    torch.manual_seed(2)
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    teachers = [(torch.randn(5, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)) for _ in range(2)]
    assert torch.autograd.gradcheck(
        lambda a, b: chunked_mixture_divergence("reverse_kl", a, b, teachers, [1, 2], chunk_size=2), (h, W)
    )


def test_weight_validation():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="positive"):
        mixture_logits([z, z], [1, 0])
    with pytest.raises(ValueError, match="2 weights for 3"):
        mixture_logits([z, z, z], [1, 1])
    with pytest.raises(ConfigError, match="at least 2"):
        TeacherEnsemble([tiny_llama(10)])


def ensemble_models(tok, weights=(0.5, 0.5)):
    t1 = tiny_llama(len(tok), hidden=64, layers=3, seed=11)
    t2 = tiny_llama(len(tok), hidden=32, layers=2, seed=21)
    student = tiny_llama(len(tok), hidden=48, layers=2, seed=12)
    return finish_models(TeacherEnsemble([t1, t2], list(weights)), student, tok)


def test_multi_teacher_recipe_runs_and_learns(tmp_path, prompt_file, tok):
    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=12", "method.recipe=multi_teacher")
    res = distill(cfg, models=ensemble_models(tok), log=lambda *_: None)
    assert len(res.losses) == 12 and all(math.isfinite(x) for x in res.losses)
    evals = [r for r in res.metrics if r.get("event") == "eval"]
    from opd.logs import read_metrics

    evals = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if r.get("event") == "eval"]
    assert evals[-1]["heldout_kl"] < evals[0]["heldout_kl"]


def test_multi_teacher_recipe_refuses_a_single_teacher(tmp_path, prompt_file, tok):
    from tests.helpers import fresh_models

    cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=1", "method.recipe=multi_teacher")
    with pytest.raises(ConfigError, match="model.teacher=PATH_A,PATH_B"):
        distill(cfg, models=fresh_models(tok), evaluate=False, log=lambda *_: None)


def test_ensemble_of_identical_teachers_equals_the_teacher(tmp_path, prompt_file, tok):
    """Two copies of one teacher must give exactly the single-teacher losses."""
    from tests.helpers import fresh_models

    single = fresh_models(tok)
    twin = finish_models(
        TeacherEnsemble([tiny_llama(len(tok), hidden=64, layers=3, seed=11)] * 2, [0.4, 0.6]),
        tiny_llama(len(tok), hidden=48, layers=2, seed=12),
        tok,
    )
    runs = []
    for name, models in (("single", single), ("twin", twin)):
        cfg = tiny_cfg(tmp_path, prompt_file, "train.steps=2", "method.recipe=gkd", name=name)
        runs.append(distill(cfg, models=models, evaluate=False, log=lambda *_: None).losses)
    for a, b in zip(*runs):
        assert a == pytest.approx(b, abs=1e-5)


def test_teacher_weights_config_errors(tmp_path):
    from opd.build import _parse_weights

    assert _parse_weights("0.7,0.3", 2) == [0.7, 0.3]
    with pytest.raises(ConfigError, match="2 weights for 3 teachers"):
        _parse_weights("1,2", 3)
    with pytest.raises(ConfigError, match="comma-separated numbers"):
        _parse_weights("a,b", 2)
