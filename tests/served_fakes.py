"""Fake served teachers for the client tests: vLLM- and SGLang-shaped answers computed with a
plain forward of a tiny model, reachable through `httpx.MockTransport` (in process) or a real
uvicorn server on 127.0.0.1 (`serve_in_thread`), with injectable faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


class FakeTeacherServer:
    """Answers like vLLM (`api="vllm"`), SGLang (`"sglang"`) or opd (`"opd"`).

    `faults` is a list consumed one per scoring request: "500", "badjson", "timeout",
    "shape" (valid JSON, wrong shape), a (status, body) answer, or None (answer normally). `apply_temperature=False`
    mimics a server that ignores τ in prompt log-probs. `max_logprobs` caps k (vLLM: HTTP 400).
    """

    def __init__(
        self, model, tok, api="vllm", max_logprobs=20, apply_temperature=True, server_tok=None
    ):
        self.model, self.tok, self.api = model, tok, api
        self.server_tok = server_tok or tok
        self.max_logprobs = max_logprobs
        self.apply_temperature = apply_temperature
        self.faults: list = []
        self.scoring_bodies: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        self.latency_s = 0.0  # each scoring request waits this long (in-process transport)
        self.in_flight = self.max_in_flight = 0

    # ------------------------------------------------------------------ the model

    @torch.no_grad()
    def _logprobs(self, ids: list[int], temperature: float) -> torch.Tensor:
        with self.lock:
            logits_LV = self.model(torch.tensor([ids])).logits[0].float()
        tau = temperature if self.apply_temperature else 1.0
        return F.log_softmax(logits_LV / tau, dim=-1)

    def vllm_choice(self, i: int, ids: list[int], k: int, temperature: float) -> dict:
        lp_LV = self._logprobs(ids, temperature)
        out = [None]
        for j in range(1, len(ids)):
            row = lp_LV[j - 1]
            entry = {}
            if k:
                vals, top = row.topk(k)
                for r, (v, t) in enumerate(zip(vals.tolist(), top.tolist()), start=1):
                    entry[str(t)] = {"logprob": v, "rank": r, "decoded_token": "?"}
            real = ids[j]
            if str(real) not in entry:
                rank = int((row > row[real]).sum()) + 1
                entry[str(real)] = {"logprob": row[real].item(), "rank": rank, "decoded_token": "?"}
            out.append(dict(reversed(list(entry.items()))))  # unordered on purpose
        return {"index": i, "text": "x", "finish_reason": "length", "prompt_logprobs": out}

    def sglang_item(self, ids: list[int], k: int, temperature: float) -> dict:
        lp_LV = self._logprobs(ids, 1.0)  # SGLang's input log-probs ignore the temperature
        tokens = [[None, ids[0], None]] + [
            [lp_LV[j - 1, ids[j]].item(), ids[j], None] for j in range(1, len(ids))
        ]
        meta = {"input_token_logprobs": tokens, "prompt_tokens": len(ids)}
        if k:
            tops = [None]
            for j in range(1, len(ids)):
                vals, top = lp_LV[j - 1].topk(k)
                tops.append([[v, t, None] for v, t in zip(vals.tolist(), top.tolist())])
            meta["input_top_logprobs"] = tops
        return {"text": "", "meta_info": meta}

    # ------------------------------------------------------------------ routing

    def answer(self, method: str, path: str, body: dict | None, headers: dict):
        """(status, json-able body or raw text) for one request."""
        self.headers.append(dict(headers))
        if path == "/v1/models" and self.api in ("vllm", "opd"):
            entry = {"id": "tiny-teacher", "object": "model", "owned_by": self.api}
            if self.api == "opd":
                entry.update(max_logprobs=self.max_logprobs, vocab_size=len(self.tok))
            return 200, {"object": "list", "data": [entry]}
        if path == "/get_model_info" and self.api == "sglang":
            return 200, {"model_path": "tiny-teacher", "is_generation": True}
        if path == "/opd/tokenizer" and self.api == "opd":
            from opd.teachers.served_checks import tokenizer_fingerprint

            fp = tokenizer_fingerprint(self.server_tok)
            return 200, {"fingerprint": fp, "vocab_size": len(self.server_tok), "name": "srv"}
        if path == "/tokenize" and self.api in ("vllm", "opd"):
            ids = self.server_tok.encode(body["prompt"], add_special_tokens=False)
            return 200, {"tokens": ids, "count": len(ids), "max_model_len": 512}
        if path == "/v1/completions" and self.api in ("vllm", "opd"):
            return self._completions(body)
        if path == "/generate" and self.api == "sglang":
            return self._generate(body)
        return 404, {"detail": "Not Found"}

    def _fault(self):
        with self.lock:
            return self.faults.pop(0) if self.faults else None

    def _completions(self, body):
        k = body.get("prompt_logprobs") or 0
        if k > self.max_logprobs:
            msg = (
                f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                f"{self.max_logprobs}"
            )
            return 400, {"error": {"message": msg, "type": "BadRequestError", "code": 400}}
        self.scoring_bodies.append(body)
        fault = self._fault()
        if fault:
            return fault if isinstance(fault, tuple) else (fault, None)
        prompt = body["prompt"]
        rows = [prompt] if prompt and isinstance(prompt[0], int) else prompt
        choices = [self.vllm_choice(i, r, k, body["temperature"]) for i, r in enumerate(rows)]
        return 200, {"object": "text_completion", "choices": list(reversed(choices))}

    def _generate(self, body):
        if "text" in body:
            ids = [self.server_tok.bos_token_id] + self.server_tok.encode(
                body["text"], add_special_tokens=False
            )
            return 200, self.sglang_item(ids, 0, 1.0)
        self.scoring_bodies.append(body)
        fault = self._fault()
        if fault:
            return fault if isinstance(fault, tuple) else (fault, None)
        inp = body["input_ids"]
        rows = [inp] if inp and isinstance(inp[0], int) else inp
        k = body.get("top_logprobs_num", 0)
        items = [self.sglang_item(r, k, body["sampling_params"]["temperature"]) for r in rows]
        return 200, items if len(rows) > 1 or isinstance(inp[0], list) else items[0]

    # ------------------------------------------------------------------ transports

    def mock_transport(self) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            body = json.loads(request.content) if request.content else None
            with self.lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                time.sleep(self.latency_s if request.method == "POST" else 0.0)
                status, out = self.answer(request.method, request.url.path, body, request.headers)
            finally:
                with self.lock:
                    self.in_flight -= 1
            if status == "timeout":
                raise httpx.ReadTimeout("timed out", request=request)
            if status == "500":
                return httpx.Response(500, json={"object": "error", "message": "boom"})
            if status == "badjson":
                return httpx.Response(200, content=b'{"choices": [')
            if status == "shape":
                return httpx.Response(200, json={"unexpected": True})
            return httpx.Response(status, json=out)

        return httpx.MockTransport(handler)

    def app(self):
        """A FastAPI app around `answer` (faults: "timeout" sleeps 1 s before answering)."""
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def route(path: str, request: Request):
            raw = await request.body()
            body = json.loads(raw) if raw else None
            status, out = await asyncio.to_thread(
                self.answer, request.method, "/" + path, body, dict(request.headers)
            )
            if status == "timeout":
                await asyncio.sleep(1.0)
                status, out = await asyncio.to_thread(
                    self.answer, request.method, "/" + path, body, dict(request.headers)
                )
            if status == "500":
                return JSONResponse({"object": "error", "message": "boom"}, status_code=500)
            if status == "badjson":
                return Response(b'{"choices": [', media_type="application/json")
            return JSONResponse(out, status_code=status)

        return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app):
    """Run `app` with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake teacher server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
