"""`opd serve-teacher` as real server processes: served log-probs equal the local teacher's,
dynamic batching changes nothing, limits and bad requests get vLLM-style errors, the
tokenizer endpoints, the ensemble mixture, and the fault-injecting server of the client tests.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from opd.losses.chunked import chunked_topk
from opd.losses.mixture import mixture_logits
from opd.models import decoder_and_head, load_model
from opd.serve import ServeSettings, create_app
from opd.serve.engine import TeacherEngine
from opd.teachers.fingerprint import tokenizer_fingerprint
from opd.tiny import char_tokenizer, tiny_gguf
from tests.helpers import assert_clean_error, run_opd, save_tiny_models

ROOT = Path(__file__).resolve().parent.parent
_post = functools.partial(httpx.post, timeout=60)  # a busy CI machine: generous timeouts
_get = functools.partial(httpx.get, timeout=60)
TOL = 1e-5
# Prompts of different lengths (char-tokenizer ids), so a batch of them needs padding.
SEQS = [
    [7, 77, 9, 85, 16, 6],
    [40, 41, 42],
    [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 3, 4, 1, 0, 99],
    [5, 5],
    [60, 61, 62, 63, 64, 65, 66, 67, 68],
]


class Server:
    """One server process started with the --port 0 / --port-file handshake."""

    def __init__(self, argv: list[str], folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.port_file = folder / "port"
        self.log = open(folder / "stderr.txt", "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*argv, "--port", "0", "--port-file", str(self.port_file)],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=ROOT,
        )
        self.url = ""

    def wait(self, timeout: float = 120.0) -> Server:
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise AssertionError(f"server did not start: {self.log.read()[-2000:]}")
            time.sleep(0.05)
        port = int(self.port_file.read_text())
        self.banner = self.proc.stdout.readline().strip()
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two server processes started at once: the tiny teacher and the fault server."""
    root = tmp_path_factory.mktemp("serve")
    teacher, student = save_tiny_models(root)
    opd = [sys.executable, "-m", "opd", "serve-teacher"]
    limits = ["--max-logprobs", "8", "--max-request-tokens", "64", "--batch-wait-ms", "50"]
    started = {
        "one": Server([*opd, str(teacher), "--name", "tiny", *limits], root / "one"),
        "fault": Server(
            [sys.executable, "tests/fault_server.py", str(teacher), "--fail-first", "1"]
            + ["--malformed-first", "1", "--delay-first", "3", "--delay", "0.2"],
            root / "fault",
        ),
    }
    try:
        for server in started.values():
            server.wait()
        yield {**started, "teacher": teacher, "student": student}
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def local(servers):
    """The teacher and student loaded in this process, as `opd` loads them."""
    teacher, tok = load_model(servers["teacher"])
    student, _ = load_model(servers["student"])
    return teacher.eval(), student.eval(), tok


def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """POST every body to /v1/completions at once (concurrent requests)."""

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    return asyncio.run(go())


def _ref_logprobs(model, seq, temperature) -> torch.Tensor:
    """(L, V) log_softmax(logits / τ) of one unpadded forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].float()
    return torch.log_softmax(logits / temperature, -1)


def _check_entries(entries, seq, ref_LV: torch.Tensor, k: int) -> int:
    """Served prompt_logprobs of `seq` against the reference; returns #realised outside top-k."""
    assert len(entries) == len(seq) and entries[0] is None
    outside = 0
    for j in range(1, len(seq)):
        row, entry, target = ref_LV[j - 1], entries[j], seq[j]
        ranked = sorted(entry.items(), key=lambda kv: kv[1]["rank"])
        top = [(int(i), e) for i, e in ranked if e["rank"] <= k][:k]
        assert [e["rank"] for _, e in top] == list(range(1, k + 1))
        if k:  # the served top-k values are the reference top-k values, every id scores right
            ref_values = row.topk(k).values
            got = torch.tensor([e["logprob"] for _, e in top])
            assert torch.allclose(got, ref_values, atol=TOL), (j, got, ref_values)
            for i, e in top:
                assert abs(e["logprob"] - row[i].item()) < TOL
        realised = entry[str(target)]
        assert abs(realised["logprob"] - row[target].item()) < TOL
        if target not in [i for i, _ in top]:
            outside += 1
            assert len(entry) == k + 1
            lp = row[target].item()  # true rank, allowing for float ties at the tolerance
            low = 1 + int((row > lp + TOL).sum())
            high = int((row > lp - TOL).sum())  # counts the realised token itself
            assert low <= realised["rank"] <= high and realised["rank"] > k
        else:
            assert len(entry) == k
    return outside


