"""POST /v1/chat/completions of `opd serve-teacher`: the local teacher writes text (the
OpenAI-compatible subset a black-box chat teacher, `opd.teachers.chat.ChatTeacher`, uses).

Request: `messages` (a list of {"role", "content": text}), `max_tokens` (or
`max_completion_tokens`; default: what fits in max_model_len), `temperature` τ ≥ 0 (0 =
greedy; default 1), `top_p` ∈ (0, 1], `top_k` ≥ 0 (vLLM's extension; 0 = off), `n` ∈ [1, 128],
`seed`. The prompt is the tokenizer's chat template over the messages with the generation
prompt when it has one, else the contents joined by blank lines (what opd's own data path does
for a plain prompt with a system prompt). Generation is Hugging Face `generate`
(`opd.sampling.backends.hf`) with the n copies of the prompt in one batch, stopping at eos or
an end-of-turn token; with a `seed` the global RNG is seeded for the call (and restored after,
one call at a time), so the same request writes the same text.

Response: OpenAI's `chat.completion` object: `choices[i] = {"index", "message": {"role":
"assistant", "content"}, "finish_reason": "stop" (a stop token, not included in the text) |
"length"}` and `usage`. Refused (400, vLLM-style error): `stream`, tools, a non-text content,
an ensemble (a mixture has no single `generate`), a prompt plus max_tokens over max_model_len.
n × (prompt + max_tokens) over --max-request-tokens is a 413.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass

import torch
from fastapi import Request

from opd.serve.protocol import ApiError

MAX_N = 128


@dataclass(frozen=True)
class ChatRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    n: int
    seed: int | None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _messages(body) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] is not an object with a `role`", "messages")
        if not isinstance(m.get("content"), str):
            raise ApiError(400, f"messages[{i}].content must be text", "messages")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt ids of `messages` (module doc)."""
    if getattr(tokenizer, "chat_template", None):
        from opd.data.encode import _as_ids

        try:
            return _as_ids(
                tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            )
        except Exception as err:  # noqa: BLE001 - a template may refuse a role order
            raise ApiError(
                400, f"the chat template refused the messages: {err}", "messages"
            ) from None
    text = "\n\n".join(m["content"] for m in messages)
    return list(tokenizer(text, add_special_tokens=True).input_ids)


def parse_chat(body, settings, tokenizer, max_model_len: int) -> ChatRequest:
    """Check a /v1/chat/completions body; ApiError names the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != settings.name:
        raise ApiError(
            404,
            f"The model `{model}` does not exist; this server serves `{settings.name}`",
            "model",
        )
    for key in ("stream", "tools", "logprobs"):
        if body.get(key):
            raise ApiError(400, f"{key}={body.get(key)!r}: not supported", key)
    ids = render(tokenizer, _messages(body))
    room = max_model_len - len(ids)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(ids)} tokens, max_model_len={max_model_len}")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    max_tokens = room if max_tokens is None else max_tokens
    if not _is_int(max_tokens) or not 1 <= max_tokens <= room:
        raise ApiError(
            400,
            f"max_tokens={max_tokens!r}: must be a whole number in [1, {room}] (max_model_len="
            f"{max_model_len} minus the prompt's {len(ids)} tokens)",
            "max_tokens",
        )
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or temperature < 0:
        raise ApiError(400, f"temperature={temperature!r}: must be a number >= 0", "temperature")
    top_p = 1.0 if body.get("top_p") is None else body["top_p"]
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise ApiError(400, f"top_p={top_p!r}: must be in (0, 1]", "top_p")
    top_k = 0 if body.get("top_k") in (None, -1) else body["top_k"]
    if not _is_int(top_k) or top_k < 0:
        raise ApiError(400, f"top_k={top_k!r}: must be a whole number >= 0", "top_k")
    n = 1 if body.get("n") is None else body["n"]
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise ApiError(400, f"n={n!r}: must be a whole number in [1, {MAX_N}]", "n")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, f"seed={seed!r}: must be a whole number", "seed")
    if n * (len(ids) + max_tokens) > settings.max_request_tokens:
        raise ApiError(
            413,
            f"n × (prompt + max_tokens) = {n * (len(ids) + max_tokens)} tokens, over this "
            f"server's limit of {settings.max_request_tokens} (--max-request-tokens)",
        )
    return ChatRequest(ids, max_tokens, float(temperature), float(top_p), top_k, n, seed)


class ChatWriter:
    """Writes completions with the engine's one model, one `generate` call at a time."""

    def __init__(self, engine):
        from opd.data import end_of_turn_ids

        members = list(getattr(engine, "members", []))
        self.model = members[0] if len(members) == 1 else None
        self.tokenizer = engine.tokenizer
        self.pad_id = engine.pad_id
        self.stop_ids = end_of_turn_ids(engine.tokenizer)
        self.count = len(members)
        self._lock = threading.Lock()

    def write(self, req: ChatRequest) -> list[tuple[str, str, int]]:
        """(text, finish_reason, completion tokens) for each of the request's n choices."""
        from opd.sampling.backends.base import GenerationParams
        from opd.sampling.backends.hf import HFBackend

        params = GenerationParams(req.max_tokens, req.temperature, req.top_p, req.top_k)
        device = next(self.model.parameters()).device
        devices = [device.index or 0] if device.type == "cuda" else []
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
        with self._lock, torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            outs = HFBackend().generate(
                self.model,
                [req.prompt_ids] * req.n,
                params,
                pad_id=self.pad_id,
                stop_ids=self.stop_ids,
            )
        stops = set(self.stop_ids)
        results = []
        for ids in outs:
            stopped = bool(ids) and ids[-1] in stops
            body = ids[:-1] if stopped else ids
            text = self.tokenizer.decode(body, skip_special_tokens=True)
            results.append((text, "stop" if stopped else "length", len(ids)))
        return results


def chat_body(req: ChatRequest, results, *, name: str) -> dict:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": reason,
        }
        for i, (text, reason, _) in enumerate(results)
    ]
    written = sum(count for _, _, count in results)
    prompt = len(req.prompt_ids)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": written,
            "total_tokens": prompt + written,
        },
    }


def add_chat_route(app, engine, settings, read_body, body_limit: int, respond) -> None:
    """Install POST /v1/chat/completions on `app` (`read_body(request, limit)` reads the JSON
    body with the app's byte cap; `respond(payload)` makes the JSON response)."""
    writer = ChatWriter(engine)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, body_limit)
        if writer.model is None:
            raise ApiError(
                400,
                f"chat completions need one model; this server serves a mixture of "
                f"{writer.count} (serve a single model for /v1/chat/completions)",
            )
        req = parse_chat(body, settings, engine.tokenizer, engine.max_model_len)
        try:
            results = await asyncio.to_thread(writer.write, req)
        except Exception as err:  # noqa: BLE001 - the client gets one line, the server survives
            raise ApiError(500, f"generation failed: {type(err).__name__}: {err}") from None
        return respond(chat_body(req, results, name=settings.name))
