"""A black-box teacher behind an OpenAI-compatible chat endpoint (issue 11, item 5):
`opd.teachers.chat.ChatTeacher` (client) and `opd serve-teacher`'s /v1/chat/completions.

In-process: the route against the local model's own `generate`, the client's request bodies,
re-tokenisation, retries and refusals (httpx.MockTransport). End to end: `orpo_distill` and
`ovd` from the CLI against a real server process on 127.0.0.1 (stopped by PID), a faulty one
(500, bad JSON, then killed mid-run) and `--resume` matching the uninterrupted run.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from opd.errors import ConfigError, TeacherUnreachable
from opd.sampling import GenerationParams
from opd.sampling.backends.hf import HFBackend
from opd.serve import ServeSettings, create_app
from opd.serve.engine import TeacherEngine
from opd.teachers.chat import ChatTeacher, Choice, retokenize
from opd.tiny import tiny_llama
from tests.helpers import assert_clean_error, run_opd, save_tiny_models, write_prompts
from tests.test_served_e2e import start, steps, stop

TOKEN_ENV, TOKEN = "OPD_TEST_CHAT_TOKEN", "chat-secret-4f1d9"


# ---------------------------------------------------------------- the route, in this process


def test_chat_route_writes_what_the_local_model_generates(tok):
    model = tiny_llama(len(tok), hidden=32, layers=1, seed=5)
    engine = TeacherEngine([model], tok)
    messages = [{"role": "user", "content": "3+4="}]
    with TestClient(create_app(engine, ServeSettings(name="t"))) as client:

        def post(**kw):
            return client.post("/v1/chat/completions", json={"messages": messages, **kw})

        greedy = post(model="t", max_tokens=6, temperature=0, n=2)
        assert greedy.status_code == 200, greedy.text
        body = greedy.json()
        assert body["object"] == "chat.completion" and len(body["choices"]) == 2
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        stops = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
        (ref,) = HFBackend().generate(
            model, [list(ids)], GenerationParams(6, 0.0), pad_id=tok.pad_token_id, stop_ids=stops
        )
        stopped = ref[-1] in stops
        want = tok.decode(ref[:-1] if stopped else ref, skip_special_tokens=True)
        for c in body["choices"]:
            assert c["message"] == {"role": "assistant", "content": want}
            assert c["finish_reason"] == ("stop" if stopped else "length")
        assert body["usage"]["prompt_tokens"] == len(ids)
        # a seed makes a sampled answer repeatable; the n choices of one request differ
        a = [c["message"]["content"] for c in post(max_tokens=8, n=4, seed=7).json()["choices"]]
        b = [c["message"]["content"] for c in post(max_tokens=8, n=4, seed=7).json()["choices"]]
        assert a == b and len(set(a)) > 1
        c = [c["message"]["content"] for c in post(max_tokens=8, n=4, seed=8).json()["choices"]]
        assert c != a
        for kw, status, needle in (
            ({"stream": True}, 400, "stream"),
            ({"n": 0}, 400, "n=0"),
            ({"max_tokens": 10_000}, 400, "max_tokens"),
            ({"temperature": -1}, 400, "temperature"),
            ({"model": "other"}, 404, "does not exist"),
        ):
            res = post(**kw)
            assert res.status_code == status and needle in res.json()["message"], res.text
    mixture = TeacherEngine([model, tiny_llama(len(tok), hidden=32, layers=1, seed=6)], tok)
    with TestClient(create_app(mixture, ServeSettings(name="mix"))) as client:
        res = client.post("/v1/chat/completions", json={"messages": messages})
        assert res.status_code == 400 and "one model" in res.json()["message"]


# ---------------------------------------------------------------- the client, mocked


def _answer(texts, reasons=None):
    reasons = reasons or ["stop"] * len(texts)
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r}
        for i, (t, r) in enumerate(zip(texts, reasons))
    ]
    return {"object": "chat.completion", "choices": choices[::-1]}  # any order: by index


def _client(handler, **kw) -> ChatTeacher:
    return ChatTeacher(
        "http://teacher.test:9/v1",
        model="m",
        transport=httpx.MockTransport(handler),
        sleep=lambda s: None,
        **kw,
    )


class _Ex:
    """The fields of `opd.data.Example` the chat teacher reads."""

    def __init__(self, prompt: str, tok):
        self.prompt_ids = tuple(tok(prompt).input_ids)
        self.raw_prompt, self.view = prompt, None


def test_write_sends_one_request_per_prompt_and_retokenizes(tok):
    from opd.context import StepContext

    seen = []

    def handler(request):
        body = json.loads(request.content)
        seen.append((request.url.path, body))
        n = body["n"]
        texts = ["12", "9<|im_end|>xyz", "abcdefghij"][:n] if n > 1 else ["7"]
        return httpx.Response(200, json=_answer(texts, ["stop", "stop", "length"][:n]))

    teacher = _client(handler, concurrency=2)
    assert teacher.provides == frozenset({"text"})
    ctx = StepContext(
        tokenizer=tok,
        params=GenerationParams(max_new_tokens=5, temperature=0.7),
        stop_ids=(tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")),
    )
    examples = [_Ex("1+2=", tok)] * 3 + [_Ex("4+4=", tok)]  # Grouped: the same prompt 3×
    torch.manual_seed(0)
    out = teacher.write(examples, ctx)
    assert [p for p, _ in seen] == ["/v1/chat/completions"] * 2
    bodies = sorted((b for _, b in seen), key=lambda b: -b["n"])
    assert [b["n"] for b in bodies] == [3, 1]
    assert bodies[0]["messages"] == [{"role": "user", "content": "1+2="}]
    assert bodies[0]["model"] == "m" and bodies[0]["max_tokens"] == 5
    assert bodies[0]["temperature"] == 0.7 and "top_p" not in bodies[0]
    assert all(isinstance(b["seed"], int) for b in bodies)
    eos = tok.eos_token_id  # a plain prompt: the student's completions end with eos
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    assert out == [enc("12") + [eos], enc("9") + [im_end], enc("abcde"), enc("7") + [eos]]
    torch.manual_seed(0)
    seen.clear()
    teacher.write(examples, ctx)  # the same global RNG state: the same seeds
    assert sorted(b["seed"] for _, b in seen) == sorted(b["seed"] for b in bodies)
    # greedy: temperature 0 and no seed
    seen.clear()
    greedy = StepContext(tokenizer=tok, params=GenerationParams(5, 0.0), stop_ids=ctx.stop_ids)
    teacher.write(examples[-1:], greedy)
    assert seen[0][1]["temperature"] == 0.0 and "seed" not in seen[0][1]
    assert retokenize(Choice("3", "stop"), tok, 1, (), eos) == enc("3")  # the cap wins


def test_500_and_malformed_json_are_retried_and_counted_then_unreachable(tok):
    answers = iter(
        [httpx.Response(500, json={"message": "boom"}), httpx.Response(200, content=b"{not")]
    )

    def handler(request):
        return next(answers, None) or httpx.Response(200, json=_answer(["5"]))

    teacher = _client(handler, retries=2)
    assert teacher.judge(["grade this"], max_tokens=3) == ["5"]
    stats = teacher.pop_stats()
    assert (stats["teacher_requests"], stats["teacher_errors"], stats["teacher_retries"]) == (
        3,
        2,
        2,
    )
    down = _client(lambda r: httpx.Response(503, json={"message": "overloaded"}), retries=1)
    with pytest.raises(TeacherUnreachable, match=r"teacher\.test.*2 tries.*503"):
        down.judge(["x"], max_tokens=3)
    short = _client(lambda r: httpx.Response(200, json=_answer(["a"])), retries=0)
    with pytest.raises(TeacherUnreachable, match="expected 2 choices, got 1"):
        short.complete([[{"role": "user", "content": "q"}]], [2], max_tokens=2, temperature=1.0)


def test_ovd_judge_asks_the_chat_teacher_greedily_and_scores_its_text(tok):
    from types import SimpleNamespace

    from opd.blackbox import OVD
    from opd.context import StepContext
    from opd.sampling import make_rollout

    asked = []

    def handler(request):
        body = json.loads(request.content)
        asked.append(body)
        return httpx.Response(200, json=_answer([["7", "score: 3", "nine"][len(asked) - 1]]))

    prompts = [tok("1+2=").input_ids] * 2 + [tok("3+4=").input_ids]
    comps = [tok(c, add_special_tokens=False).input_ids for c in ("3", "4", "7")]
    ro = make_rollout(prompts, comps, 0, "student", raw_prompts=("1+2=", "1+2=", "3+4="))
    teacher = _client(handler, concurrency=1)
    ctx = StepContext(models=SimpleNamespace(teacher=teacher), tokenizer=tok, rollout=ro)
    ovd = OVD(group_size=1, judge_template="Q {question} A {answer} S:", judge_max_new_tokens=2)
    rewards = ovd.rewards(ctx)
    assert rewards.tolist() == pytest.approx([7 / 9, 3 / 9, 0.5])
    assert ctx.metrics["ovd_bad_parses"] == 1.0 and ctx.metrics["ovd_score_mean"] == 5.0
    assert [b["messages"] for b in asked] == [
        [{"role": "user", "content": f"Q {q} A {a} S:"}]
        for q, a in (("1+2=", "3"), ("1+2=", "4"), ("3+4=", "7"))
    ]
    assert all(b["temperature"] == 0.0 and b["max_tokens"] == 2 and b["n"] == 1 for b in asked)
    assert all("seed" not in b for b in asked)


def test_a_chat_teacher_refuses_log_probs_naming_the_recipes_that_fit():
    teacher = ChatTeacher("http://127.0.0.1:9/v1", model="m")
    with pytest.raises(ConfigError, match=r"only writes text.*top-4 log-probs.*orpo_distill"):
        teacher.logprobs(None, 4, 1.0, 100)
    assert teacher.path == "/chat/completions"  # relative to the base URL .../v1
    assert ChatTeacher("http://127.0.0.1:9", model="m").path == "/v1/chat/completions"


@pytest.mark.parametrize(
    "recipe, output", [("gkd", "full_logits"), ("sampled_rkl", "token_logprobs")]
)
def test_a_log_prob_recipe_with_a_chat_teacher_is_refused_before_anything_is_written(
    tmp_path, recipe, output
):
    t, s = save_tiny_models(tmp_path)
    prompts = write_prompts(tmp_path / "p.jsonl", n=4)
    res = run_opd(
        [
            "distill",
            *_argv(tmp_path, "run", "http://127.0.0.1:9/v1", s, prompts, f"recipe={recipe}"),
        ]
    )
    assert_clean_error(res, output, "teacher access", "chat teacher", "it gives: text")
    assert not (tmp_path / "run").exists()


def test_lion_with_a_chat_teacher_is_refused_at_start_up(tmp_path):
    """lion's default writer needs a local teacher that writes: one line before the run
    folder is made (it used to fail only at the first round)."""
    t, s = save_tiny_models(tmp_path)
    prompts = write_prompts(tmp_path / "p.jsonl", n=4)
    argv = _argv(tmp_path, "run", "http://127.0.0.1:9/v1", s, prompts, "recipe=lion")
    res = run_opd(["distill", *argv])
    assert_clean_error(res, "lion: the default writer needs a local teacher", "writer=")
    assert not (tmp_path / "run").exists()


def test_openai_chat_without_a_url_is_one_clean_error(tmp_path):
    t, s = save_tiny_models(tmp_path)
    prompts = write_prompts(tmp_path / "p.jsonl", n=4)
    res = run_opd(["distill", *_argv(tmp_path, "run", t, s, prompts, "recipe=orpo_distill")])
    assert_clean_error(res, "model.teacher_api=openai-chat", "http(s)://", str(t))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- end to end, real servers


def _argv(tmp, name, url, student, prompts, *extra):
    return [
        f"output_dir={tmp / name}",
        f"model.teacher={url}",
        "model.teacher_api=openai-chat",
        f"model.student={student}",
        f"data.train={prompts}",
        "data.eval_count=0",
        "data.chat_template=false",
        "sampling.max_new_tokens=5",
        "train.batch_size=4",
        "train.progress=false",
        "train.lr=3e-3",
        "model.teacher_retries=2",
        "model.teacher_timeout=20",
        *extra,
    ]


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    t, s = save_tiny_models(tmp)
    return tmp, t, s, write_prompts(tmp / "prompts.jsonl", n=16)


@pytest.fixture(scope="module")
def chat_server(chat_pair):
    tmp, t, _, _ = chat_pair
    mp = pytest.MonkeyPatch()
    mp.setenv(TOKEN_ENV, TOKEN)  # the server's key and the client's bearer token
    proc, url = start(tmp, t, "--api-key-env", TOKEN_ENV, name="chat")
    yield f"{url}/v1"
    stop(proc)
    mp.undo()


def _files_hold(folder, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.parametrize(
    "recipe, extra, logged",
    [
        ("orpo_distill", (), "orpo_l_or"),
        ("ovd", ("method.args.group_size=2", "method.args.judge_max_new_tokens=3"), "reward_mean"),
    ],
)
def test_black_box_recipes_train_from_the_cli_with_a_chat_teacher(
    chat_pair, chat_server, recipe, extra, logged
):
    tmp, _, s, prompts = chat_pair
    argv = _argv(
        tmp,
        recipe,
        chat_server,
        s,
        prompts,
        f"recipe={recipe}",
        "train.steps=2",
        f"model.teacher_token_env={TOKEN_ENV}",
        *extra,
    )
    res = run_opd(["distill", *argv])
    assert res.code == 0, res.err + (res.traceback or "")
    rows = steps(tmp / recipe)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["teacher_requests"] >= 1 and r["teacher_errors"] == 0 for r in rows)
    assert all(logged in r for r in rows)
    if recipe == "ovd":  # one judge request per completion (B·G = 8), GET /v1/models once
        assert [r["teacher_requests"] for r in rows] == [9, 8]
        assert all(0 <= r["ovd_bad_parses"] <= 8 for r in rows)  # counted, never fatal
    assert (tmp / recipe / "student").is_dir()
    assert _files_hold(tmp / recipe, TOKEN) == []  # the bearer token is in no file
    assert TOKEN not in res.out + res.err


@pytest.mark.slow  # a second server process (~10 s on 2 cores) and three short runs
def test_a_faulty_then_dying_endpoint_is_retried_checkpoints_and_resumes_identically(
    chat_pair, chat_server
):
    tmp, t, s, prompts = chat_pair
    extra = (
        "recipe=orpo_distill",
        "train.steps=3",
        "train.checkpoint_every=1",
        f"model.teacher_token_env={TOKEN_ENV}",
        f"model.teacher_model={t}",
    )
    assert run_opd(["distill", *_argv(tmp, "full", chat_server, s, prompts, *extra)]).code == 0
    full = steps(tmp / "full")
    first = full[0]["teacher_requests"]  # step 1's chat requests (no faults: one try each)
    assert first >= 2 and full[1]["teacher_requests"] >= 2
    # 1st request: HTTP 500, 2nd: bad JSON (both retried); killed at step 2's 2nd request
    proc, url = start(
        tmp,
        t,
        "--fail-first",
        "1",
        "--malformed-first",
        "1",
        "--exit-at",
        str(first + 4),
        script="tests/fault_server.py",
        name="dying",
    )
    try:
        res = run_opd(["distill", *_argv(tmp, "cut", f"{url}/v1", s, prompts, *extra)])
    finally:
        stop(proc)
    line = assert_clean_error(res, "unreachable", "--resume", "checkpoint of step 1")
    assert "step 2" in line and TOKEN not in line
    cut = steps(tmp / "cut")
    assert len(cut) == 1 and (cut[0]["teacher_errors"], cut[0]["teacher_retries"]) == (2, 2)
    res = run_opd(["distill", "--resume", str(tmp / "cut"), f"model.teacher={chat_server}"])
    assert res.code == 0, res.err + (res.traceback or "")
    losses = [r["loss"] for r in steps(tmp / "cut")]
    assert losses == pytest.approx([r["loss"] for r in full], rel=1e-5, abs=1e-6)
    assert _files_hold(tmp / "cut", TOKEN) == []