@pytest.mark.parametrize("k,temperature", [(0, 1.0), (5, 1.0), (5, 2.0), (0, 2.0)])
def test_served_logprobs_equal_local_teacher(servers, local, k, temperature):
    teacher, _, tok = local
    url = servers["one"].url
    singles = [{"prompt": s, "prompt_logprobs": k, "temperature": temperature} for s in SEQS]
    batch = {"prompt": SEQS, "prompt_logprobs": k, "temperature": temperature, "model": "tiny"}
    responses = _post_all(url, [*singles, batch])
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    outside = 0
    for seq, res in zip(SEQS, responses):
        (choice,) = res.json()["choices"]
        ref = _ref_logprobs(teacher, seq, temperature)
        outside += _check_entries(choice["prompt_logprobs"], seq, ref, k)
        assert choice["text"] == tok.decode([int(ref[-1].argmax())])  # greedy next token
    assert outside > 0  # the realised token outside the top-k was exercised
    body = responses[-1].json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert [c["index"] for c in body["choices"]] == list(range(len(SEQS)))
    for seq, choice in zip(SEQS, body["choices"]):
        _check_entries(choice["prompt_logprobs"], seq, _ref_logprobs(teacher, seq, temperature), k)
    tokens = sum(len(s) for s in SEQS)
    assert body["usage"] == {
        "prompt_tokens": tokens,
        "completion_tokens": len(SEQS),
        "total_tokens": tokens + len(SEQS),
    }


def test_served_topk_equals_chunked_topk(servers, local):
    """Against `chunked_topk` on the decoder's hidden states (the trainer's own top-k)."""
    teacher, _, _ = local
    decoder, head_VD, _ = decoder_and_head(teacher)
    seq = SEQS[2]
    (res,) = _post_all(servers["one"].url, [{"prompt": seq, "prompt_logprobs": 8, "max_tokens": 0}])
    entries = res.json()["choices"][0]["prompt_logprobs"]
    with torch.no_grad():
        hidden = decoder(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))[0]
    values, ids = chunked_topk(hidden, head_VD, 8, temperature=1.0, chunk_size=4)
    for j in range(1, len(seq)):
        top = sorted(
            ((e["rank"], int(i), e["logprob"]) for i, e in entries[j].items()), key=lambda t: t[0]
        )[:8]
        assert [r for r, _, _ in top] == list(range(1, 9))
        assert torch.allclose(torch.tensor([lp for *_, lp in top]), values[j - 1], atol=TOL)
    assert res.json()["choices"][0]["text"] == ""  # max_tokens=0: no next token


def test_dynamic_batcher_padded_concurrent_requests(servers):
    before = _get(f"{servers['one'].url}/opd/stats").json()
    bodies = [{"prompt": s, "prompt_logprobs": 1} for s in SEQS * 2]
    assert all(r.status_code == 200 for r in _post_all(servers["one"].url, bodies))
    after = _get(f"{servers['one'].url}/opd/stats").json()
    assert after["requests"] - before["requests"] == len(bodies)
    assert after["sequences"] - before["sequences"] == len(bodies)
    assert after["batches"] - before["batches"] < len(bodies)  # requests shared forwards
    assert after["max_batch_sequences"] >= 2
    assert after["padded_tokens"] - before["padded_tokens"] > after["tokens"] - before["tokens"]


def _error(res: httpx.Response, status: int, *needles: str) -> str:
    assert res.status_code == status, res.text
    body = res.json()
    assert body["object"] == "error" and body["code"] == status and body["type"]
    for needle in needles:
        assert needle in body["message"], body["message"]
    return body["message"]


