"""The served-teacher client: wire parsers, equality with a local teacher, faults, checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from opd.errors import ConfigError, OpdError
from opd.sampling import make_rollout
from opd.teachers import TAIL_ID, SampledLogprobs, TopK
from opd.teachers.served import ServedTeacher, TeacherRejected, TeacherUnreachable
from opd.teachers.wire import MalformedResponse, parse_sglang, parse_vllm, vllm_top
from opd.tiny import char_tokenizer, tiny_llama
from tests.served_fakes import FakeTeacherServer, free_port, serve_in_thread

FIXTURES = Path(__file__).parent / "fixtures" / "served"
URL = "http://teacher.test:8000"


@pytest.fixture
def teacher(tok):
    return tiny_llama(len(tok), hidden=32, layers=2, seed=11).eval()


@pytest.fixture
def rollout():
    r = make_rollout(
        [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]],
        [[20, 21, 22, 23], [24], [], [25, 26, 27]],
        pad_id=0,
        writer="student",
    )
    mask_BT = r.completion_mask_BT.clone()
    mask_BT[0, 1] = 0  # a written token that does not count: skipped, its context kept
    return dataclasses.replace(r, completion_mask_BT=mask_BT)


def served(fake, url=URL, **kw):
    sleeps = []
    kw.setdefault("api", fake.api)
    kw.setdefault("backoff_s", 0.01)
    t = ServedTeacher(url, transport=fake.mock_transport(), sleep=sleeps.append, **kw)
    return t, sleeps


# ------------------------------------------------------------------------------ parsers

ROWS = [[1, 7, 9, 4, 2], [5, 6]]
POSITIONS = [[1, 2, 3, 4], [1]]


@pytest.mark.parametrize(
    "parse,name", [(parse_vllm, "vllm_completions.json"), (parse_sglang, "sglang_generate.json")]
)
def test_parsers_read_the_documented_bodies(parse, name):
    body = json.loads((FIXTURES / name).read_text())
    row0, row1 = parse(body, ROWS, POSITIONS, k=2, vocab_size=100)
    # realised token in the top-k; outside it (rank 7) where fewer entries than asked came;
    # fewer entries; an id beyond the student's vocabulary (250) left out of the top-k
    assert row0.token_logprobs == [-0.5, -4.0, -0.1, -0.7]
    assert row0.top_ids == [[7, 3], [12], [4], [2]]
    assert row0.top_logprobs == [[-0.5, -1.2], [-0.3], [-0.1], [-0.7]]
    # vLLM: choices answered out of order; SGLang: the null first position left out
    assert (row1.token_logprobs, row1.top_ids) == ([-0.25], [[6, 8]])


def test_vllm_top_never_takes_a_tied_realised_token_for_a_top_member():
    entry = {
        "4": {"logprob": -2.0, "rank": 2},  # the realised token, tied with id 8 at rank 2
        "8": {"logprob": -2.0, "rank": 2},
        "1": {"logprob": -0.5, "rank": 1},
        "3": {"logprob": -2.5, "rank": 3},
    }
    ids, lps, tok_lp = vllm_top(entry, realised=4, k=3, vocab_size=50, where="t")
    assert (ids, lps, tok_lp) == ([1, 8, 3], [-0.5, -2.0, -2.5], -2.0)


@pytest.mark.parametrize(
    "body",
    [
        {"choices": []},
        {"choices": [{"index": 0, "prompt_logprobs": [None, {"3": {"logprob": -1.0}}]}]},
        {"choices": [{"index": 0, "prompt_logprobs": [None, {"5": {"logprob": "x"}}]}]},
        {"choices": [{"index": 0, "prompt_logprobs": [None]}]},
    ],
)
def test_vllm_parser_refuses_malformed_bodies(body):
    with pytest.raises(MalformedResponse):
        parse_vllm(body, [[1, 5]], [[1]], k=1, vocab_size=10)


def test_sglang_parser_refuses_ids_it_was_not_sent():
    body = {"meta_info": {"input_token_logprobs": [[None, 1, None], [-0.2, 9, None]]}}
    with pytest.raises(MalformedResponse, match="sent id 5"):
        parse_sglang(body, [[1, 5]], [[1]], k=0, vocab_size=10)


# ------------------------------------------------------- equal to the local access modes


def assert_same_scores(got, want, k):
    torch.testing.assert_close(got.token_logprobs_N, want.token_logprobs_N, atol=1e-5, rtol=0)
    if k:
        assert got.topk_ids_NK.shape == (want.token_logprobs_N.shape[0], k + 1)
        assert torch.equal(got.topk_ids_NK, want.topk_ids_NK)
        torch.testing.assert_close(got.topk_logprobs_NK, want.topk_logprobs_NK, atol=1e-5, rtol=0)


@pytest.mark.parametrize("api", ["vllm", "opd"])
def test_served_scores_equal_the_local_teacher(api, teacher, tok, rollout):
    fake = FakeTeacherServer(teacher, tok, api=api)
    client, _ = served(fake, api="auto", batch_tokens=9, concurrency=3)
    V = len(tok)
    got = client.logprobs(rollout, 5, 0.7, V)
    assert_same_scores(got, TopK(5, 0.7).score(teacher, rollout, V), k=5)
    assert client.describe() == f"served teacher {URL} ({api} API)"
    got = client.logprobs(rollout, 0, 1.0, V)
    assert got.topk_ids_NK is None
    assert_same_scores(got, SampledLogprobs().score(teacher, rollout, V), k=0)
    # rows packed into requests of at most 9 tokens (prompt + completion, padding dropped)
    sizes = [
        sum(map(len, b["prompt"] if isinstance(b["prompt"][0], list) else [b["prompt"]]))
        for b in fake.scoring_bodies
    ]
    assert len(sizes) >= 3 and max(sizes) <= 9
    stats = client.pop_stats()
    assert stats["teacher_retries"] == stats["teacher_topk_short"] == 0
    assert stats["teacher_requests"] >= 2 * 3 and stats["teacher_seconds"] > 0
    assert client.pop_stats()["teacher_requests"] == 0  # counters restart


def test_sglang_scores_equal_the_local_teacher_and_temperature_is_refused(teacher, tok, rollout):
    fake = FakeTeacherServer(teacher, tok, api="sglang")
    client, _ = served(fake, api="auto", batch_tokens=100)
    V = len(tok)
    assert_same_scores(client.logprobs(rollout, 4, 1.0, V), TopK(4).score(teacher, rollout, V), 4)
    with pytest.raises(ConfigError, match="SGLang's input log-probs ignore the temperature"):
        client.logprobs(rollout, 4, 0.5, V)


def test_a_vllm_server_that_ignores_the_temperature_is_refused(teacher, tok, rollout):
    fake = FakeTeacherServer(teacher, tok, api="vllm", apply_temperature=False)
    client, _ = served(fake)
    with pytest.raises(ConfigError, match="--logprobs-mode processed_logprobs") as err:
        client.logprobs(rollout, 3, 2.0, len(tok))
    assert URL in str(err.value) and "\n" not in str(err.value)


def test_fewer_entries_than_asked_cut_every_row_to_the_smallest_count(teacher, tok, rollout):
    class Short(FakeTeacherServer):
        def vllm_choice(self, i, ids, k, temperature):
            choice = super().vllm_choice(i, ids, k, temperature)
            entry = choice["prompt_logprobs"][-1]  # the last position of every row: k - 1
            worst = max((v["rank"], t) for t, v in entry.items() if int(t) != ids[-1])[1]
            del entry[worst]
            return choice

    client, _ = served(Short(teacher, tok, api="vllm"))
    V = len(tok)
    got = client.logprobs(rollout, 5, 1.0, V)
    want = TopK(4).score(teacher, rollout, V)  # a valid top-4 + tail everywhere
    assert_same_scores(got, want, k=4)
    assert (got.topk_ids_NK[:, -1] == TAIL_ID).all()
    assert client.pop_stats()["teacher_topk_short"] == 3  # one short position per scored row


# --------------------------------------------------------------------------------- faults


def test_500_and_malformed_answers_are_retried_with_backoff(teacher, tok, rollout):
    fake = FakeTeacherServer(teacher, tok, api="vllm")
    fake.faults = ["500", "badjson", "shape"]
    client, sleeps = served(fake, model="tiny-teacher", backoff_s=0.1, batch_tokens=1000)
    got = client.logprobs(rollout, 2, 1.0, len(tok))
    assert_same_scores(got, TopK(2).score(teacher, rollout, len(tok)), k=2)
    stats = client.pop_stats()
    assert (stats["teacher_requests"], stats["teacher_retries"], stats["teacher_errors"]) == (
        4,
        3,
        3,
    )
    assert sleeps == pytest.approx([0.1, 0.2, 0.4])


def test_after_the_retry_budget_the_error_names_the_url_and_last_failure(teacher, tok, rollout):
    fake = FakeTeacherServer(teacher, tok, api="vllm")
    fake.faults = ["500", "500", "badjson"]
    client, _ = served(fake, model="tiny-teacher", retries=2, batch_tokens=1000)
    with pytest.raises(TeacherUnreachable) as err:
        client.logprobs(rollout, 2, 1.0, len(tok))
    msg = str(err.value)
    assert isinstance(err.value, OpdError) and "\n" not in msg
    assert msg.startswith(f"teacher {URL} unreachable after 3 tries: POST /v1/completions")
    assert "malformed response (invalid JSON)" in msg
    assert client.pop_stats()["teacher_retries"] == 2


def test_a_4xx_is_not_retried_and_carries_the_server_message(teacher, tok, rollout):
    client, sleeps = served(FakeTeacherServer(teacher, tok, api="vllm", max_logprobs=3))
    with pytest.raises(TeacherRejected, match="HTTP 400.*greater than max allowed: 3"):
        client.logprobs(rollout, 4, 1.0, len(tok))
    stats = client.pop_stats()
    assert (stats["teacher_retries"], sleeps) == (0, [])


def test_timeouts_are_counted_and_retried(teacher, tok, rollout):
    fake = FakeTeacherServer(teacher, tok, api="vllm")
    fake.faults = ["timeout", "timeout"]
    client, _ = served(fake, model="tiny-teacher", batch_tokens=1000)
    client.logprobs(rollout, 0, 1.0, len(tok))
    stats = client.pop_stats()
    assert (stats["teacher_timeouts"], stats["teacher_retries"]) == (2, 2)


def test_connection_refused_after_the_budget():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = ServedTeacher(url, api="vllm", model="m", retries=1, backoff_s=0.0)
    with pytest.raises(TeacherUnreachable, match="unreachable after 2 tries: .*connection refused"):
        client.check_k(5)
    client.close()


def test_a_real_local_server_slow_500_and_malformed_then_right_answers(teacher, tok, rollout):
    fake = FakeTeacherServer(teacher, tok, api="opd")
    with serve_in_thread(fake.app()) as url:
        client = ServedTeacher(url, timeout_s=0.4, backoff_s=0.01, concurrency=2, batch_tokens=8)
        client.check_tokenizer(tok)
        client.check_k(5)
        fake.faults = ["timeout", "500", "badjson"]
        got = client.logprobs(rollout, 5, 0.8, len(tok))
        stats = client.pop_stats()
        client.close()
    assert_same_scores(got, TopK(5, 0.8).score(teacher, rollout, len(tok)), k=5)
    assert stats["teacher_timeouts"] == 1 and stats["teacher_errors"] == 2
    assert stats["teacher_retries"] == 3


# ------------------------------------------------------------------ checks before training


@pytest.mark.parametrize("api", ["vllm", "opd", "sglang"])
def test_a_different_server_tokenizer_is_refused_naming_both(api, teacher, tok):
    client, _ = served(FakeTeacherServer(teacher, tok, api=api))
    client.check_tokenizer(tok)  # the same tokenizer passes
    other = char_tokenizer("0123456789" + "abcdefghijklmnopqrstuvwxyz"[::-1] + " \t\n:.")
    client, _ = served(FakeTeacherServer(teacher, tok, api=api, server_tok=other))
    tok.name_or_path = "student-chars"
    with pytest.raises(ConfigError) as err:
        client.check_tokenizer(tok)
    msg = str(err.value)
    assert URL in msg and "'student-chars'" in msg and "tokenizer" in msg
    assert "from id position 0" in msg  # 'P' is not in the server's vocabulary


def test_k_above_the_server_cap_names_the_flag(teacher, tok):
    client, _ = served(FakeTeacherServer(teacher, tok, api="vllm", max_logprobs=20))
    client.check_k(20)
    with pytest.raises(ConfigError, match="start vLLM with --max-logprobs 21"):
        client.check_k(21)
    client, _ = served(FakeTeacherServer(teacher, tok, api="opd", max_logprobs=8))
    client.check_k(8)
    with pytest.raises(ConfigError, match=r"at most 8 .*--max-logprobs 9"):
        client.check_k(9)


def test_the_bearer_token_is_sent_but_never_shown(teacher, tok, rollout, monkeypatch):
    monkeypatch.setenv("OPD_TEST_TEACHER_TOKEN", "s3cret-value")
    fake = FakeTeacherServer(teacher, tok, api="vllm")
    client, _ = served(fake, token_env="OPD_TEST_TEACHER_TOKEN", retries=0)
    client.logprobs(rollout, 1, 1.0, len(tok))
    assert all(h["authorization"] == "Bearer s3cret-value" for h in fake.headers)
    assert "s3cret" not in client.describe() and "s3cret" not in repr(vars(client))
    fake.faults = [(401, {"error": {"message": "bad token s3cret-value"}})]  # echoes it
    with pytest.raises(TeacherRejected) as err:
        client.logprobs(rollout, 1, 1.0, len(tok))
    assert "s3cret" not in str(err.value) and "bad token ***" in str(err.value)
    assert "model.teacher_token_env" in str(err.value)
    monkeypatch.delenv("OPD_TEST_TEACHER_TOKEN")
    with pytest.raises(ConfigError, match="OPD_TEST_TEACHER_TOKEN is not set"):
        ServedTeacher(URL, token_env="OPD_TEST_TEACHER_TOKEN")


def test_the_api_is_detected_or_the_error_names_the_url(teacher, tok):
    for api in ("vllm", "opd", "sglang"):
        client, _ = served(FakeTeacherServer(teacher, tok, api=api), api="auto")
        assert client.api == api
    client, _ = served(FakeTeacherServer(teacher, tok, api="tgi"), api="auto")
    with pytest.raises(ConfigError, match=f"{URL} speaks .*model.teacher_api"):
        _ = client.api
    with pytest.raises(ConfigError, match="not an http"):
        ServedTeacher("127.0.0.1:8000")


def test_a_rollout_without_counted_tokens_sends_nothing(teacher, tok, rollout):
    fake = FakeTeacherServer(teacher, tok, api="vllm")
    client, _ = served(fake, model="tiny-teacher")
    empty = dataclasses.replace(
        rollout, completion_mask_BT=torch.zeros_like(rollout.completion_mask_BT)
    )
    got = client.logprobs(empty, 3, 1.0, len(tok))
    assert got.token_logprobs_N.shape == (0,) and got.topk_ids_NK.shape == (0, 4)
    assert fake.scoring_bodies == [] and client.pop_stats()["teacher_requests"] == 0


@pytest.mark.parametrize("concurrency", [1, 4])
def test_requests_run_concurrently_and_come_back_in_order(concurrency, teacher, tok, rollout):
    fake = FakeTeacherServer(teacher, tok, api="vllm")
    fake.latency_s = 0.1
    client, _ = served(fake, model="tiny-teacher", batch_tokens=1, concurrency=concurrency)
    got = client.logprobs(rollout, 2, 1.0, len(tok))  # 3 scored rows: 3 requests
    assert len(fake.scoring_bodies) == 3 and fake.max_in_flight == min(concurrency, 3)
    assert_same_scores(got, TopK(2).score(teacher, rollout, len(tok)), k=2)
