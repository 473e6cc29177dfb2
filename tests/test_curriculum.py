"""PACED's curriculum: the Beta kernel, pass-rate estimation, sampling ∝ weight, refresh
cadence and state round-trip; the two-stage KL schedule; prefix sources by name."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from opd.context import StepContext
from opd.curriculum import Paced, beta_kernel
from opd.data import Example, PromptStream
from opd.errors import ConfigError, DataError
from opd.sampling import GenerationParams
from opd.sampling.sources import DatasetPrefixes, Mix, StudentPrefixes, TeacherPrefixes
from opd.signals import prefix_source, two_stage_kl

N_SAMPLES = 4
# prompt token -> number of passing samples out of N_SAMPLES (pass rate = value / 4)
PASSES = {10: 0, 11: 1, 12: 2, 13: 3, 14: 4}


class ScriptedBackend:
    """Returns "1" (a pass) for the first PASSES[prompt] copies of each prompt, else "0"."""

    def __init__(self, tok):
        self.one, self.zero = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("0")
        self.calls = 0

    def generate(self, model, prompts, params, *, pad_id, stop_ids):
        self.calls += 1
        assert params.temperature == 1.0  # estimation samples, whatever the run's temperature
        seen = Counter()
        out = []
        for p in prompts:
            key = p[0]
            out.append([self.one if seen[key] < PASSES[key] else self.zero])
            seen[key] += 1
        return out


def examples(answer="1"):
    return [Example((t,), None, answer, f"p.jsonl:{t}", str(t)) for t in PASSES]


def context(tok, backend, step=0):
    ctx = StepContext(
        student=None,
        teacher=None,
        backend=backend,
        params=GenerationParams(4, temperature=0.0),
        pad_id=0,
        stop_ids=(2,),
        step=step,
        tokenizer=tok,
    )
    ctx.verify = lambda text, answer: text.strip() == answer
    return ctx


def test_beta_kernel_is_zero_at_the_extremes_and_peaks_at_half():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    k = beta_kernel(s)
    assert k[0] == 0 and k[-1] == 0 and k.argmax() == 5 and k[5] == pytest.approx(0.25)
    skewed = beta_kernel(s, a=2.0, b=1.0)  # the peak moves to s = a / (a + b) = 2/3
    assert s[skewed.argmax()].item() == pytest.approx(0.7, abs=0.05)


def test_pass_rates_and_weights(tok):
    backend = ScriptedBackend(tok)
    paced = Paced(n=N_SAMPLES, pool=5, refresh_every=100)
    stream = PromptStream(examples(), batch_size=5, seed=0)
    paced.select(stream, context(tok, backend))
    assert backend.calls == 1
    assert paced.rates == {f"p.jsonl:{t}": k / N_SAMPLES for t, k in PASSES.items()}
    w = dict(zip(paced.pool_sources, paced.pool_weights().tolist()))
    assert w["p.jsonl:12"] == max(w.values()) == pytest.approx(0.25 + paced.floor)
    for extreme in ("p.jsonl:10", "p.jsonl:14"):  # s = 0 and s = 1: only the floor
        assert w[extreme] == pytest.approx(paced.floor) and w[extreme] < 0.01 * w["p.jsonl:12"]


def test_sampling_frequencies_follow_weights(tok):
    paced = Paced(n=N_SAMPLES, pool=5, refresh_every=10_000, floor=0.05)
    stream = PromptStream(examples(), batch_size=100, seed=0)
    ctx = context(tok, ScriptedBackend(tok))
    torch.manual_seed(0)
    counts = Counter()
    for _ in range(40):  # 4000 draws
        counts.update(ex.source for ex in paced.select(stream, ctx))
    w = paced.pool_weights()
    expected = (w / w.sum()).tolist()
    observed = [counts[s] / 4000 for s in paced.pool_sources]
    for e, o in zip(expected, observed):
        assert o == pytest.approx(e, abs=0.03)


def test_refresh_cadence_advances_the_stream(tok):
    backend = ScriptedBackend(tok)
    paced = Paced(n=N_SAMPLES, pool=3, refresh_every=4)
    stream = PromptStream(examples(), batch_size=2, seed=0, shuffle=False)
    for step in range(9):
        batch = paced.select(stream, context(tok, backend, step))
        assert len(batch) == 2
    assert backend.calls == 3  # steps 0, 4, 8
    assert paced.last_refresh == 8
    # each refresh draws ceil(3 / 2) = 2 batches of 2 from the stream: 3 refreshes x 4 = 12
    assert stream.epoch * 5 + stream.index == 12


def test_state_round_trip_resumes_the_same_draws(tok):
    stream = PromptStream(examples(), batch_size=3, seed=0)
    a = Paced(n=N_SAMPLES, pool=5, refresh_every=50)
    a.select(stream, context(tok, ScriptedBackend(tok), step=0))
    state = json.loads(json.dumps(a.state_dict()))  # JSON-serialisable
    assert set(state) == {"rates", "pool", "last_refresh"}

    b = Paced(n=N_SAMPLES, pool=5, refresh_every=50)
    b.load_state_dict(state)
    assert b.rates == a.rates and b.pool_sources == a.pool_sources
    backend = ScriptedBackend(tok)
    torch.manual_seed(7)
    from_a = [ex.source for ex in a.select(stream, context(tok, backend, step=1))]
    torch.manual_seed(7)
    from_b = [ex.source for ex in b.select(stream, context(tok, backend, step=1))]
    assert from_a == from_b and backend.calls == 0  # no refresh: the pool came from the state
    with pytest.raises(ConfigError, match="no pass rate"):
        Paced().load_state_dict({"rates": {}, "pool": ["x"], "last_refresh": 0})


def test_prompts_without_answers_are_rejected(tok):
    paced = Paced(n=2, pool=2)
    stream = PromptStream(examples(answer=None), batch_size=2, seed=0)
    with pytest.raises(DataError, match="answer"):
        paced.select(stream, context(tok, ScriptedBackend(tok)))


def test_paced_argument_checks():
    for bad in (
        dict(a=-1),
        dict(n=0),
        dict(pool=0),
        dict(refresh_every=0),
        dict(floor=0),
        dict(temperature=0),
    ):
        with pytest.raises(ConfigError):
            Paced(**bad)


def test_two_stage_kl_switches_direction():
    sched = two_stage_kl(split=0.3)
    assert sched.part_at(0.0).name == "forward_kl"
    assert sched.part_at(0.29).name == "forward_kl"
    assert sched.part_at(0.3).name == "reverse_kl"
    assert sched.part_at(1.0).name == "reverse_kl"
    assert sched.requires == frozenset({"full_logits"})
    for bad in (0.0, 1.0):
        with pytest.raises(ConfigError, match="split"):
            two_stage_kl(bad)


def test_prefix_source_by_name():
    assert isinstance(prefix_source("student"), StudentPrefixes)
    assert isinstance(prefix_source("dataset"), DatasetPrefixes)
    assert isinstance(prefix_source("teacher"), TeacherPrefixes)
    m = prefix_source("mix", 0.25)
    assert isinstance(m, Mix) and m.student == 0.25
    with pytest.raises(ConfigError, match="prefixes must be one of"):
        prefix_source("students")