def test_bad_requests_get_vllm_errors(servers):
    url = f"{servers['one'].url}/v1/completions"
    _error(_post(url, json={"prompt": [1, 2], "prompt_logprobs": 9}), 400, "--max-logprobs")
    _error(_post(url, json={"prompt": [1] * 65}), 413, "--max-request-tokens", "65")
    _error(_post(url, json={"prompt": [[1] * 40, [2] * 40]}), 413, "--max-request-tokens")
    _error(_post(url, json={"prompt": "1+2="}), 400, "send token ids")
    _error(_post(url, json={"prompt": ["1+2="]}), 400, "send token ids")
    _error(_post(url, content=b'{"prompt": [1,'), 400, "not valid JSON")
    _error(_post(url, json={"prompt": [1, 105]}), 400, "105", "[0, 105)")
    _error(_post(url, json={"prompt": [1, 2], "temperature": 0}), 400, "temperature")
    _error(_post(url, json={"prompt": [1, 2], "max_tokens": 5}), 400, "max_tokens")
    _error(_post(url, json={"prompt": [1, 2], "model": "other"}), 404, "other", "tiny")
    _error(_post(url, content=b"x" * 100_000), 413, "--max-request-tokens")
    assert _get(f"{servers['one'].url}/health").status_code == 200


def test_models_tokenize_and_fingerprint(servers, local):
    _, _, tok = local
    url = servers["one"].url
    assert servers["one"].banner == f"opd serve-teacher: serving {servers['teacher']} on {url}"
    (card,) = _get(f"{url}/v1/models").json()["data"]
    assert card["id"] == "tiny" and card["object"] == "model" and card["owned_by"] == "opd"
    assert (card["max_logprobs"], card["vocab_size"], card["max_model_len"]) == (8, 105, 512)
    got = _post(f"{url}/tokenize", json={"prompt": "3+4=7", "add_special_tokens": False})
    ids = tok("3+4=7", add_special_tokens=False)["input_ids"]
    assert got.json() == {"tokens": ids, "count": 5, "max_model_len": 512}
    info = _get(f"{url}/opd/tokenizer").json()
    assert info == {"fingerprint": tokenizer_fingerprint(tok), "vocab_size": 105, "name": "tiny"}


def test_tokenizer_fingerprint_stable_and_distinct(tmp_path):
    tok = char_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    fp = tokenizer_fingerprint(tok)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert tokenizer_fingerprint(reloaded) == fp == tokenizer_fingerprint(char_tokenizer())
    assert tokenizer_fingerprint(char_tokenizer("0123456789+=")) != fp
    renamed = char_tokenizer()
    renamed.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert tokenizer_fingerprint(renamed) != fp


def test_ensemble_serves_the_mixture(servers, local):
    """In this process (the app a server runs, without a third process to start)."""
    teacher, student, _ = local
    seq, tau = SEQS[0], 2.0
    specs = [str(servers["teacher"]), str(servers["student"])]
    engine = TeacherEngine.load(specs, weights=[7.0, 3.0])  # normalised to 0.7, 0.3
    with TestClient(create_app(engine, ServeSettings(name="mix", max_logprobs=4))) as client:
        body = {"prompt": seq, "prompt_logprobs": 3, "temperature": tau}
        res = client.post("/v1/completions", json=body)
    assert res.status_code == 200, res.text
    with torch.no_grad():
        z_t = teacher(input_ids=torch.tensor([seq])).logits[0]
        z_s = student(input_ids=torch.tensor([seq])).logits[0]
    mix_LV = torch.log_softmax(mixture_logits([z_t, z_s], [0.7, 0.3], tau) / tau, -1)
    teacher_LV = torch.log_softmax(z_t / tau, -1)
    entries = res.json()["choices"][0]["prompt_logprobs"]
    _check_entries(entries, seq, mix_LV, 3)
    # Position 1 by hand: log(0.7 p_teacher + 0.3 p_student), not the first member alone.
    p_t = teacher_LV[0, seq[1]].exp().item()
    p_s = torch.log_softmax(z_s / tau, -1)[0, seq[1]].exp().item()
    lp = entries[1][str(seq[1])]["logprob"]
    assert math.isclose(lp, math.log(0.7 * p_t + 0.3 * p_s), abs_tol=TOL)
    assert abs(lp - math.log(p_t)) > 1e-4


def test_fault_server_fails_breaks_delays_then_serves(servers):
    url = servers["fault"].url
    body = {"prompt": SEQS[1], "prompt_logprobs": 2}
    t0 = time.monotonic()
    first = _post(f"{url}/v1/completions", json=body)
    _error(first, 500, "injected")
    second = _post(f"{url}/v1/completions", json=body)
    assert second.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(second.content)
    third = _post(f"{url}/v1/completions", json=body)
    assert time.monotonic() - t0 >= 0.6  # three delayed requests
    assert len(third.json()["choices"][0]["prompt_logprobs"]) == len(SEQS[1])
    stats = _get(f"{url}/fault/stats").json()
    assert stats == {"completions": 3, "failed": 1, "malformed": 1, "delayed": 3}


def test_bad_model_path_is_one_clean_error(tmp_path):
    res = run_opd(["serve-teacher", tmp_path / "no-such-model", "--port", "0"])
    assert_clean_error(res, "no-such-model", "does not exist")


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["embedded", "--port-file", "{tmp}/nope/port"], ["--port-file", "does not exist"]),
        (["a,b", "--weights", "1"], ["--weights", "1 weights for the 2 models"]),
        (["a", "--weights", "1"], ["--weights", "only one model"]),
        (["a,b", "--weights", "x,1"], ["--weights", "'x,1'"]),
        (["embedded", "--port", "70000"], ["--port", "65535"]),
        (["embedded", "--max-logprobs", "-1"], ["--max-logprobs", ">= 0"]),
        (["embedded", "--host", "no.such.host.invalid"], ["--host", "cannot resolve"]),
        (["embedded", "--api-key-env", "OPD_TEST_UNSET_KEY"], ["OPD_TEST_UNSET_KEY", "not set"]),
    ],
)
def test_bad_options_are_one_clean_error(tmp_path, argv, needles):
    res = run_opd(["serve-teacher", *(a.format(tmp=tmp_path) for a in argv)])
    assert_clean_error(res, *needles)


# ---------------------------------------------------------------- the app in this process


def test_gguf_teacher_and_one_token_sequences(tmp_path):
    model, _ = tiny_gguf(tmp_path / "t.gguf", seed=3)
    engine = TeacherEngine.load([str(tmp_path / "t.gguf")])
    seqs = [[5], [5, 6, 7, 200], [8, 9]]
    with TestClient(create_app(engine, ServeSettings(name="g"))) as client:
        res = client.post("/v1/completions", json={"prompt": seqs, "prompt_logprobs": 2})
    assert res.status_code == 200, res.text
    choices = res.json()["choices"]
    assert choices[0]["prompt_logprobs"] == [None]  # one token: nothing predicts it
    for seq, choice in zip(seqs, choices):
        ref = _ref_logprobs(model.eval(), seq, 1.0)
        _check_entries(choice["prompt_logprobs"], seq, ref, 2)
        assert choice["text"] == engine.decoded[int(ref[-1].argmax())]


def test_api_key_is_required_when_set(servers):
    engine = TeacherEngine.load([str(servers["teacher"])])
    settings = ServeSettings(name="k", api_key="s3cret")
    assert "s3cret" not in repr(settings)
    with TestClient(create_app(engine, settings)) as client:
        assert client.get("/health").status_code == 200
        _error(client.get("/v1/models"), 401, "Authorization: Bearer")
        wrong = {"Authorization": "Bearer nope"}
        _error(client.post("/v1/completions", json={"prompt": [1]}, headers=wrong), 401)
        right = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/completions", json={"prompt": [1]}, headers=right).is_success


def test_busy_port_is_one_clean_error_before_loading():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_opd(["serve-teacher", "/no/such/model", "--port", port])
    assert_clean_error(res, f"--port {port}", "cannot bind", "--port 0")
